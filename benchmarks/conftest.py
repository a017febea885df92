"""The bench CLI's configurations as pytest-benchmark tests: one test per configuration
and provider, grouped by configuration.

    pytest benchmarks --benchmark-only                    # the quick suite
    CNNLSTM_FAST_BENCH_SUITE=batch-sweep pytest benchmarks --benchmark-only --benchmark-save=NAME
    pytest benchmarks --benchmark-only --benchmark-compare  # against the last saved run
    CNNLSTM_FAST_BENCH_TINY=1 pytest benchmarks --benchmark-disable   # smoke test (CI)
"""

import os

import torch

from cnnlstm_fast.bench import providers, suites

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SUITE = os.environ.get("CNNLSTM_FAST_BENCH_SUITE", "quick")
TINY = os.environ.get("CNNLSTM_FAST_BENCH_TINY") == "1"
#: Smoke shapes: every code path, milliseconds each.
TINY_LAYER = dict(batch=2, steps=3, input_size=5, hidden_size=4, layers=2, directions=2)
TINY_MODELS = (dict(model="cnnlstm-1d", batch=2, steps=4, input_size=3, hidden_size=8, layers=2, directions=2),
               dict(model="cnnlstm-2d", batch=1, steps=2, input_size=3, hidden_size=8, layers=2, directions=2))


def _configs(models: bool) -> list:
    if TINY:
        shapes = list(TINY_MODELS) if models else [TINY_LAYER]
    else:
        shapes = suites.shapes("cnnlstm" if models else SUITE, DEVICE.split(":")[0])
        shapes = [s for s in shapes if suites.is_model(s) == models]
    dtypes = suites.DEFAULT_DTYPES[DEVICE.split(":")[0]]
    return suites.make_configs(shapes, suites.CELLS, dtypes, suites.MODES, DEVICE)


def pytest_generate_tests(metafunc):
    if "cfg" in metafunc.fixturenames:
        models = getattr(metafunc.module, "MODELS", False)
        configs = _configs(models)
        metafunc.parametrize("cfg", configs, ids=[c.name.replace(" ", "-") for c in configs])
        names = providers.default_providers(DEVICE.split(":")[0])
        if models:
            names = [p for p in names if p not in (providers.COMPILED, providers.FLASHRNN)]
        metafunc.parametrize("provider", names)

if os.environ.get("CNNLSTM_FAST_BENCH_THREADS"):  # e.g. 1 on a CPU shared with other work
    torch.set_num_threads(int(os.environ["CNNLSTM_FAST_BENCH_THREADS"]))
