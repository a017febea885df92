"""Packed input in training on the cpu backend (``packed_rows``): G_x, Y, the saved
activations, dY and dG_x stay in the PackedSequence's rows, never padded to (T, B, .) and
packed back per layer and direction, and forward, backward and the second derivative
still match torch.nn."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import cnnlstm_fast as clf
from cnnlstm_fast.backends import cpu as cpu_backend
from cnnlstm_fast.backends import get_backend
from cnnlstm_fast.nn import rnn as rnn_module

from helpers import assert_close

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.unavailable_reason() is not None,
                                reason=f"cpu backend: {CPU.unavailable_reason()}")


@pytest.mark.parametrize("order", list(cpu_backend.DIRECTIONS))
@pytest.mark.parametrize("name,kwargs", [
    ("LSTM", dict(proj_size=4)),
    ("LSTM", dict(hidden_size=64)),  # the persistent path's sizes
    ("GRU", dict(bidirectional=False)),
    ("RNN", dict(nonlinearity="relu")),
], ids=["lstm_proj", "lstm_64", "gru_uni", "rnn_relu"])
def test_packed_training_stays_in_packed_rows(monkeypatch, order, name, kwargs):
    seen = []
    forward, forward_directions = type(CPU).forward, type(CPU).forward_directions

    def spy(self, spec, gx, *args):
        seen.append(gx.dim())
        return forward(self, spec, gx, *args)

    def spy_directions(self, specs, gx, *args):
        seen.extend(g.dim() for g in gx)
        return forward_directions(self, specs, gx, *args)

    def never(*_):
        raise AssertionError("packed rows were padded or packed back")

    monkeypatch.setattr(type(CPU), "forward", spy)
    monkeypatch.setattr(type(CPU), "forward_directions", spy_directions)
    monkeypatch.setattr(rnn_module._PackedLayout, "to_padded", never)
    monkeypatch.setattr(rnn_module._PackedLayout, "to_packed", never)
    kw = dict(dict(hidden_size=9, num_layers=2, bidirectional=True, batch_first=True), **kwargs)
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(6, **kw).double()
    ours = getattr(clf, name)(6, **kw, backend="cpu").double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 8, 6, dtype=torch.float64)
    lengths = torch.tensor([8, 3, 5, 1, 8])

    def run(module):
        inp = x.clone().requires_grad_()
        y, state = module(pack_padded_sequence(inp, lengths, batch_first=True,
                                               enforce_sorted=False))
        states = state if isinstance(state, tuple) else (state,)
        loss = y.data.square().sum() + sum(s.square().sum() for s in states)
        grads = torch.autograd.grad(loss, [inp, *module.parameters()], create_graph=True)
        # a second derivative: the gradient penalty's gradient with respect to the input
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), [inp])
        return [y.data, *states, *grads, *second]

    with cpu_backend.use_directions(order):
        got = run(ours)
    want = run(theirs)
    assert seen and all(d == 2 for d in seen), seen
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, rtol=1e-8, atol=1e-9, what=f"{name} tensor {i}")


def test_packed_rows_ops_opcheck():
    """The ops with packed rows (G_x (N, G), batch sizes 3, 2, 2, 1) pass opcheck, fakes
    included."""
    op = torch.ops.cnnlstm_fast
    bs = torch.tensor([3, 2, 2, 1])
    gx, h0, c0, w_hh = torch.randn(8, 24), torch.randn(3, 6), torch.randn(3, 6), torch.randn(24, 6)
    args = ("lstm", gx, h0, c0, w_hh, None, None, bs, True, True)
    torch.library.opcheck(op.recurrence_forward, args)
    y, h, c, act, h_prev, extra = op.recurrence_forward(*args)
    assert y.shape == (8, 6) and act.shape == (8, 24) and h_prev.shape == (8, 6)
    torch.library.opcheck(op.recurrence_backward,
                          ("lstm", act, h_prev, extra, w_hh, None, bs, True, torch.randn(8, 6),
                           torch.randn(3, 6), torch.randn(3, 6)))
    with pytest.raises(RuntimeError, match=r"d_y must have shape \[8, 6\], got \[4, 2, 6\]"):
        op.recurrence_backward("lstm", act, h_prev, extra, w_hh, None, bs, True,
                               torch.randn(4, 2, 6), torch.randn(3, 6), torch.randn(3, 6))
