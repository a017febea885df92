"""The directions of a bidirectional layer side by side (csrc/cpu/directions.cpp): the
*_directions ops give bit for bit what the one-direction ops give where our AVX-512 GEMM
runs (BLAS may round differently on fewer threads), with one thread and with two (then
each direction runs on its own thread), for every cell, projection,
packed batch sizes, float32 and float64; errors raised on the helper thread reach the
caller; the caller's thread count is left as it was; the modules take the path in
training and inference and still match torch.nn; a forked child can run them."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast.backends import cpu as cpu_backend
from cnnlstm_fast.backends import get_backend
from cnnlstm_fast.backends.compiled import ops

from helpers import assert_close

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.unavailable_reason() is not None,
                                reason=f"cpu backend: {CPU.unavailable_reason()}")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    with cpu_backend.use_directions("side_by_side"):
        yield request.param
    torch.set_num_threads(before)


def _layer(cell, T, B, H, proj, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    G, out = GATES[cell] * H, proj or H

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    return dict(
        gx=[r(T, B, G) for _ in range(2)],
        h0=[r(B, out) for _ in range(2)],
        c0=[r(B, H) if cell == "lstm" else None for _ in range(2)],
        w_hh=[r(G, out, scale=0.3) for _ in range(2)],
        w_hr=[r(out, H, scale=0.3) if proj else None for _ in range(2)],
        b_hn=[r(H) if cell == "gru" else None for _ in range(2)],
    )


CASES = [  # (cell, steps, batch, hidden, proj, lengths)
    ("lstm", 7, 3, 33, 0, None),
    ("lstm", 5, 4, 20, 7, [5, 5, 3, 1]),
    ("gru", 1, 1, 1, 0, None),
    ("gru", 9, 13, 65, 0, [9, 8, 8, 6, 6, 5, 4, 4, 3, 2, 2, 1, 1]),
    ("rnn_tanh", 4, 2, 17, 0, None),
    ("rnn_relu", 6, 5, 8, 0, [6, 4, 4, 2, 1]),
]


def _same_bits(got, want, what):
    assert torch.equal(got, want), what


def _same_up_to_blas(got, want, what):
    """Where BLAS runs the GEMMs (float64; float32 without our AVX-512 GEMM) a direction
    on fewer threads may round differently, as BLAS does between thread counts."""
    torch.testing.assert_close(got, want, rtol=1e-12 if got.dtype == torch.float64 else 1e-6,
                               atol=1e-12 if got.dtype == torch.float64 else 1e-6,
                               msg=str(what))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cell,T,B,H,proj,lengths", CASES, ids=str)
def test_directions_ops_equal_the_one_direction_ops(threads, cell, T, B, H, proj, lengths,
                                                    dtype):
    ops()
    op = torch.ops.cnnlstm_fast
    p = _layer(cell, T, B, H, proj, dtype, seed=T * 100 + H)
    batch_sizes = None
    if lengths is not None:
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
    reverse = [False, True]
    got = op.recurrence_forward_directions(cell, p["gx"], p["h0"], p["c0"], p["w_hh"],
                                           p["w_hr"], p["b_hn"], batch_sizes, reverse, True)
    want = [op.recurrence_forward(cell, p["gx"][d], p["h0"][d], p["c0"][d], p["w_hh"][d],
                                  p["w_hr"][d], p["b_hn"][d], batch_sizes, reverse[d], True)
            for d in range(2)]
    same = _same_bits if dtype == torch.float32 and cpu_backend.gemm_in_use() == "avx512" \
        else _same_up_to_blas
    for d in range(2):
        for k in range(6):
            same(got[k][d], want[d][k], (d, k))
    assert torch.get_num_threads() == threads
    # backward from those saved activations
    g = torch.Generator().manual_seed(7)
    d_y = [torch.randn(w[0].shape, generator=g, dtype=dtype) for w in want]
    d_hT = [torch.randn(w[1].shape, generator=g, dtype=dtype) for w in want]
    d_cT = [torch.randn(w[2].shape, generator=g, dtype=dtype) if cell == "lstm" else None
            for w in want]
    extra = [w[5] if cell in ("lstm", "gru") else None for w in want]
    got_b = op.recurrence_backward_directions(
        cell, [w[3] for w in want], [w[4] for w in want], extra, p["w_hh"], p["w_hr"],
        batch_sizes, reverse, d_y, d_hT, d_cT)
    for d in range(2):
        want_b = op.recurrence_backward(cell, want[d][3], want[d][4], extra[d], p["w_hh"][d],
                                        p["w_hr"][d], batch_sizes, reverse[d], d_y[d], d_hT[d],
                                        d_cT[d])
        for k in range(6):
            same(got_b[k][d], want_b[k], (d, k))
    # inference straight from a shared input, padded or packed (x a PackedSequence's
    # data), each direction's Y in its column block of one output
    N = T * B if batch_sizes is None else int(batch_sizes.sum())
    x = torch.randn(N, 11, generator=g, dtype=dtype)
    if batch_sizes is None:
        x = x.view(T, B, 11)
    w_ih = [torch.randn(GATES[cell] * H, 11, generator=g, dtype=dtype) for _ in range(2)]
    bias = [torch.randn(GATES[cell] * H, generator=g, dtype=dtype), None]
    out = proj or H
    for side_by_side in (True, False):
        got_y, got_h, got_c = op.recurrence_forward_from_input_directions(
            cell, x, w_ih, bias, p["h0"], p["c0"], p["w_hh"], p["w_hr"], p["b_hn"], reverse,
            batch_sizes=batch_sizes, side_by_side=side_by_side)
        assert got_y.shape == (*x.shape[:-1], 2 * out)
        for d in range(2):
            want_i = op.recurrence_forward_from_input(
                cell, x, w_ih[d], bias[d], p["h0"][d], p["c0"][d], p["w_hh"][d],
                p["w_hr"][d], p["b_hn"][d], reverse[d], batch_sizes=batch_sizes)
            same(got_y[..., d * out:(d + 1) * out], want_i[0], (d, 0, side_by_side))
            same(got_h[d], want_i[1], (d, 1, side_by_side))
            same(got_c[d], want_i[2], (d, 2, side_by_side))


def test_directions_ops_opcheck():
    ops()
    p = _layer("lstm", 4, 3, 6, 0, torch.float32, seed=0)
    args = ("lstm", p["gx"], p["h0"], p["c0"], p["w_hh"], p["w_hr"], p["b_hn"], None,
            [False, True], True)
    torch.library.opcheck(torch.ops.cnnlstm_fast.recurrence_forward_directions, args)
    y, h, c, act, h_prev, extra = torch.ops.cnnlstm_fast.recurrence_forward_directions(*args)
    back = ("lstm", act, h_prev, extra, p["w_hh"], p["w_hr"], None, [False, True],
            [torch.randn_like(t) for t in y], [torch.randn_like(t) for t in h],
            [torch.randn_like(t) for t in c])
    torch.library.opcheck(torch.ops.cnnlstm_fast.recurrence_backward_directions, back)
    x = torch.randn(4, 3, 5)
    w_ih = [torch.randn(24, 5), torch.randn(24, 5)]
    torch.library.opcheck(torch.ops.cnnlstm_fast.recurrence_forward_from_input_directions,
                          ("lstm", x, w_ih, [None, None], p["h0"], p["c0"], p["w_hh"],
                           [None, None], [None, None], [False, True]))
    # packed rows (4 steps of 3, 2, 2, 1), one direction after the other
    torch.library.opcheck(torch.ops.cnnlstm_fast.recurrence_forward_from_input_directions,
                          ("lstm", torch.randn(8, 5), w_ih, [None, None], p["h0"], p["c0"],
                           p["w_hh"], [None, None], [None, None], [False, True]),
                          {"batch_sizes": torch.tensor([3, 2, 2, 1]), "side_by_side": False})


def test_an_error_on_the_helper_thread_reaches_the_caller(threads):
    """Direction 1 runs on torch's inter-op pool with 2 threads: its shape error is
    raised to the caller, after direction 0 has finished, and the threads are restored."""
    ops()
    p = _layer("gru", 3, 2, 4, 0, torch.float32, seed=1)
    p["h0"][1] = torch.randn(2, 5)  # hidden 4 expected
    with pytest.raises(RuntimeError, match="h0"):
        torch.ops.cnnlstm_fast.recurrence_forward_directions(
            "gru", p["gx"], p["h0"], p["c0"], p["w_hh"], p["w_hr"], p["b_hn"], None,
            [False, True], False)
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError, match=r"w_hh must have one entry per direction \(2\), got 1"):
        torch.ops.cnnlstm_fast.recurrence_forward_directions(
            "gru", p["gx"], p["h0"], p["c0"], p["w_hh"][:1], p["w_hr"], p["b_hn"], None,
            [False, True], False)


def _spied(monkeypatch):
    calls = []
    for name in ("forward_directions", "backward_directions", "forward_from_input_directions"):
        def spy(self, *args, _name=name, _method=getattr(type(CPU), name), **kwargs):
            result = _method(self, *args, **kwargs)
            if result is not None:  # None: the caller goes on with forward_directions
                calls.append(_name)
            return result

        monkeypatch.setattr(type(CPU), name, spy)
    return calls


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_bidirectional_modules_run_both_directions_in_one_op(threads, monkeypatch, name,
                                                             packed):
    """Training (forward and backward) and inference of a stacked bidirectional layer go
    through the *_directions ops, and give torch.nn's outputs and gradients."""
    calls = _spied(monkeypatch)
    torch.manual_seed(3)
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True)
    if name == "LSTM":
        kwargs["proj_size"] = 5
    theirs = getattr(torch.nn, name)(6, 9, **kwargs).double()
    ours = getattr(clf, name)(6, 9, **kwargs, backend="cpu").double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 7, 6, dtype=torch.float64)

    def run(module, grad):
        inp = x.clone().requires_grad_(grad)
        arg = inp
        if packed:
            arg = torch.nn.utils.rnn.pack_padded_sequence(inp, torch.tensor([7, 3, 5, 1]),
                                                          batch_first=True,
                                                          enforce_sorted=False)
        with torch.set_grad_enabled(grad):
            y, state = module(arg)
        y = y.data if packed else y
        outs = [y, *(state if isinstance(state, tuple) else (state,))]
        if not grad:
            return outs
        g = [torch.ones_like(o) / o.numel() for o in outs]
        return outs + list(torch.autograd.grad(outs, [inp, *module.parameters()], g))

    for grad in (True, False):
        calls.clear()
        got, want = run(ours, grad), run(theirs, grad)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, rtol=1e-9, atol=1e-10, what=f"{name} grad={grad} tensor {i}")
        if grad:
            assert calls == ["forward_directions"] * 2 + ["backward_directions"] * 2
        else:
            # inference reads its input where it lies: the batch_first input's strided
            # view, the packed rows (never padded), each layer's output
            assert calls == ["forward_from_input_directions"] * 2


