"""The reference backend's explicit backward against autograd (fp64 gradcheck), and its
low-precision path against its own fp64 result."""

from __future__ import annotations

import pytest
import torch

from cnnlstm_fast.backends import GATES, RecurrenceSpec, get_backend
from cnnlstm_fast.ops.recurrence import recurrence

CASES = [
    # cell, hidden, proj, reverse, batch_sizes
    ("lstm", 3, 0, False, None),
    ("lstm", 4, 2, True, None),
    ("lstm", 3, 2, False, [3, 2, 2, 1]),
    ("lstm", 3, 0, True, [3, 3, 1, 1]),
    ("gru", 3, 0, False, None),
    ("gru", 2, 0, True, [3, 2, 1, 1]),
    ("rnn_tanh", 3, 0, True, [3, 2, 2, 1]),
    ("rnn_relu", 3, 0, False, None),
]


def make_args(cell, hidden, proj, reverse, batch_sizes, dtype=torch.float64, batch=3, steps=4):
    out = proj or hidden
    gates = GATES[cell] * hidden
    spec = RecurrenceSpec(cell, hidden, proj, reverse, torch.device("cpu"), dtype, batch, steps,
                          batch_sizes is not None)
    bs = None if batch_sizes is None else torch.tensor(batch_sizes, dtype=torch.int64)

    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    tensors = [
        t(steps, batch, gates),
        t(batch, out),
        t(batch, hidden) if cell == "lstm" else None,
        t(gates, out),
        t(out, hidden) if proj else None,
        t(hidden) if cell == "gru" else None,
    ]
    return spec, bs, tensors


@pytest.mark.parametrize("case", CASES, ids=str)
def test_explicit_backward_gradcheck(case):
    spec, bs, tensors = make_args(*case)
    backend = get_backend("reference")
    present = [i for i, v in enumerate(tensors) if v is not None]

    def fn(*xs):
        full = list(tensors)
        for i, x in zip(present, xs):
            full[i] = x
        y, h, c = recurrence(backend, spec, *full, batch_sizes=bs)
        return (y, h) if c is None else (y, h, c)

    assert torch.autograd.gradcheck(fn, [tensors[i] for i in present])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_inactive_rows_keep_state_and_output_zero(case):
    spec, bs, tensors = make_args(*case)
    if bs is None:
        pytest.skip("fixed length")
    with torch.no_grad():
        y, h, _ = recurrence(get_backend("reference"), spec, *tensors, batch_sizes=bs)
    sizes = bs.tolist()
    for t, n in enumerate(sizes):
        assert torch.all(y[t, n:] == 0), f"output of inactive rows at step {t}"
    for row in range(y.shape[1]):
        length = sum(1 for n in sizes if n > row)
        # forward ends at the row's last element; reverse ends at step 0
        last = 0 if spec.reverse else length - 1
        assert torch.equal(h[row], y[last, row]), f"final state of row {row}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_low_precision_is_computed_in_float32(case, dtype):
    spec, bs, tensors = make_args(*case)
    low = [None if v is None else v.detach().to(dtype) for v in tensors]
    spec_low = RecurrenceSpec(**{**spec.__dict__, "dtype": dtype})
    backend = get_backend("reference")
    y, h, _ = recurrence(backend, spec_low, *low, batch_sizes=bs)
    assert y.dtype == dtype and h.dtype == dtype
    exact = [None if v is None else v.double() for v in low]
    y64, h64, _ = recurrence(backend, spec, *exact, batch_sizes=bs)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), y64, rtol=4 * eps, atol=4 * eps)
