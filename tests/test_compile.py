"""torch.compile sees through our layers: the compiled ops (with their fake
implementations) trace without graph breaks, and compiled results match eager.

Dynamo refuses to trace any nn.RNNBase subclass unless
``torch._dynamo.config.allow_rnn`` is set (torch.nn's own layers then graph-break and
run eagerly); ours are such subclasses, so the tests set it, as the README says to."""

from __future__ import annotations

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast import backends

needs_cpu = pytest.mark.skipif(
    backends.backend_report().get("cpu") is not None, reason="cpu backend (the _C extension) not built"
)


def _fwd_bwd(model, x):
    x = x.detach().clone().requires_grad_(True)
    y, _ = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@needs_cpu
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_compiled_cpu_backend_matches_eager_without_graph_breaks(cls_name):
    torch._dynamo.reset()
    model = getattr(clf, cls_name)(5, 7, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(6, 3, 5)
    eager = _fwd_bwd(model, x)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        got = _fwd_bwd(compiled, x)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_reference_backend_matches_eager():
    torch._dynamo.reset()
    model = clf.GRU(4, 5, backend="reference")
    x = torch.randn(3, 2, 4)
    eager = _fwd_bwd(model, x)
    model.zero_grad(set_to_none=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        got = _fwd_bwd(torch.compile(model, backend="aot_eager"), x)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-6)
