"""Empty extents as torch.nn has them (issue 22): batch 0, input_size 0, hidden_size 0
and no steps, for the layers and the cells on every backend that runs on CPU tensors.

Where torch.nn computes (a cell of hidden_size 0 returns a (B, 0) state; a layer takes a
batch of 0), we return what it returns, in its shapes and dtypes, and the same gradients
(of the input, of hx, of every parameter: empty tensors where the parameter is empty,
never None). Where torch.nn raises (no steps; a layer of input_size or hidden_size 0),
we raise the same error type with the same message. PyTorch's own test of the first
case is test_RNN_cell_forward_zero_hidden_size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import cnnlstm_fast as clf
from cnnlstm_fast import backends
from helpers import assert_close, leaves

# Every backend that runs on CPU tensors here (triton in Triton's interpreter), and auto.
BACKENDS = [n for n in ("reference", "cpu", "triton") if backends.backend_report().get(n) is None]
BACKENDS.append("auto")

# (torch.nn class, extra constructor kwargs, id)
CELLS = [
    ("LSTMCell", {}, "LSTMCell"),
    ("GRUCell", {}, "GRUCell"),
    ("RNNCell", {"nonlinearity": "tanh"}, "RNNCell(tanh)"),
    ("RNNCell", {"nonlinearity": "relu"}, "RNNCell(relu)"),
]
LAYERS = [
    ("LSTM", {}, "LSTM"),
    ("LSTM", {"proj_size": 2}, "LSTM(proj_size=2)"),
    ("GRU", {}, "GRU"),
    ("RNN", {"nonlinearity": "tanh"}, "RNN(tanh)"),
    ("RNN", {"nonlinearity": "relu"}, "RNN(relu)"),
]

# which extent of a cell's call is empty: (input_size, hidden_size, batch)
CELL_EXTENTS = {
    "hidden_size 0": (3, 0, 2),
    "input_size 0": (0, 4, 2),
    "batch 0": (3, 4, 0),
    "input_size and hidden_size 0": (0, 0, 2),
    "batch and hidden_size 0": (3, 0, 0),
    "batch and input_size 0": (0, 4, 0),
}

# the dtypes each backend computes in on CPU tensors (triton: float32, float16, bfloat16)
DTYPES = {"reference": (torch.float32, torch.float64), "cpu": (torch.float32, torch.float64),
          "triton": (torch.float32,), "auto": (torch.float32, torch.float64)}

RTOL, ATOL = 1e-5, 1e-6


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - we compare whatever torch raises
        return type(exc), str(exc)
    return None


def _pair(cls_name, backend, dtype=torch.float32, **kwargs):
    """(our module, torch.nn's) with the same weights."""
    ours = getattr(clf, cls_name)(**kwargs, backend=backend).to(dtype)
    theirs = getattr(nn, cls_name)(**kwargs).to(dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _leaves_of(hx):
    if hx is None:
        return []
    return list(hx) if isinstance(hx, tuple) else [hx]


def _fresh(x, hx):
    """Copies of the input and hx as leaves that require grad."""
    def one(t):
        return t.detach().clone().requires_grad_(True)
    if isinstance(x, PackedSequence):
        x = PackedSequence(one(x.data), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x = one(x)
    if hx is not None:
        hx = tuple(one(t) for t in hx) if isinstance(hx, tuple) else one(hx)
    return x, hx


def _run(module, x, hx, grad: bool):
    """Outputs (and with ``grad`` the gradients of the input, hx and every parameter
    after a backward of fixed random cotangents) of one call."""
    module.zero_grad(set_to_none=True)
    x, hx = _fresh(x, hx)
    with torch.set_grad_enabled(grad):
        outs = leaves(module(x, hx))
    if not grad:
        return outs, None, None
    gen = torch.Generator().manual_seed(1234)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    inputs = [x.data if isinstance(x, PackedSequence) else x] + _leaves_of(hx)
    return outs, [t.grad for t in inputs], {n: p.grad for n, p in module.named_parameters()}


def _assert_matches_torch(ours, theirs, x, hx):
    """Same outputs (values, shapes, dtypes, requires_grad) as torch.nn in inference and
    in training, and the same gradients of the input, hx and every parameter."""
    got, want = _run(ours, x, hx, grad=False)[0], _run(theirs, x, hx, grad=False)[0]
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, RTOL, ATOL, f"inference output {i}")

    got, got_in, got_params = _run(ours, x, hx, grad=True)
    want, want_in, want_params = _run(theirs, x, hx, grad=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, RTOL, ATOL, f"output {i}")
        assert a.requires_grad == b.requires_grad, f"output {i}: requires_grad"
    for i, (a, b) in enumerate(zip(got_in, want_in)):
        what = "grad of the input" if i == 0 else f"grad of hx[{i - 1}]"
        assert (a is None) == (b is None), f"{what}: {a} vs torch.nn's {b}"
        if b is not None:
            assert_close(a, b, RTOL, ATOL, what)
    assert got_params.keys() == want_params.keys()
    for name, b in want_params.items():
        a = got_params[name]
        assert (a is None) == (b is None), f"grad of {name}: {a} vs torch.nn's {b}"
        if b is not None:
            assert_close(a, b, RTOL, ATOL, f"grad of {name}")


def _cell_cases():
    for backend in BACKENDS:
        for cls_name, kwargs, cls_id in CELLS:
            for extent in CELL_EXTENTS:
                for batched in (True, False):
                    if not batched and CELL_EXTENTS[extent][2] == 0:
                        continue  # an unbatched call has no batch dimension to empty
                    for with_hx in (False, True):
                        for dtype in DTYPES[backend]:
                            yield pytest.param(
                                backend, cls_name, kwargs, extent, batched, with_hx, dtype,
                                id=f"{backend}-{cls_id}-{extent}-"
                                   f"{'batched' if batched else 'unbatched'}-"
                                   f"{'with hx' if with_hx else 'no hx'}-{str(dtype)[6:]}",
                            )


@pytest.mark.parametrize("backend,cls_name,kwargs,extent,batched,with_hx,dtype",
                         list(_cell_cases()))
def test_a_cell_with_an_empty_extent_returns_torch_nns_outputs_and_gradients(
        backend, cls_name, kwargs, extent, batched, with_hx, dtype):
    input_size, hidden_size, batch = CELL_EXTENTS[extent]
    ours, theirs = _pair(cls_name, backend, dtype, input_size=input_size,
                         hidden_size=hidden_size, **kwargs)
    lead = (batch,) if batched else ()
    x = torch.randn(*lead, input_size, dtype=dtype)
    hx = None
    if with_hx:
        states = 2 if cls_name == "LSTMCell" else 1
        hx = tuple(torch.randn(*lead, hidden_size, dtype=dtype) for _ in range(states))
        hx = hx if cls_name == "LSTMCell" else hx[0]
    _assert_matches_torch(ours, theirs, x, hx)


def test_the_issue_22_rnn_cell_of_hidden_size_0_returns_an_empty_state_on_the_cpu_backend():
    if "cpu" not in BACKENDS:
        pytest.skip(f"cpu backend: {backends.backend_report().get('cpu')}")
    out = clf.RNNCell(10, 0, backend="cpu")(torch.randn(3, 10), torch.randn(3, 0))
    assert out.shape == (3, 0) and out.dtype == torch.float32


LAYOUTS = {
    "sequence first": {},
    "batch first": {"batch_first": True},
    "two bidirectional layers": {"num_layers": 2, "bidirectional": True},
}


def _layer_hx(cls_name, module, batch, dtype):
    directions = 2 if module.bidirectional else 1
    lead = (module.num_layers * directions, *batch)
    out_size = module.proj_size or module.hidden_size
    h = torch.randn(*lead, out_size, dtype=dtype)
    return (h, torch.randn(*lead, module.hidden_size, dtype=dtype)) if cls_name == "LSTM" else h


@pytest.mark.parametrize("with_hx", [False, True], ids=["no hx", "with hx"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cls_name,kwargs", [pytest.param(c, k, id=i) for c, k, i in LAYERS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_with_an_empty_batch_returns_torch_nns_outputs_and_gradients(
        backend, cls_name, kwargs, layout, with_hx):
    # 9 steps: more than auto's minimum for a rule other than torch.nn's to be asked
    steps, batch = 9, 0
    ours, theirs = _pair(cls_name, backend, input_size=3, hidden_size=4, **kwargs,
                         **LAYOUTS[layout])
    x = torch.randn((batch, steps, 3) if ours.batch_first else (steps, batch, 3))
    hx = _layer_hx(cls_name, ours, (batch,), torch.float32) if with_hx else None
    _assert_matches_torch(ours, theirs, x, hx)


def _empty_packed():
    return PackedSequence(torch.randn(0, 3), torch.empty(0, dtype=torch.long))


# Calls torch.nn refuses, to a layer of input_size 3 and hidden_size 4: (extra constructor
# kwargs, the input, the batch of an hx to pass or None).
LAYER_ERRORS = {
    "no steps": ({}, lambda: torch.randn(0, 2, 3), None),
    "no steps, batch first": ({"batch_first": True}, lambda: torch.randn(2, 0, 3), None),
    "no steps and batch 0": ({}, lambda: torch.randn(0, 0, 3), None),
    "no steps, with hx": ({}, lambda: torch.randn(0, 2, 3), 2),
    "no steps, bidirectional": ({"bidirectional": True}, lambda: torch.randn(0, 2, 3), None),
    "no steps, unbatched": ({}, lambda: torch.randn(0, 3), None),
    "no steps, unbatched, wrong input_size": ({}, lambda: torch.randn(0, 2), None),
    "packed, no steps": ({}, _empty_packed, None),
    "batch 0, hx of batch 2": ({}, lambda: torch.randn(5, 0, 3), 2),
    "batch 0, wrong input_size": ({}, lambda: torch.randn(5, 0, 2), None),
}


@pytest.mark.parametrize("case", list(LAYER_ERRORS))
@pytest.mark.parametrize("cls_name,kwargs", [pytest.param(c, k, id=i) for c, k, i in LAYERS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_call_torch_nn_refuses_for_an_empty_extent_raises_torch_nns_error(
        backend, cls_name, kwargs, case):
    extra, make_input, hx_batch = LAYER_ERRORS[case]
    ours, theirs = _pair(cls_name, backend, input_size=3, hidden_size=4, **kwargs, **extra)
    x = make_input()
    hx = None if hx_batch is None else _layer_hx(cls_name, ours, (hx_batch,), torch.float32)
    expected = _raised(lambda: theirs(x, hx))
    assert expected is not None, "torch.nn accepted the input; the case is wrong"
    assert _raised(lambda: ours(x, hx)) == expected


@pytest.mark.parametrize("sizes", [dict(input_size=0, hidden_size=4),
                                   dict(input_size=3, hidden_size=0)],
                         ids=["input_size 0", "hidden_size 0"])
@pytest.mark.parametrize("cls_name,kwargs", [pytest.param(c, k, id=i) for c, k, i in LAYERS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_of_input_size_or_hidden_size_0_raises_torch_nns_error(
        backend, cls_name, kwargs, sizes):
    expected = _raised(lambda: getattr(nn, cls_name)(**sizes, **kwargs))
    assert expected is not None, "torch.nn accepted the sizes; the case is wrong"
    assert _raised(lambda: getattr(clf, cls_name)(**sizes, **kwargs, backend=backend)) == expected


# Cell calls torch.nn refuses: (input_size, hidden_size, input, hx states) of one case.
CELL_ERRORS = {
    "batch 0 with hx of batch 2": (3, 4, (0, 3), (2, 4)),
    "hidden_size 0 with hx of width 3": (3, 0, (2, 3), (2, 3)),
    "hidden_size 0 with hx of batch 3": (3, 0, (2, 3), (3, 0)),
    "input_size 0 with an input of width 2": (0, 4, (2, 2), None),
    "input_size 3 with an empty unbatched input": (3, 4, (0,), None),
    "input_size 0 and hidden_size 0 with hx of width 1": (0, 0, (2, 0), (2, 1)),
}


@pytest.mark.parametrize("case", list(CELL_ERRORS))
@pytest.mark.parametrize("cls_name,kwargs", [pytest.param(c, k, id=i) for c, k, i in CELLS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cell_call_torch_nn_refuses_for_an_empty_extent_raises_torch_nns_error(
        backend, cls_name, kwargs, case):
    input_size, hidden_size, x_shape, hx_shape = CELL_ERRORS[case]
    ours, theirs = _pair(cls_name, backend, input_size=input_size, hidden_size=hidden_size,
                         **kwargs)
    x = torch.randn(x_shape)
    hx = None
    if hx_shape is not None:
        hx = torch.randn(hx_shape)
        hx = (hx, torch.randn(hx_shape)) if cls_name == "LSTMCell" else hx
    expected = _raised(lambda: theirs(x, hx))
    assert expected is not None, "torch.nn accepted the input; the case is wrong"
    assert _raised(lambda: ours(x, hx)) == expected


# The backends' own ops, below the modules: the module never hands a backend a call of no
# steps (torch.nn refuses it) and gives a batch of 0 to the reference backend, but the
# contract (cnnlstm_fast/backends/base.py) has no lower bound on T, B or H.
OP_BACKENDS = [n for n in ("reference", "cpu", "triton") if n in BACKENDS]
OP_CELLS = [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]
OP_EXTENTS = {"no steps": (0, 2, 3), "batch 0": (2, 0, 3), "hidden_size 0": (2, 2, 0)}


def _op_cases():
    for backend in OP_BACKENDS:
        for cell, proj in OP_CELLS:
            for extent, (steps, batch, hidden) in OP_EXTENTS.items():
                if proj and hidden == 0:
                    continue  # proj_size must be smaller than hidden_size
                for reverse in (False, True):
                    for variable_lengths in (False, True):
                        if variable_lengths and batch == 0:
                            continue  # a packed batch has at least one sequence
                        yield pytest.param(
                            backend, cell, proj, extent, reverse, variable_lengths,
                            id=f"{backend}-{cell}{'-proj' if proj else ''}-{extent}-"
                               f"{'reverse' if reverse else 'forward'}-"
                               f"{'variable lengths' if variable_lengths else 'padded'}",
                        )


@pytest.mark.parametrize("backend,cell,proj,extent,reverse,variable_lengths", list(_op_cases()))
def test_a_backends_recurrence_op_of_an_empty_extent_passes_the_state_through(
        backend, cell, proj, extent, reverse, variable_lengths):
    """Nothing to compute: Y is empty, h_T = h0 and c_T = c0; dG_x is empty, dh0 = dh_T,
    dc0 = dc_T and the weight gradients are zeros of the weights' shapes."""
    steps, batch, hidden = OP_EXTENTS[extent]
    impl = backends.get_backend(backend)
    assert impl.unavailable_reason() is None  # loads the extension's ops
    gates, out = backends.GATES[cell], proj or hidden
    spec = backends.RecurrenceSpec(cell, hidden, proj, reverse, torch.device("cpu"),
                                   torch.float32, batch, steps, variable_lengths, True)
    gx = torch.randn(steps, batch, gates * hidden)
    h0, c0 = torch.randn(batch, out), torch.randn(batch, hidden) if cell == "lstm" else None
    w_hh = torch.randn(gates * hidden, out)
    w_hr = torch.randn(proj, hidden) if proj else None
    b_hn = torch.randn(hidden) if cell == "gru" else None
    batch_sizes = torch.full((steps,), batch, dtype=torch.long) if variable_lengths else None

    y, h_t, c_t, saved = impl.forward(spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, True)
    assert_close(y, torch.zeros(steps, batch, out), 0, 0, "Y")
    assert_close(h_t, h0, 0, 0, "h_T")
    assert (c_t is None) == (c0 is None) and (c0 is None or torch.equal(c_t, c0)), "c_T"

    d_y, d_ht = torch.randn(y.shape), torch.randn(h_t.shape)
    d_ct = None if c_t is None else torch.randn(c_t.shape)
    d_gx, dh0, dc0, d_w_hh, d_w_hr, d_b_hn = impl.backward(
        spec, saved, batch_sizes, d_y, d_ht, d_ct)
    assert_close(d_gx, torch.zeros(gx.shape), 0, 0, "dG_x")
    assert_close(dh0, d_ht, 0, 0, "dh0")
    assert (dc0 is None) == (d_ct is None) and (d_ct is None or torch.equal(dc0, d_ct)), "dc0"
    assert_close(d_w_hh, torch.zeros(w_hh.shape), 0, 0, "dW_hh")
    assert (d_w_hr is None) == (w_hr is None), "dW_hr"
    if w_hr is not None:
        assert_close(d_w_hr, torch.zeros(w_hr.shape), 0, 0, "dW_hr")
    assert (d_b_hn is None) == (b_hn is None), "db_hn"
    if b_hn is not None:
        assert_close(d_b_hn, torch.zeros(b_hn.shape), 0, 0, "db_hn")


@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 5), (2, 0, 5)], ids=str)
@pytest.mark.parametrize("out_features", [4, 0])
def test_the_cpu_backends_linear_op_takes_empty_extents_as_f_linear_does(shape, out_features):
    """``cnnlstm_fast::linear`` (the cpu backend's input projection, and the GEMMs of its
    gradient) on inputs of any rank with an empty dimension, forward and backward."""
    if "cpu" not in BACKENDS:
        pytest.skip(f"cpu backend: {backends.backend_report().get('cpu')}")
    backends.get_backend("cpu").unavailable_reason()  # loads the op and its autograd formula
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(out_features, shape[-1], requires_grad=True)
    b = torch.randn(out_features, requires_grad=True)
    got = torch.ops.cnnlstm_fast.linear(x, w, b)
    want = torch.nn.functional.linear(x, w, b)
    assert_close(got, want, RTOL, ATOL, "output")
    cot = torch.randn(want.shape)
    for name, a, e in zip(("dx", "dW", "db"), torch.autograd.grad(got, (x, w, b), cot),
                          torch.autograd.grad(want, (x, w, b), cot)):
        assert_close(a, e, RTOL, ATOL, name)
