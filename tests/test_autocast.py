"""torch.autocast with inputs and states of different dtypes, against torch.nn.

Under CPU autocast torch.nn accepts an input and an h0/c0 of different dtypes (a model
whose h0 comes from a Linear "bridge" under autocast, speechbrain's attentional
decoder). What it returns follows from where its ops are lowered: the LSTM oneDNN runs,
RNN and RNNCell are lowered whole (everything in the autocast dtype); GRU, GRUCell,
LSTMCell and the packed or projected LSTM run torch's own loop, whose matmuls are
lowered and whose state update follows type promotion. Every combination here is run
on torch.nn first: where it raises, ours must raise the same exception type; where it
returns, ours must return the same dtypes, values no further from a float64 run than
twice torch's own error, and gradients likewise."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import cnnlstm_fast as clf
from helpers import leaves, module_backends

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
BACKENDS = [*module_backends(), "auto"]
KINDS = [("LSTM", {}, False), ("LSTM", {}, True), ("LSTM", {"proj_size": 3}, False),
         ("LSTM", {"proj_size": 3}, True), ("GRU", {}, False), ("GRU", {}, True),
         ("RNN", {}, False), ("RNN", {"nonlinearity": "relu"}, True),
         ("LSTMCell", {}, False), ("GRUCell", {}, False), ("RNNCell", {}, False)]
IDS = [f"{c}{'-proj' if kw else ''}{'-packed' if p else ''}" for c, kw, p in KINDS]
I, H, B, T = 4, 5, 3, 6


def _call(module, cls_name, packed, x, hx, autocast):
    """(outputs, gradients of x, hx and the parameters) of one call, or the exception."""
    x = x.detach().clone().requires_grad_()
    hx = [h.detach().clone().requires_grad_() for h in hx]
    module.zero_grad(set_to_none=True)
    state = (tuple(hx) if len(hx) == 2 else hx[0])
    try:
        with torch.autocast("cpu", dtype=autocast or BF16, enabled=autocast is not None):
            inp = x
            if packed:
                inp = pack_padded_sequence(x, torch.tensor([T, 2, 1]), enforce_sorted=False)
            outs = leaves(module(inp, state))
    except Exception as exc:  # noqa: BLE001 - compared with what torch raises
        return exc
    gen = torch.Generator().manual_seed(5)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    grads = [x.grad, *(h.grad for h in hx), *(p.grad for p in module.parameters())]
    return [o.detach() for o in outs], grads


def _inputs(cls_name, module, x_dtype, h_dtype, c_dtype):
    cell = cls_name.endswith("Cell")
    x = torch.randn((B, I) if cell else (T, B, I)).to(x_dtype)
    lead = () if cell else (1,)
    out = getattr(module, "proj_size", 0) or H
    hx = [torch.randn(*lead, B, out).to(h_dtype)]
    if cls_name.startswith("LSTM"):
        hx.append(torch.randn(*lead, B, H).to(c_dtype))
    return x, hx


def _error(got, exact):
    scale = exact.double().abs().max().clamp_min(1)
    return ((got.double() - exact.double()).abs().max() / scale).item()


COMBOS = [(a, x, h, c) for a, x, h, c in itertools.product((BF16, None), (F32, BF16), (F32, BF16), (F32, BF16))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,kwargs,packed", KINDS, ids=IDS)
def test_mixed_input_and_state_dtypes_follow_torch_nn(backend, cls_name, kwargs, packed):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls_name)(I, H, **kwargs)
    ours = getattr(clf, cls_name)(I, H, **kwargs, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    exact = getattr(torch.nn, cls_name)(I, H, **kwargs).double()
    exact.load_state_dict(theirs.state_dict())
    checked = 0
    for autocast, x_dtype, h_dtype, c_dtype in COMBOS:
        if not cls_name.startswith("LSTM") and c_dtype != F32:
            continue
        what = f"autocast={autocast} x={x_dtype} h0={h_dtype} c0={c_dtype}"
        x, hx = _inputs(cls_name, theirs, x_dtype, h_dtype, c_dtype)
        want = _call(theirs, cls_name, packed, x, hx, autocast)
        got = _call(ours, cls_name, packed, x, hx, autocast)
        if isinstance(want, Exception):
            assert isinstance(got, Exception), f"{what}: torch.nn raised {want!r}, ours returned"
            assert type(got) is type(want), f"{what}: raised {got!r}, torch.nn {want!r}"
            continue
        if isinstance(got, Exception) and backend == "cpu" and "cannot run" in str(got):
            # a named backend that cannot compute in that dtype says so (cpu: float32/64)
            continue
        assert not isinstance(got, Exception), f"{what}: torch.nn returned, ours raised {got!r}"
        reference = _call(exact, cls_name, packed, x.double(), [h.double() for h in hx], None)
        (outs_o, grads_o), (outs_t, grads_t), (outs_e, grads_e) = got, want, reference
        assert [o.dtype for o in outs_o] == [o.dtype for o in outs_t], what
        pairs = [("output", o, t, e) for o, t, e in zip(outs_o, outs_t, outs_e)]
        names = ["x", *(f"hx[{i}]" for i in range(len(hx))), *(n for n, _ in ours.named_parameters())]
        pairs += [(f"grad of {n}", o, t, e) for n, o, t, e in zip(names, grads_o, grads_t, grads_e)]
        for name, o, t, e in pairs:
            assert o.dtype == t.dtype, f"{what}: {name} dtype {o.dtype}, torch.nn {t.dtype}"
            # twice torch's error, or a unit in the last place of the returned dtype at
            # the tensor's scale (both round their result to it once)
            ours_err, torch_err = _error(o, e), _error(t, e)
            floor = max(1e-5, torch.finfo(t.dtype).eps)
            assert ours_err <= max(2 * torch_err, floor), (
                f"{what}: {name} error {ours_err:.2e} vs torch.nn's {torch_err:.2e}")
        checked += 1
    assert checked, "no combination ran: the test checks nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_reported_gru_with_a_bfloat16_h0_under_autocast(backend):
    """The issue's example: GRU with float32 input and a bfloat16 h0 under CPU autocast
    returns bfloat16, as torch.nn's."""
    ref = torch.nn.GRU(6, 8, batch_first=True)
    gru = clf.GRU(6, 8, batch_first=True, backend=backend)
    gru.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(3, 10, 6), torch.randn(1, 3, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x, h0), gru(x, h0)  # every backend: computed in float32
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.bfloat16] * 2
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0.05, atol=0.05)
