"""Test set-up shared by every test file.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the variable
must be set before anything is jitted, so before any test module is imported.
"""

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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_precision():
    """Fresh, reproducible random inputs per test; IEEE fp32 matmuls (no tf32)."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
