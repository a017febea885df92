"""Test set-up shared by every test file.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the variable
must be set before anything is jitted, so before any test module is imported.

``@pytest.mark.experimental(*keys)``: the test runs only experimental kernels (keys of
``cnnlstm_fast.experimental.KERNELS``) and is skipped unless CNNLSTM_FAST_EXPERIMENTAL=1,
so that the default path's verification never depends on them.
"""

import os


def _cuda_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


from cnnlstm_fast import experimental  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "experimental(*keys): runs only the experimental "
                            "kernels named (cnnlstm_fast.experimental.KERNELS); skipped unless "
                            "CNNLSTM_FAST_EXPERIMENTAL=1")


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
        if kernels and not switch:
            item.add_marker(skip_experimental)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_precision():
    """Fresh, reproducible random inputs per test; IEEE fp32 matmuls (no tf32)."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
