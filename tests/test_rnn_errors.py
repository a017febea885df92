"""Bad input raises what torch.nn raises: same exception type, same message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnlstm_fast as clf
from helpers import make_packed, module_backends


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - we compare whatever torch raises
        return type(exc), str(exc)
    return None, None


def _same_error(ours_fn, torch_fn, message=True):
    expected = _raised(torch_fn)
    got = _raised(ours_fn)
    assert expected[0] is not None, "torch.nn accepted the input; the case is wrong"
    assert got[0] is expected[0], f"raised {got}, torch raised {expected}"
    if message:
        assert got[1] == expected[1]


CONSTRUCTOR_CASES = [
    ("LSTM", dict(input_size=4, hidden_size=3, proj_size=3)),
    ("LSTM", dict(input_size=4, hidden_size=3, proj_size=-1)),
    ("GRU", dict(input_size=4, hidden_size=3, proj_size=2)),
    ("RNN", dict(input_size=4, hidden_size=3, proj_size=2)),
    ("LSTM", dict(input_size=4, hidden_size=3, dropout=1.5)),
    ("GRU", dict(input_size=4, hidden_size=3, dropout=-0.1)),
    ("LSTM", dict(input_size=4, hidden_size=3, dropout=True)),
    ("LSTM", dict(input_size=0, hidden_size=3)),
    ("LSTM", dict(input_size=4, hidden_size=0)),
    ("LSTM", dict(input_size=4, hidden_size=3, num_layers=0)),
    ("LSTM", dict(input_size=4.0, hidden_size=3)),
    ("GRU", dict(input_size=4, hidden_size=3, bias=1)),
    ("RNN", dict(input_size=4, hidden_size=3, batch_first=None)),
    ("RNN", dict(input_size=4, hidden_size=3, nonlinearity="sigmoid")),
]


@pytest.mark.parametrize("backend", ["auto", *module_backends()])
@pytest.mark.parametrize("cls_name,kwargs", CONSTRUCTOR_CASES, ids=str)
def test_constructor_errors(cls_name, kwargs, backend):
    """Our constructor (torch's, with our keyword-only ``backend`` taken first) raises
    torch's error for each bad argument, whatever backend is named."""
    _same_error(
        lambda: getattr(clf, cls_name)(**kwargs, backend=backend),
        lambda: getattr(nn, cls_name)(**kwargs),
    )


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*got 'nope'"):
        clf.LSTM(3, 4, backend="nope")
    with pytest.raises(TypeError, match="backend should be of type str"):
        clf.GRU(3, 4, backend=1)


def _lstm_hx(layers, batch, h, c=None):
    return (torch.randn(layers, batch, h), torch.randn(layers, batch, c or h))


# (class, constructor kwargs, input, hx). Sizes: input_size 4, hidden_size 3.
FORWARD_CASES = {
    "wrong_input_size": lambda cls: (torch.randn(5, 2, 6), None),
    "input_4d": lambda cls: (torch.randn(5, 2, 4, 1), None),
    "input_1d": lambda cls: (torch.randn(4), None),
    "hx_wrong_hidden": lambda cls: (
        torch.randn(5, 2, 4),
        _lstm_hx(1, 2, 5, 3) if cls == "LSTM" else torch.randn(1, 2, 5),
    ),
    "cx_wrong_hidden": lambda cls: (torch.randn(5, 2, 4), _lstm_hx(1, 2, 3, 5))
    if cls == "LSTM"
    else None,
    "hx_wrong_batch": lambda cls: (
        torch.randn(5, 2, 4),
        _lstm_hx(1, 3, 3) if cls == "LSTM" else torch.randn(1, 3, 3),
    ),
    "hx_wrong_layers": lambda cls: (
        torch.randn(5, 2, 4),
        _lstm_hx(2, 2, 3) if cls == "LSTM" else torch.randn(2, 2, 3),
    ),
    "hx_2d_for_batched": lambda cls: (
        torch.randn(5, 2, 4),
        (torch.randn(2, 3), torch.randn(2, 3)) if cls == "LSTM" else torch.randn(2, 3),
    ),
    "hx_3d_for_unbatched": lambda cls: (
        torch.randn(5, 4),
        _lstm_hx(1, 1, 3) if cls == "LSTM" else torch.randn(1, 1, 3),
    ),
    "dtype_mismatch": lambda cls: (torch.randn(5, 2, 4, dtype=torch.float64), None),
    # dtypes a named backend cannot run either: torch.nn's error comes first
    "input_float16": lambda cls: (torch.randn(5, 2, 4, dtype=torch.float16), None),
    "input_int64": lambda cls: (torch.randint(0, 3, (5, 2, 4)), None),
    "unbatched_input_float16": lambda cls: (torch.randn(5, 4, dtype=torch.float16), None),
    "lstm_hx_three_states": lambda cls: (torch.randn(5, 2, 4), (*_lstm_hx(1, 2, 3), torch.randn(1, 2, 3)))
    if cls == "LSTM"
    else None,
}


@pytest.mark.parametrize("backend", module_backends())
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_forward_errors(backend, cls_name, case):
    made = FORWARD_CASES[case](cls_name)
    if made is None:
        pytest.skip("case applies to LSTM only")
    x, hx = made
    ours = getattr(clf, cls_name)(4, 3, backend=backend)
    theirs = getattr(nn, cls_name)(4, 3)
    _same_error(lambda: ours(x, hx), lambda: theirs(x, hx))


@pytest.mark.parametrize("backend", module_backends())
def test_lstm_hx_as_one_tensor_is_refused(backend):
    """torch.nn's lstm op takes hx only as a tuple (h_0, c_0); one stacked tensor of both
    must not be unpacked along its first dimension. Same type; torch's message lists the
    op's overloads, ours says what hx must be."""
    x, hx = torch.randn(5, 2, 4), torch.randn(2, 1, 2, 3)
    _same_error(lambda: clf.LSTM(4, 3, backend=backend)(x, hx), lambda: nn.LSTM(4, 3)(x, hx),
                message=False)


@pytest.mark.parametrize("backend", module_backends())
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU", "RNN"])
def test_packed_errors(backend, cls_name):
    """Packed input with the wrong feature size or hx batch.

    RNN/GRU: torch's Python checks, matched exactly. LSTM: torch skips them for packed
    input and fails later inside ATen with unrelated text ("mat1 and mat2 shapes
    cannot be multiplied"), so we match the exception type and give the clear message
    of the batched path instead."""
    ours = getattr(clf, cls_name)(4, 3, backend=backend)
    theirs = getattr(nn, cls_name)(4, 3)
    exact = cls_name != "LSTM"
    x = make_packed([3, 2], 2, 6, torch.float32, enforce_sorted=True)
    _same_error(lambda: ours(x), lambda: theirs(x), message=exact)
    x = make_packed([3, 2], 2, 4, torch.float32, enforce_sorted=True)
    hx = _lstm_hx(1, 3, 3) if cls_name == "LSTM" else torch.randn(1, 3, 3)
    _same_error(lambda: ours(x, hx), lambda: theirs(x, hx), message=exact)
    with pytest.raises(RuntimeError, match="size"):
        ours(make_packed([3, 2], 2, 6, torch.float32, enforce_sorted=True))


@pytest.mark.parametrize("backend", module_backends())
def test_empty_sequence(backend):
    x = torch.randn(0, 2, 4)
    _same_error(lambda: clf.GRU(4, 3, backend=backend)(x), lambda: nn.GRU(4, 3)(x))


CELL_CASES = {
    "input_3d": lambda cls: (torch.randn(2, 3, 4), None),
    "wrong_input_size": lambda cls: (torch.randn(2, 5), None),
    "hx_wrong_batch": lambda cls: (
        torch.randn(2, 4),
        (torch.randn(3, 3), torch.randn(2, 3)) if cls == "LSTMCell" else torch.randn(3, 3),
    ),
    "cx_wrong_batch": lambda cls: (torch.randn(2, 4), (torch.randn(2, 3), torch.randn(3, 3)))
    if cls == "LSTMCell"
    else None,
    "hx_wrong_hidden": lambda cls: (
        torch.randn(2, 4),
        (torch.randn(2, 5), torch.randn(2, 3)) if cls == "LSTMCell" else torch.randn(2, 5),
    ),
    "cx_wrong_hidden": lambda cls: (torch.randn(2, 4), (torch.randn(2, 3), torch.randn(2, 5)))
    if cls == "LSTMCell"
    else None,
    "hx_3d": lambda cls: (
        torch.randn(2, 4),
        (torch.randn(1, 2, 3), torch.randn(2, 3)) if cls == "LSTMCell" else torch.randn(1, 2, 3),
    ),
    "unbatched_input_batched_hx": lambda cls: (
        torch.randn(4),
        (torch.randn(2, 3), torch.randn(2, 3)) if cls == "LSTMCell" else torch.randn(2, 3),
    ),
    "input_float64": lambda cls: (torch.randn(2, 4, dtype=torch.float64), None),
    "lstm_hx_three_states": lambda cls: (torch.randn(2, 4), (torch.randn(2, 3),) * 3)
    if cls == "LSTMCell"
    else None,
    "lstm_hx_one_state": lambda cls: (torch.randn(2, 4), (torch.randn(2, 3),))
    if cls == "LSTMCell"
    else None,
    "lstm_hx_one_state_unbatched": lambda cls: (torch.randn(4), (torch.randn(3),))
    if cls == "LSTMCell"
    else None,
    "lstm_hx_a_tensor": lambda cls: (torch.randn(2, 4), torch.randn(2, 3))
    if cls == "LSTMCell"
    else None,
}


@pytest.mark.parametrize("backend", module_backends())
@pytest.mark.parametrize("cls_name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("case", sorted(CELL_CASES))
def test_cell_errors(backend, cls_name, case):
    made = CELL_CASES[case](cls_name)
    if made is None:
        pytest.skip("case applies to LSTMCell only")
    x, hx = made
    ours = getattr(clf, cls_name)(4, 3, backend=backend)
    theirs = getattr(nn, cls_name)(4, 3)
    _same_error(lambda: ours(x, hx), lambda: theirs(x, hx))


@pytest.mark.parametrize("backend", module_backends())
def test_rnn_cell_unknown_nonlinearity(backend):
    """torch's RNNCell takes any nonlinearity at construction and refuses it in forward;
    ours computed tanh for it."""
    x = torch.randn(2, 4)
    ours = clf.RNNCell(4, 3, nonlinearity="sigmoid", backend=backend)
    _same_error(lambda: ours(x), lambda: nn.RNNCell(4, 3, nonlinearity="sigmoid")(x))
