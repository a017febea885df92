"""LSTM and GRU layers per provider (configurations: benchmarks/conftest.py)."""

import pytest

from cnnlstm_fast.bench import providers


def test_rnn(benchmark, cfg, provider):
    try:
        step = providers.step_for(cfg, provider)
    except providers.Skip as why:
        pytest.skip(str(why))
    benchmark.group = cfg.name
    benchmark.extra_info.update(flops=cfg.flops, steps=cfg.steps)
    benchmark(step)
