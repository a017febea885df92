"""The cpu backend's persistent path (csrc/cpu/recurrence.cpp, persistent_forward and
persistent_backward): one parallel region for the whole sequence, each thread owning a
slice of the hidden units.

Forced on with the ops' kernel_name "persistent" (cnnlstm_fast.backends.cpu.use_kernel) and
2 threads, forward and backward must give bit for bit what the per-step path ("per_step")
gives (every element is computed in the same
order) and be as accurate as torch.nn against float64: outputs, final states and all
gradients, on hidden sizes that split unevenly into 32-unit slices (33: a 1-unit slice
padded to a panel), batches of 1-3 rows (the GEMM's wide tile) and of more than 12 (its
12-row tiles and a remainder), odd and even step counts (h_T ends in either buffer),
packed sequences, both directions, 2 layers, inference from padded input (the slices'
own chunked projection) and training.
"""

from __future__ import annotations

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast import _ext
from cnnlstm_fast.backends import cpu, get_backend

from helpers import assert_as_accurate_as, make_packed

CPU = get_backend("cpu")


def _avx512() -> bool:
    module = _ext.load()
    return module is not None and module.cpu_gemm_info()["avx512_supported"]


pytestmark = [
    pytest.mark.skipif(CPU.unavailable_reason() is not None,
                       reason=f"cpu backend: {CPU.unavailable_reason()}"),
    pytest.mark.skipif(not _avx512(), reason="the persistent path needs the AVX-512 GEMM"),
]


@pytest.fixture
def two_threads(monkeypatch):
    """2 threads for each direction: the directions of a bidirectional layer run one
    after the other (the default; side by side each would get one thread, and the
    persistent path needs two; tests/test_directions.py tests them side by side)."""
    monkeypatch.setattr(cpu, "_directions", "one_after_the_other")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _run(module, x, grad, mode, dtype=torch.float32):
    with cpu.use_kernel(mode):
        inp = x.to(dtype).requires_grad_(grad)
        if isinstance(inp, torch.nn.utils.rnn.PackedSequence):
            raise AssertionError("pass padded input; packing is done by the caller")
        with torch.set_grad_enabled(grad):
            y, state = module(inp)
        outs = [y, *(state if isinstance(state, tuple) else (state,))]
        if not grad:
            return outs
        g = [torch.randn_like(o, generator=torch.Generator().manual_seed(i))
             for i, o in enumerate(outs)]
        return outs + list(torch.autograd.grad(outs, [inp, *module.parameters()], g))


CASES = [  # (cell, hidden, steps, batch, kwargs)
    ("lstm", 33, 5, 1, {}),
    ("lstm", 40, 6, 3, {"bidirectional": True}),
    ("gru", 65, 7, 2, {"num_layers": 2}),
    ("gru", 33, 4, 5, {"bias": False}),
    ("rnn_tanh", 64, 3, 1, {}),
    ("rnn_relu", 40, 6, 2, {"bidirectional": True}),
    ("lstm", 70, 4, 29, {}),
    ("gru", 40, 3, 17, {"bidirectional": True}),
    ("rnn_tanh", 97, 2, 13, {"num_layers": 2}),
]


def _runs():
    runs = _ext.load().cpu_persistent_runs()
    return runs["forward"], runs["backward"]


def _pair(cell, hidden, kwargs, seed):
    torch.manual_seed(seed)
    name = {"lstm": "LSTM", "gru": "GRU"}.get(cell, "RNN")
    extra = {"nonlinearity": cell[4:]} if name == "RNN" else {}
    exact = getattr(torch.nn, name)(7, hidden, **kwargs, **extra).double()
    ours = getattr(clf, name)(7, hidden, **kwargs, **extra, backend="cpu")
    theirs = getattr(torch.nn, name)(7, hidden, **kwargs, **extra)
    ours.load_state_dict(exact.state_dict())
    theirs.load_state_dict(exact.state_dict())
    return ours, theirs, exact


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("cell,hidden,steps,batch,kwargs", CASES, ids=str)
def test_persistent_path_matches_per_step_path_and_torch(two_threads, cell, hidden, steps,
                                                         batch, kwargs, grad):
    ours, theirs, exact = _pair(cell, hidden, kwargs, hidden * 10 + steps)
    x = torch.randn(steps, batch, 7, dtype=torch.float64)
    forward, backward = _runs()
    persistent = _run(ours, x, grad, "persistent")
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    expected = (forward + layers, backward + (layers if grad else 0))
    assert _runs() == expected
    per_step = _run(ours, x, grad, "per_step")
    assert _runs() == expected
    for a, b in zip(persistent, per_step):
        assert torch.equal(a, b)
    names = [f"out{i}" for i in range(len(persistent))]
    assert_as_accurate_as(names, persistent, _run(theirs, x, grad, "per_step"),
                          _run(exact, x, grad, "per_step", torch.float64))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_persistent_path_on_packed_sequences(two_threads, cell):
    """Variable lengths: rows leave the batch (forward) and join it (reverse direction)
    and keep their state meanwhile, in both h buffers."""
    ours, theirs, exact = _pair(cell, 33, {"bidirectional": True}, 5)
    lengths = [6, 5, 5, 2, 1]

    def run(module, mode, dtype):
        torch.manual_seed(1)
        packed = make_packed(lengths, len(lengths), 7, torch.float64, False)
        data = packed.data.to(dtype).requires_grad_()
        packed = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes,
                                                   packed.sorted_indices, packed.unsorted_indices)
        with cpu.use_kernel(mode):
            y, state = module(packed)
            outs = [y.data, *(state if isinstance(state, tuple) else (state,))]
            g = [torch.ones_like(o) / o.numel() ** 0.5 for o in outs]
            return outs + list(torch.autograd.grad(outs, [data, *module.parameters()], g))

    forward, backward = _runs()
    persistent = run(ours, "persistent", torch.float32)
    assert _runs() == (forward + 2, backward + 2)
    for a, b in zip(persistent, run(ours, "per_step", torch.float32)):
        assert torch.equal(a, b)
    names = [f"out{i}" for i in range(len(persistent))]
    assert_as_accurate_as(names, persistent, run(theirs, "per_step", torch.float32),
                          run(exact, "per_step", torch.float64))


