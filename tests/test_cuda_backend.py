"""The ``cuda`` backend: availability reporting everywhere; kernels on a GPU.

On a machine without a GPU only the reporting runs (the kernels are compiled by nvcc
during the build, which fails if a kernel does not compile). With a GPU every kernel
path (per-step and persistent) is compared with the reference backend, forward and
backward, fp32 (IEEE) and fp16/bf16 by the tolerance rule of DESIGN.md."""

from __future__ import annotations

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast import _ext, backends
from cnnlstm_fast.backends import RecurrenceSpec
from cnnlstm_fast.ops.recurrence import recurrence

from test_reference import make_args


def test_cuda_backend_reports_why_not_without_a_gpu():
    report = backends.backend_report()
    assert "cuda" in report
    if not torch.cuda.is_available():
        assert report["cuda"] is not None and report["cuda"]
        assert "cuda" not in clf.available_backends()
        with pytest.raises(backends.BackendUnavailableError, match="'cuda' is not available"):
            clf.LSTM(3, 4, backend="cuda")(torch.randn(2, 1, 3))


def test_cuda_kernels_were_compiled_when_nvcc_was_present():
    ext = _ext.load()
    if ext is None:
        pytest.skip(f"extension not built: {_ext.load_error()}")
    info = ext.build_info()
    if not info["cuda"]:
        pytest.skip("built without nvcc")
    assert hasattr(torch.ops.cnnlstm_fast, "recurrence_forward")
    # the op has a CUDA kernel registered even on a machine without a GPU
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "cnnlstm_fast::recurrence_forward", "CUDA"
    )


def _run(backend, spec, bs, tensors, device, dtype):
    moved = [None if v is None else v.detach().to(device, dtype).requires_grad_(True) for v in tensors]
    spec = RecurrenceSpec(**{**spec.__dict__, "device": torch.device(device), "dtype": dtype})
    y, h, c = recurrence(backends.get_backend(backend), spec, *moved, batch_sizes=bs)
    outs = [y, h] + ([c] if c is not None else [])
    gen = torch.Generator(device="cpu").manual_seed(5)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(device)).sum() for o in outs)
    loss.backward()
    return [o.detach().double().cpu() for o in outs], [
        None if v is None else v.grad.double().cpu() for v in moved
    ]


GPU_CASES = [
    ("lstm", 64, 0, False, None),
    ("lstm", 96, 48, True, None),
    ("lstm", 33, 0, False, [5, 5, 3, 2, 2, 1]),
    ("gru", 64, 0, True, [5, 4, 4, 2, 1, 1]),
    ("gru", 130, 0, False, None),
    ("rnn_tanh", 40, 0, True, None),
    ("rnn_relu", 17, 0, False, [5, 3, 3, 1, 1, 1]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["step", "persistent", "auto"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_matches_reference_fp32(case, kernel, monkeypatch):
    monkeypatch.setenv("CNNLSTM_FAST_CUDA_KERNEL", kernel)
    cell, hidden, proj, reverse, sizes = case
    if kernel == "persistent" and proj:
        pytest.skip("the persistent kernel has no projection")
    spec, bs, tensors = make_args(cell, hidden, proj, reverse, sizes, dtype=torch.float64,
                                  batch=5, steps=6)
    ref_out, ref_grads = _run("reference", spec, bs, tensors, "cpu", torch.float64)
    out, grads = _run("cuda", spec, bs, tensors, "cuda", torch.float32)
    for a, e in zip(out, ref_out):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    for a, e in zip(grads, ref_grads):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
@pytest.mark.parametrize("size", [(16, 256, 768, 768), (1, 64, 32, 2048), (256, 32, 128, 256)])
def test_cuda_low_precision_error_within_twice_torch(cls_name, dtype, size):
    """Error against an fp64 reference at most 2x torch.nn's (cuDNN's) in the same dtype."""
    batch, steps, inp, hidden = size
    ours = getattr(clf, cls_name)(inp, hidden, backend="cuda").cuda()
    theirs = getattr(torch.nn, cls_name)(inp, hidden).cuda()
    theirs.load_state_dict(ours.state_dict())
    exact = getattr(torch.nn, cls_name)(inp, hidden).double()
    exact.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    x = torch.randn(steps, batch, inp)
    ref = exact(x.double())[0]
    err_ours = (ours.to(dtype)(x.cuda().to(dtype))[0].double().cpu() - ref).abs().max()
    err_torch = (theirs.to(dtype)(x.cuda().to(dtype))[0].double().cpu() - ref).abs().max()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


@pytest.mark.gpu
def test_cuda_module_parity_bidirectional_packed():
    from torch.nn.utils.rnn import pack_padded_sequence

    ours = clf.LSTM(12, 24, num_layers=2, bidirectional=True, backend="cuda").cuda()
    theirs = torch.nn.LSTM(12, 24, num_layers=2, bidirectional=True).cuda()
    theirs.load_state_dict(ours.state_dict())
    x = pack_padded_sequence(torch.randn(9, 4, 12).cuda(), torch.tensor([9, 3, 7, 1]),
                             enforce_sorted=False)
    a, b = ours(x), theirs(x)
    torch.testing.assert_close(a[0].data, b[0].data, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[1][0], b[1][0], rtol=1e-4, atol=1e-5)
