"""What users do with our layers on a GPU, against torch.nn (cuDNN) in the same test:
mixed precision (autocast) training, torch.compile with the cuda ops, a swapped
CNN-LSTM's training step. GPU only (the CPU versions are in test_rnn_api.py,
test_compile.py and test_models.py).

Reduced precision follows docs/design.md#testing: each output's and gradient's error against
float64 at most twice torch.nn's in the same run (plus 1e-3 relative: bf16's eps is 7.8e-3, and
a tensor where cuDNN happens to land very close must not make a correct kernel fail)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cnnlstm_fast as clf
from cnnlstm_fast.models import CNNLSTM
from helpers import errors_vs_exact

pytestmark = pytest.mark.gpu


def _step(model, x, autocast=None, seed=7):
    """Outputs, input gradient and parameter gradients of one backward of a fixed
    random cotangent; the forward under ``autocast`` (a dtype) if given, the backward
    outside it, as torch's AMP recipe runs them."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
        y = model(x)[0]
    gen = torch.Generator().manual_seed(seed)
    cot = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
    (y.double() * cot).sum().backward()
    return [y.detach(), x.grad, *(p.grad for p in model.parameters())]


def _cpu_fp64(tensors):
    return [None if t is None else t.detach().double().cpu() for t in tensors]


@pytest.mark.parametrize("backend", ["auto", "cuda"])
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_gpu_autocast_training_step_follows_torch_nn(cls_name, backend):
    """``auto`` is what users get (today training on CUDA runs torch.nn's path through
    our module, 40 steps being short of AUTO_MIN_STEPS: this checks our wrapper's dtype
    handling under autocast); ``cuda`` runs our kernels in bfloat16."""
    kwargs = dict(input_size=64, hidden_size=96, num_layers=2, bidirectional=True)
    ours = getattr(clf, cls_name)(**kwargs, backend=backend).cuda()
    theirs = getattr(nn, cls_name)(**kwargs).cuda()
    theirs.load_state_dict(ours.state_dict())
    exact = getattr(nn, cls_name)(**kwargs).double()
    exact.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    x = torch.randn(40, 8, 64)
    got = _step(ours, x.cuda(), autocast=torch.bfloat16)
    want = _step(theirs, x.cuda(), autocast=torch.bfloat16)
    ref = _step(exact, x.double())
    assert got[0].dtype == want[0].dtype  # bfloat16, as autocast makes torch.nn's
    # parameters and their gradients stay float32 (what an optimizer and GradScaler see)
    assert [g.dtype for g in got[2:]] == [g.dtype for g in want[2:]] == [torch.float32] * len(got[2:])
    names = ["y", "dx", *(n for n, _ in ours.named_parameters())]
    e_ours = errors_vs_exact(names, _cpu_fp64(got), ref)
    e_torch = errors_vs_exact(names, _cpu_fp64(want), ref)
    worse = {n: (e_ours[n], e_torch[n]) for n in names if e_ours[n] > 2 * e_torch[n] + 1e-3}
    assert not worse, f"errors vs float64 (ours, torch.nn): {worse}"


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_gpu_compiled_cuda_backend_matches_eager(cls_name):
    """torch.compile (inductor, fullgraph, allow_rnn) around the cuda ops: the graph
    calls our ops through their fakes' shapes, and the result is eager's (fp32, IEEE)."""
    torch._dynamo.reset()
    model = getattr(clf, cls_name)(24, 40, num_layers=2, bidirectional=True,
                                   backend="cuda").cuda()
    x = torch.randn(30, 5, 24, device="cuda")
    eager = _step(model, x)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = _step(torch.compile(model, fullgraph=True), x)
    for name, a, b in zip(["y", "dx", *(n for n, _ in model.named_parameters())], compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_gpu_swapped_cnnlstm_training_step_matches_torch_nn(rnn):
    """A CNN-LSTM built from torch.nn layers, swapped to the cuda backend: one training
    step (dropout off, BatchNorm in training mode) gives torch.nn's loss, gradients and
    updated weights (fp32, IEEE)."""
    model = CNNLSTM(6, 5, conv_channels=(16, 32), rnn=rnn, hidden_size=48, attention=True,
                    dropout=0.0, backend="torch").cuda()
    clf.unswap(model)
    assert type(model.rnn) in (nn.LSTM, nn.GRU)
    fast = clf.swap(copy.deepcopy(model), backend="cuda")
    assert fast.rnn.backend == "cuda" and isinstance(fast.rnn, (clf.LSTM, clf.GRU))
    x = torch.randn(4, 50, 6, device="cuda")
    target = torch.randint(0, 5, (4,), device="cuda")
    results = []
    for m in (model, fast):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loss = m.loss(m(x), target)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        results.append((loss.detach(), grads, {n: p.detach().clone() for n, p in m.named_parameters()}))
    (loss_a, grads_a, after_a), (loss_b, grads_b, after_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(after_b[name], after_a[name], rtol=1e-4, atol=1e-5, msg=name)
