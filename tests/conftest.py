"""Test set-up shared by every test file.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the variable
must be set before anything is jitted, so before any test module is imported.

``@pytest.mark.experimental(*keys)``: the test runs only experimental kernels (keys of
``cnnlstm_fast.experimental.KERNELS``) and is skipped unless CNNLSTM_FAST_EXPERIMENTAL=1,
so that the default path's verification never depends on them. ``--experimental-report
PATH`` writes, per experimental kernel, what its tests gave (benchmarks/gpu_session.sh):
the marked tests count for the kernels they name; under the switch every unmarked test
runs the default kernels' newer versions, so it counts for those (the kernels that
nothing but the switch selects).
"""

import json
import os
import shutil
import tempfile


def _cuda_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# auto consults the tuning record under $XDG_CACHE_HOME: the tests (and the processes
# they start) get an empty one of their own, and no tuning on first use.
_CACHE = tempfile.mkdtemp(prefix="cnnlstm_fast-tests-")
os.environ["XDG_CACHE_HOME"] = _CACHE
os.environ.pop("CNNLSTM_FAST_TUNE", None)

import pytest  # noqa: E402
import torch  # noqa: E402


from cnnlstm_fast import experimental  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--experimental-report", metavar="PATH",
                     help="write what each experimental kernel's tests gave, as JSON "
                          "(rewritten after every test)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "experimental(*keys): runs only the experimental "
                            "kernels named (cnnlstm_fast.experimental.KERNELS); skipped unless "
                            "CNNLSTM_FAST_EXPERIMENTAL=1")
    path = config.getoption("--experimental-report")
    if path and not hasattr(config, "workerinput"):  # the xdist controller, or no xdist
        config.pluginmanager.register(ExperimentalReport(path), "experimental-report")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    keys = {k.key for k in experimental.KERNELS}
    skip_experimental = pytest.mark.skip(
        reason=f"experimental kernel: runs only with {experimental.SWITCH}=1")
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    switch = experimental.enabled()
    for item in items:
        kernels = tuple(k for mark in item.iter_markers("experimental") for k in mark.args)
        if set(kernels) - keys:
            raise pytest.UsageError(f"{item.nodeid}: experimental({', '.join(kernels)}) names "
                                    f"no kernel of cnnlstm_fast.experimental.KERNELS")
        item.user_properties.append(("experimental", kernels))  # for ExperimentalReport
        if kernels and not switch:
            item.add_marker(skip_experimental)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


class ExperimentalReport:
    """Per experimental kernel, the outcomes of the tests that count for it (see the
    module docstring), written to ``path`` after every test, so that a run cut short by a
    time limit leaves what it saw ("complete": false). A kernel's result: "pass" when
    its tests passed (at least one) and none failed, "fail" when one failed, "not run"
    when all were skipped or none ran."""

    def __init__(self, path):
        self.path = path
        self.switch = experimental.enabled()
        self.outcomes = {}  # nodeid -> (kernels, "passed" | "failed" | "skipped")
        self._write(complete=False)

    def pytest_runtest_logreport(self, report):
        kernels = dict(report.user_properties).get("experimental", ())
        if not kernels and self.switch:
            kernels = tuple(k.key for k in experimental.KERNELS if k.selected_by is None)
        before = self.outcomes.get(report.nodeid, (kernels, None))[1]
        if report.failed:
            outcome = "failed"
        elif before == "failed":
            outcome = before
        elif report.skipped:
            outcome = "skipped"
        elif report.when == "call":
            outcome = "passed"
        else:
            outcome = before
        if outcome is not None:
            self.outcomes[report.nodeid] = (kernels, outcome)
        if report.when == "teardown":
            self._write(complete=False)

    def pytest_sessionfinish(self, session, exitstatus):
        self._write(complete=True, exitstatus=int(exitstatus))

    def _write(self, complete, exitstatus=None):
        kernels = {}
        for kernel in experimental.KERNELS:
            counts = {"passed": 0, "failed": 0, "skipped": 0}
            failures = []
            for nodeid, (keys, outcome) in self.outcomes.items():
                if kernel.key in keys:
                    counts[outcome] += 1
                    if outcome == "failed":
                        failures.append(nodeid)
            result = ("fail" if counts["failed"] else "pass" if counts["passed"] else "not run")
            kernels[kernel.key] = {"what": kernel.what,
                                   "selected_by": kernel.selected_by or f"{experimental.SWITCH}=1",
                                   "result": result, **counts, "failures": failures}
        text = json.dumps({"switch": self.switch, "complete": complete, "exitstatus": exitstatus,
                           "kernels": kernels}, indent=1)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, self.path)


@pytest.fixture
def pin_kernels():
    """``pin_kernels(cuda_forward="step", ...)``: ``cnnlstm_fast.experimental.set_kernels``
    for the test (the GPU kernel pins); every pin is restored after it as it was before."""
    before = experimental.get_kernels()
    yield experimental.set_kernels
    experimental.set_kernels(**before)


@pytest.fixture(autouse=True)
def _seed_and_precision():
    """Fresh, reproducible random inputs per test; IEEE fp32 matmuls (no tf32)."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