def test_directions_run_one_after_the_other_by_default_and_the_setting_is_checked(
        monkeypatch):
    calls = _spied(monkeypatch)
    assert cpu_backend.get_directions() == "one_after_the_other"
    model = clf.GRU(3, 4, bidirectional=True, backend="cpu")
    model(torch.randn(5, 2, 3))[0].sum().backward()
    assert calls == []
    with cpu_backend.use_directions("side_by_side"):
        model(torch.randn(5, 2, 3))[0].sum().backward()
    assert calls == ["forward_directions", "backward_directions"]
    assert cpu_backend.get_directions() == "one_after_the_other"
    with pytest.raises(ValueError, match="order must be one of 'one_after_the_other', "
                                         "'side_by_side', got 'both'"):
        cpu_backend.set_directions("both")


def _child_runs_a_bidirectional_layer(queue):
    torch.set_num_threads(2)
    with cpu_backend.use_directions("side_by_side"):
        model = clf.LSTM(3, 4, bidirectional=True, backend="cpu")
        y, _ = model(torch.randn(5, 2, 3))
        y.sum().backward()
    queue.put(tuple(y.shape))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_the_directions_side_by_side():
    """The parent has used our worker threads; a forked child (a DataLoader worker) has
    none of them, starts its own and does not hang waiting on the parent's."""
    before = torch.get_num_threads()
    try:
        _child_runs_a_bidirectional_layer(multiprocessing.get_context("fork").SimpleQueue())
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_runs_a_bidirectional_layer, args=(queue,))
        child.start()
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
            pytest.fail("the forked child hung")
        assert child.exitcode == 0
        assert queue.get(timeout=5) == (5, 2, 8)
    finally:
        torch.set_num_threads(before)


def test_side_by_side_compiles_without_graph_breaks_and_exports(threads):
    """torch.compile(fullgraph=True) traces the directions ops (their fakes), forward and
    backward, with eager's results; torch.export keeps them in the program."""
    torch.manual_seed(5)
    model = clf.GRU(5, 7, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(9, 3, 5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(allow_rnn=True):  # as tests/test_compile.py says
        got = compiled(x)
    got[0].sum().backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(x)
    want[0].sum().backward()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for a, p in zip(got_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    with torch._dynamo.config.patch(allow_rnn=True):
        program = torch.export.export(model.eval(), (x,))
    targets = {str(n.target) for m in program.graph_module.modules()
               if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes}
    assert "cnnlstm_fast.recurrence_forward_directions.default" in targets
