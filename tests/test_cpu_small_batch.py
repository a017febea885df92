"""The cpu backend's small-batch path (csrc/cpu/recurrence.cpp, small_batch_forward): one
parallel region for the whole sequence, each thread owning a slice of the hidden units.

Forced on with CNNLSTM_FAST_CPU_SMALL_BATCH=1 and 2 threads, it must give bit for bit
what the per-step path (=0) gives (every element is computed in the same order) and be
as accurate as torch.nn against float64: outputs, final states and all gradients, on
hidden sizes that split unevenly into 32-unit slices (33: a 1-unit slice padded to a
panel), odd and even
step counts (h_T ends in either buffer), packed sequences, both directions, 2 layers,
inference from padded input (the slices' own chunked projection) and training.
"""

from __future__ import annotations

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast import _ext
from cnnlstm_fast.backends import get_backend

from helpers import assert_as_accurate_as, make_packed

CPU = get_backend("cpu")


def _avx512() -> bool:
    module = _ext.load()
    return module is not None and module.cpu_gemm_info()["avx512_supported"]


pytestmark = [
    pytest.mark.skipif(CPU.unavailable_reason() is not None,
                       reason=f"cpu backend: {CPU.unavailable_reason()}"),
    pytest.mark.skipif(not _avx512(), reason="the small-batch path needs the AVX-512 GEMM"),
]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _run(module, x, grad, mode, monkeypatch, dtype=torch.float32):
    monkeypatch.setenv("CNNLSTM_FAST_CPU_SMALL_BATCH", mode)
    inp = x.to(dtype).requires_grad_(grad)
    if isinstance(inp, torch.nn.utils.rnn.PackedSequence):
        raise AssertionError("pass padded input; packing is done by the caller")
    with torch.set_grad_enabled(grad):
        y, state = module(inp)
    outs = [y, *(state if isinstance(state, tuple) else (state,))]
    if not grad:
        return outs
    g = [torch.randn_like(o, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    return outs + list(torch.autograd.grad(outs, [inp, *module.parameters()], g))


CASES = [  # (cell, hidden, steps, batch, kwargs)
    ("lstm", 33, 5, 1, {}),
    ("lstm", 40, 6, 3, {"bidirectional": True}),
    ("gru", 65, 7, 2, {"num_layers": 2}),
    ("gru", 33, 4, 5, {"bias": False}),
    ("rnn_tanh", 64, 3, 1, {}),
    ("rnn_relu", 40, 6, 2, {"bidirectional": True}),
]


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
def test_small_batch_path_matches_per_step_path_and_torch(two_threads, monkeypatch, cell,
                                                          hidden, steps, batch, kwargs, grad):
    ours, theirs, exact = _pair(cell, hidden, kwargs, hidden * 10 + steps)
    x = torch.randn(steps, batch, 7, dtype=torch.float64)
    runs = _ext.load().cpu_small_batch_runs()
    small = _run(ours, x, grad, "1", monkeypatch)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    assert _ext.load().cpu_small_batch_runs() == runs + layers
    per_step = _run(ours, x, grad, "0", monkeypatch)
    assert _ext.load().cpu_small_batch_runs() == runs + layers
    for a, b in zip(small, per_step):
        assert torch.equal(a, b)
    names = [f"out{i}" for i in range(len(small))]
    assert_as_accurate_as(names, small, _run(theirs, x, grad, "0", monkeypatch),
                          _run(exact, x, grad, "0", monkeypatch, torch.float64))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_small_batch_path_on_packed_sequences(two_threads, monkeypatch, cell):
    """Variable lengths: rows leave the batch (forward) and join it (reverse direction)
    and keep their state meanwhile, in both h buffers."""
    ours, theirs, exact = _pair(cell, 33, {"bidirectional": True}, 5)
    lengths = [6, 5, 5, 2, 1]

    def run(module, mode, dtype):
        monkeypatch.setenv("CNNLSTM_FAST_CPU_SMALL_BATCH", mode)
        torch.manual_seed(1)
        packed = make_packed(lengths, len(lengths), 7, torch.float64, False)
        data = packed.data.to(dtype).requires_grad_()
        packed = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes,
                                                   packed.sorted_indices, packed.unsorted_indices)
        y, state = module(packed)
        outs = [y.data, *(state if isinstance(state, tuple) else (state,))]
        g = [torch.ones_like(o) / o.numel() ** 0.5 for o in outs]
        return outs + list(torch.autograd.grad(outs, [data, *module.parameters()], g))

    runs = _ext.load().cpu_small_batch_runs()
    small = run(ours, "1", torch.float32)
    assert _ext.load().cpu_small_batch_runs() == runs + 2
    for a, b in zip(small, run(ours, "0", torch.float32)):
        assert torch.equal(a, b)
    names = [f"out{i}" for i in range(len(small))]
    assert_as_accurate_as(names, small, run(theirs, "0", torch.float32),
                          run(exact, "0", torch.float64))


def test_small_batch_path_with_one_thread_is_the_per_step_path(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours, _, _ = _pair("lstm", 40, {}, 3)
        x = torch.randn(5, 2, 7)
        runs = _ext.load().cpu_small_batch_runs()
        with torch.no_grad():
            monkeypatch.setenv("CNNLSTM_FAST_CPU_SMALL_BATCH", "1")
            a = ours(x)[0]
        assert _ext.load().cpu_small_batch_runs() == runs
        with torch.no_grad():
            monkeypatch.setenv("CNNLSTM_FAST_CPU_SMALL_BATCH", "0")
            b = ours(x)[0]
        assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def test_bad_small_batch_setting_is_named(monkeypatch):
    ours, _, _ = _pair("gru", 40, {}, 3)
    monkeypatch.setenv("CNNLSTM_FAST_CPU_SMALL_BATCH", "yes")
    with pytest.raises(RuntimeError, match="CNNLSTM_FAST_CPU_SMALL_BATCH.*'yes'"):
        ours(torch.randn(3, 1, 7))