def test_persistent_path_with_one_thread_is_the_per_step_path():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours, _, _ = _pair("lstm", 40, {}, 3)
        x = torch.randn(5, 2, 7)
        runs = _runs()
        a = _run(ours, x, True, "persistent")
        assert _runs() == runs
        for left, right in zip(a, _run(ours, x, True, "per_step")):
            assert torch.equal(left, right)
    finally:
        torch.set_num_threads(before)


def test_projection_takes_the_per_step_path(two_threads):
    """proj_size: h is m W_hr^T, a second GEMM per step the persistent path does not do."""
    torch.manual_seed(4)
    ours = clf.LSTM(7, 64, proj_size=40, backend="cpu")
    theirs = torch.nn.LSTM(7, 64, proj_size=40)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 7)
    runs = _runs()
    got = _run(ours, x, True, "persistent")
    assert _runs() == runs
    want = _run(theirs, x, True, "per_step")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_takes_the_persistent_path_only_with_every_thread_above_16_rows():
    """Under auto, with 4 threads: batch <= 16 runs it even when some threads would idle
    (H=64: two 32-unit slices); larger batches only when every thread owns units (H=128)."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        torch.manual_seed(5)
        assert cpu.get_kernel() == "auto"  # the default
        for hidden, batch, taken in [(64, 40, False), (64, 3, True), (128, 40, True)]:
            module = clf.LSTM(7, hidden, backend="cpu")
            runs = _runs()
            y, _ = module(torch.randn(2, batch, 7))
            y.sum().backward()
            expected = (runs[0] + 1, runs[1] + 1) if taken else runs
            assert _runs() == expected, (hidden, batch)
    finally:
        torch.set_num_threads(before)


def test_per_step_kernel_never_takes_the_persistent_path(two_threads):
    """kernel_name "per_step" keeps a layer that "auto" runs persistent (H=128 at batch 3,
    as above) on the per-step path, forward and backward."""
    torch.manual_seed(6)
    module = clf.LSTM(7, 128, backend="cpu")
    x = torch.randn(2, 3, 7)
    runs = _runs()
    _run(module, x, True, "auto")
    assert _runs() == (runs[0] + 1, runs[1] + 1)
    _run(module, x, True, "per_step")
    assert _runs() == (runs[0] + 1, runs[1] + 1)


def test_bad_kernel_name_is_named():
    """The setter and the ops name the argument, the values they take and the value given."""
    with pytest.raises(ValueError, match="kernel must be one of 'auto', 'per_step', "
                                         "'persistent', got 'yes'"):
        cpu.set_kernel("yes")
    assert cpu.get_kernel() == "auto"
    gx, h0, w_hh = torch.randn(3, 1, 120), torch.zeros(1, 40), torch.randn(120, 40)
    ops = torch.ops.cnnlstm_fast
    with pytest.raises(RuntimeError, match="kernel_name must be one of 'auto', 'per_step', "
                                           "'persistent', got '1'"):
        ops.recurrence_forward("gru", gx, h0, None, w_hh, None, torch.zeros(40), None, False,
                               True, kernel_name="1")
    y, h_t, _, act, h_prev, extra = ops.recurrence_forward(
        "gru", gx, h0, None, w_hh, None, torch.zeros(40), None, False, True)
    with pytest.raises(RuntimeError, match="kernel_name must be one of .*got 'mma'"):
        ops.recurrence_backward("gru", act, h_prev, extra, w_hh, None, None, False,
                                torch.ones_like(y), torch.zeros_like(h_t), None,
                                kernel_name="mma")
    with pytest.raises(RuntimeError, match="kernel_name must be one of .*got 'step'"):
        ops.recurrence_forward_from_input("gru", torch.randn(3, 1, 7), torch.randn(120, 7),
                                          None, h0, None, w_hh, None, torch.zeros(40), False,
                                          kernel_name="step")
