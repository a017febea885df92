"""The ``cpu`` backend (csrc/cpu) against the ``reference`` backend and torch.nn.

Op level: forward outputs, saved state and backward of the C++ recurrence equal the
reference's on the same random inputs; gradients through the autograd op; fp64
gradcheck; torch.library.opcheck of the ops (schema, fake, dispatch). Module level:
odd shapes, packed sequences and 1 vs 2 threads against torch.nn (the full module
parity matrix is tests/test_rnn_parity.py).
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import cnnlstm_fast as clf
from cnnlstm_fast.backends import BackendUnavailableError, get_backend
from cnnlstm_fast.backends.base import GATES, RecurrenceSpec
from cnnlstm_fast.ops.recurrence import recurrence

from helpers import assert_as_accurate_as

CPU = get_backend("cpu")
REF = get_backend("reference")
pytestmark = pytest.mark.skipif(
    CPU.unavailable_reason() is not None, reason=f"cpu backend: {CPU.unavailable_reason()}"
)

TOL = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}

# (cell, proj_size, with b_hn)
CELLS = [
    ("lstm", 0, False),
    ("lstm", 3, False),
    ("gru", 0, True),
    ("gru", 0, False),
    ("rnn_tanh", 0, False),
    ("rnn_relu", 0, False),
]
CELL_IDS = ["lstm", "lstm_proj", "gru", "gru_nobias", "rnn_tanh", "rnn_relu"]


@contextlib.contextmanager
def num_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def assert_close(name, actual, expected, dtype):
    if expected is None:
        assert actual is None, f"{name}: expected None, got a tensor"
        return
    assert actual is not None, f"{name}: expected a tensor, got None"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def make_inputs(cell, proj, with_b_hn, dtype, steps, batch, hidden, lengths=None, reverse=False):
    gates = GATES[cell]
    out = proj or hidden
    spec = RecurrenceSpec(
        cell, hidden, proj, reverse, torch.device("cpu"), dtype, batch, steps, lengths is not None
    )
    rand = lambda *shape, scale=1.0: torch.randn(*shape, dtype=dtype) * scale  # noqa: E731
    batch_sizes = None
    if lengths is not None:
        lengths = torch.tensor(sorted(lengths, reverse=True))
        batch_sizes = (lengths[None, :] > torch.arange(steps)[:, None]).sum(1)
    args = dict(
        gx=rand(steps, batch, gates * hidden),
        h0=rand(batch, out),
        c0=rand(batch, hidden) if cell == "lstm" else None,
        w_hh=rand(gates * hidden, out, scale=0.4),
        w_hr=rand(out, hidden, scale=0.4) if proj else None,
        b_hn=rand(hidden) if with_b_hn else None,
        batch_sizes=batch_sizes,
    )
    return spec, args


def call_forward(backend, spec, a, need_saved=True):
    return backend.forward(
        spec, a["gx"], a["h0"], a["c0"], a["w_hh"], a["w_hr"], a["b_hn"], a["batch_sizes"],
        need_saved,
    )


SHAPES = [  # (steps, batch, hidden, lengths)
    (5, 4, 7, None),
    (6, 5, 13, [6, 1, 4, 6, 2]),
    (1, 1, 1, None),
    (4, 3, 1, [1, 4, 2]),
    (7, 1, 13, None),
    # More rows than the GEMM's few-rows threshold (32) at some steps only.
    (4, 37, 5, [4] * 20 + [3] * 10 + [1] * 7),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}B{s[1]}H{s[2]}{'var' if s[3] else ''}")
@pytest.mark.parametrize("cell,proj,with_b_hn", CELLS, ids=CELL_IDS)
def test_forward_backward_match_reference(cell, proj, with_b_hn, shape, reverse, dtype):
    steps, batch, hidden, lengths = shape
    spec, a = make_inputs(cell, proj, with_b_hn, dtype, steps, batch, hidden, lengths, reverse)
    ours, ref = call_forward(CPU, spec, a), call_forward(REF, spec, a)
    for name, x, y in zip(("y", "h_T", "c_T"), ours[:3], ref[:3]):
        assert_close(name, x, y, dtype)
    for name, x, y in zip(("act", "h_prev", "extra", "w_hh", "w_hr"), ours[3], ref[3]):
        assert_close(f"saved {name}", x, y, dtype)

    out = proj or hidden
    d_y = torch.randn(steps, batch, out, dtype=dtype)
    d_hT = torch.randn(batch, out, dtype=dtype)
    d_cT = torch.randn(batch, hidden, dtype=dtype) if cell == "lstm" else None
    grads = CPU.backward(spec, ours[3], a["batch_sizes"], d_y, d_hT, d_cT)
    expected = REF.backward(spec, ref[3], a["batch_sizes"], d_y, d_hT, d_cT)
    names = ("d_gx", "dh0", "dc0", "d_w_hh", "d_w_hr", "d_b_hn")
    if dtype == torch.float64:
        for name, x, y in zip(names, grads, expected):
            assert_close(name, x, y, dtype)
        return
    # float32: the weight gradients are sums over all steps and rows, whose rounding
    # depends on the summation order (rnn_relu T6B5H13var-rev: dW_hh 2.7e-5 apart), so
    # every gradient is judged against the fp64 reference on the same inputs: its error
    # at most twice the fp32 reference's, plus the fp32 rtol of docs/design.md#testing (1e-5).
    spec64 = dataclasses.replace(spec, dtype=torch.float64)
    a64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in a.items()}
    exact = REF.backward(spec64, call_forward(REF, spec64, a64)[3], a["batch_sizes"], d_y.double(),
                         d_hT.double(), None if d_cT is None else d_cT.double())
    for name, x, e in zip(names, grads, exact):
        assert (x is None) == (e is None), name
    assert_as_accurate_as(names, grads, expected, exact)


@pytest.mark.parametrize("cell,proj,with_b_hn", CELLS, ids=CELL_IDS)
def test_forward_without_saved_state(cell, proj, with_b_hn):
    spec, a = make_inputs(cell, proj, with_b_hn, torch.float32, 6, 5, 13, [6, 1, 4, 6, 2])
    ours, ref = call_forward(CPU, spec, a, need_saved=False), call_forward(REF, spec, a)
    assert ours[3] == ()
    for name, x, y in zip(("y", "h_T", "c_T"), ours[:3], ref[:3]):
        assert_close(name, x, y, torch.float32)


def _autograd_grads(backend, spec, a):
    leaves = {k: v.clone().requires_grad_() for k, v in a.items() if k != "batch_sizes" and v is not None}
    args = {**a, **leaves}
    y, h_t, c_t = recurrence(
        backend, spec, args["gx"], args["h0"], args["c0"], args["w_hh"], args["w_hr"],
        args["b_hn"], args["batch_sizes"],
    )
    torch.manual_seed(1)
    loss = (y * torch.randn_like(y)).sum() + (h_t * torch.randn_like(h_t)).sum()
    if c_t is not None:
        loss = loss + (c_t * torch.randn_like(c_t)).sum()
    loss.backward()
    return (y, h_t, c_t), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj,with_b_hn", CELLS, ids=CELL_IDS)
def test_autograd_op_matches_reference(cell, proj, with_b_hn, reverse):
    spec, a = make_inputs(cell, proj, with_b_hn, torch.float32, 5, 4, 7, [5, 2, 5, 1], reverse)
    outs, grads = _autograd_grads(CPU, spec, a)
    ref_outs, ref_grads = _autograd_grads(REF, spec, a)
    for name, x, y in zip(("y", "h_T", "c_T"), outs, ref_outs):
        assert_close(name, x, y, torch.float32)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(f"grad {name}", grads[name], ref_grads[name], torch.float32)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj,with_b_hn", CELLS, ids=CELL_IDS)
def test_gradcheck_fp64(cell, proj, with_b_hn, reverse):
    spec, a = make_inputs(cell, proj, with_b_hn, torch.float64, 3, 3, 2, [3, 1, 2], reverse)
    names = [k for k in ("gx", "h0", "c0", "w_hh", "w_hr", "b_hn") if a[k] is not None]

    def fn(*tensors):
        args = {**a, **dict(zip(names, tensors))}
        y, h_t, c_t = recurrence(
            CPU, spec, args["gx"], args["h0"], args["c0"], args["w_hh"], args["w_hr"],
            args["b_hn"], args["batch_sizes"],
        )
        return (y, h_t) if c_t is None else (y, h_t, c_t)

    inputs = tuple(a[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("cell,proj,with_b_hn", CELLS, ids=CELL_IDS)
def test_opcheck(cell, proj, with_b_hn):
    spec, a = make_inputs(cell, proj, with_b_hn, torch.float32, 3, 3, 5, [3, 1, 2])
    args = (
        cell, a["gx"], a["h0"], a["c0"], a["w_hh"], a["w_hr"], a["b_hn"], a["batch_sizes"],
        False, True,
    )
    torch.library.opcheck(torch.ops.cnnlstm_fast.recurrence_forward.default, args)
    _, _, _, act, h_prev, extra = torch.ops.cnnlstm_fast.recurrence_forward(*args)
    extra = extra if cell in ("lstm", "gru") else None
    out = proj or 5
    back = (
        cell, act, h_prev, extra, a["w_hh"], a["w_hr"], a["batch_sizes"], False,
        torch.randn(3, 3, out), torch.randn(3, out),
        torch.randn(3, 5) if cell == "lstm" else None,
    )
    torch.library.opcheck(torch.ops.cnnlstm_fast.recurrence_backward.default, back)


def test_results_do_not_depend_on_thread_count():
    spec, a = make_inputs("lstm", 0, False, torch.float32, 6, 9, 37, [6, 6, 5, 5, 3, 3, 2, 1, 1])
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            results.append(_autograd_grads(CPU, spec, a))
    (outs1, grads1), (outs2, grads2) = results
    for name, x, y in zip(("y", "h_T", "c_T"), outs1, outs2):
        assert_close(name, x, y, torch.float32)
    for name in grads1:
        assert_close(f"grad {name}", grads1[name], grads2[name], torch.float32)


def test_unsupported_dtype_and_device_are_named():
    spec, _ = make_inputs("lstm", 0, False, torch.float32, 2, 2, 3)
    assert CPU.unsupported_reason(spec) is None
    assert "bfloat16" in CPU.unsupported_reason(dataclasses.replace(spec, dtype=torch.bfloat16))
    assert "cuda" in CPU.unsupported_reason(dataclasses.replace(spec, device=torch.device("cuda")))
    lstm = clf.LSTM(3, 4, backend="cpu").to(torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="float32 or float64"):
        lstm(torch.randn(2, 1, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="float32 and float64"):
        torch.ops.cnnlstm_fast.recurrence_forward(
            "rnn_tanh", torch.randn(2, 1, 3).half(), torch.randn(1, 3).half(), None,
            torch.randn(3, 3).half(), None, None, None, False, False,
        )


# ---- modules against torch.nn ------------------------------------------------------

MODULES = [  # (class name, kwargs)
    ("LSTM", dict(hidden_size=13, num_layers=2, bidirectional=True)),
    ("LSTM", dict(hidden_size=7, proj_size=3, num_layers=3)),
    ("LSTM", dict(hidden_size=1, bidirectional=True)),
    ("GRU", dict(hidden_size=13, num_layers=2, bidirectional=True)),
    ("GRU", dict(hidden_size=7, bias=False, num_layers=2)),
    ("RNN", dict(hidden_size=7, nonlinearity="tanh", bidirectional=True)),
    ("RNN", dict(hidden_size=13, nonlinearity="relu", num_layers=2)),
]
MODULE_IDS = ["lstm_bi2", "lstm_proj3", "lstm_h1_bi", "gru_bi2", "gru_nobias", "rnn_tanh_bi", "rnn_relu2"]


def _module_pair(name, kwargs, dtype, input_size=5):
    torch.manual_seed(0)
    base = getattr(torch.nn, name)(input_size, dtype=dtype, **kwargs)
    ours = getattr(clf, name)(input_size, dtype=dtype, backend="cpu", **kwargs)
    ours.load_state_dict(base.state_dict())
    return base, ours


def _run_module(module, x, hx, lengths):
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, state = module(inp, hx if len(hx) == 2 else hx[0])
    if lengths is not None:
        out, _ = pad_packed_sequence(out)
    state = state if isinstance(state, tuple) else (state,)
    torch.manual_seed(1)
    loss = (out * torch.randn_like(out)).sum() + sum((s * torch.randn_like(s)).sum() for s in state)
    loss.backward()
    grads = {"input": x.grad, **{f"hx{i}": h.grad for i, h in enumerate(hx)}}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return (out, *state), grads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name,kwargs", MODULES, ids=MODULE_IDS)
def test_module_matches_torch_nn(name, kwargs, packed, dtype, threads):
    base, ours = _module_pair(name, kwargs, dtype)
    steps, batch = 6, 5
    lengths = torch.tensor([3, 6, 1, 4, 6]) if packed else None
    x = torch.randn(steps, batch, 5, dtype=dtype)
    d = 2 if ours.bidirectional else 1
    out = ours.proj_size or ours.hidden_size
    hx = [torch.randn(ours.num_layers * d, batch, out, dtype=dtype)]
    if name == "LSTM":
        hx.append(torch.randn(ours.num_layers * d, batch, ours.hidden_size, dtype=dtype))
    with num_threads(threads):
        got, got_grads = _run_module(ours, x, hx, lengths)
        want, want_grads = _run_module(base, x, hx, lengths)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=5e-6)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, i=i: f"output {i}: {m}")
    assert got_grads.keys() == want_grads.keys()
    for key in got_grads:
        torch.testing.assert_close(
            got_grads[key], want_grads[key], **tol, msg=lambda m, key=key: f"grad {key}: {m}"
        )


@pytest.mark.parametrize("steps,batch", [(1, 1), (1, 4), (9, 1)])
def test_module_degenerate_shapes(steps, batch):
    base, ours = _module_pair("LSTM", dict(hidden_size=7), torch.float32, input_size=3)
    x = torch.randn(steps, batch, 3)
    hx = [torch.randn(1, batch, 7), torch.randn(1, batch, 7)]
    got, got_grads = _run_module(ours, x, hx, None)
    want, want_grads = _run_module(base, x, hx, None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=5e-6)
    for key in got_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-5, atol=5e-6)
