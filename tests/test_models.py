"""cnnlstm_fast.models.CNNLSTM: output shapes, backward, options and backend pass-through."""

from __future__ import annotations

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast.models import CNNLSTM
from helpers import assert_close, module_backends

B, T = 3, 6


def _input(conv, channels, height=5, width=7):
    return torch.randn(B, T, channels) if conv == "1d" else torch.randn(B, T, channels, height, width)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("conv", ["1d", "2d"])
def test_shapes_and_backward(conv, rnn, bidirectional, attention):
    model = CNNLSTM(
        3, 4, conv=conv, conv_channels=(5, 6), kernel_size=3, rnn=rnn, hidden_size=7,
        num_layers=2, bidirectional=bidirectional, attention=attention, backend="reference",
    )
    x = _input(conv, 3).requires_grad_()
    assert model.features(x).shape == (B, T, 6)
    out = model(x)
    assert out.shape == (B, 4)
    model.loss(out, torch.randint(0, 4, (B,))).backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    assert type(model.rnn) is (clf.LSTM if rnn == "lstm" else clf.GRU)
    assert (model.attention is not None) == attention


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_defaults_regression_and_odd_sizes():
    model = CNNLSTM(2, 1, task="regression")
    assert model.rnn.hidden_size == 128 and model.rnn.num_layers == 2 and model.rnn.bidirectional
    assert model.rnn.dropout == 0.1 and model.rnn.backend == "auto" and model.rnn.batch_first
    out = model(torch.randn(2, 1, 2))  # a single time step
    assert out.shape == (2, 1)
    assert model.loss(out, torch.randn(2)).shape == ()
    frames = CNNLSTM(1, 2, conv="2d", conv_channels=(3, 3, 3), kernel_size=4, num_layers=1, hidden_size=5)
    assert frames(torch.randn(2, 3, 1, 1, 1)).shape == (2, 2)  # 1x1 frames, even kernel
    assert frames.rnn.dropout == 0.0  # no inter-layer dropout with one layer


@pytest.mark.parametrize("backend", module_backends())
def test_backend_passes_through_and_matches_torch_nn(backend):
    model = CNNLSTM(3, 4, conv_channels=(5,), hidden_size=6, attention=True, backend=backend).eval()
    assert model.rnn.backend == backend
    x = _input("1d", 3)
    ours = model(x)
    clf.unswap(model)
    assert type(model.rnn) is torch.nn.LSTM
    assert_close(ours, model(x), 1e-5, 1e-6, what="CNNLSTM output vs torch.nn layers")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"conv": "3d"}, "conv must be one of"),
        ({"rnn": "rnn"}, "rnn must be one of"),
        ({"task": "ranking"}, "task must be one of"),
        ({"conv_channels": ()}, "conv_channels must name at least one layer"),
        ({"backend": "nope"}, "backend must be 'auto' or one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CNNLSTM(3, 4, **kwargs)


def test_wrong_input_rank_names_the_layout():
    with pytest.raises(ValueError, match=r"expected x of shape \(B, T, C, H, W\), got \(3, 6, 3\)"):
        CNNLSTM(3, 4, conv="2d")(_input("1d", 3))


@pytest.mark.parametrize("conv,shape", [("1d", (0, 5, 3)), ("2d", (0, 5, 3, 8, 8))])
def test_empty_batch(conv, shape):
    """An empty batch gives an empty (0, num_outputs) result, as with torch.nn's layers
    (the 2-d model's features were reshaped with an inferred size, which 0 rows lack)."""
    for backend in ("torch", "auto"):
        out = CNNLSTM(3, 4, conv=conv, backend=backend).eval()(torch.randn(*shape))
        assert out.shape == (0, 4), backend


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_conv1d_hands_off_through_the_fused_conv_to_sequence(monkeypatch, backend, rnn, train):
    """conv="1d": the last block's norm and ReLU run fused with the first projection
    (ConvToSequence); the same outputs, gradients and running statistics as the plain
    features() -> rnn path, and the state_dict keys as built."""
    import copy

    from cnnlstm_fast.ops import conv2seq

    calls = []
    real = conv2seq.projection
    # with the norm's scale: the block's call (the cpu layers' own calls on a strided
    # input have none)
    monkeypatch.setattr(conv2seq, "projection",
                        lambda *a: (a[1] is not None and calls.append(1)) or real(*a))
    torch.manual_seed(0)
    model = CNNLSTM(6, 3, conv_channels=(8, 11), rnn=rnn, hidden_size=13, backend=backend,
                    dropout=0.0).train(train)
    keys = set(model.state_dict())
    plain = copy.deepcopy(model)
    plain._handoff = lambda: None  # features() -> rnn, in plain ops
    x = torch.randn(4, 19, 6)
    outs = []
    for m in (model, plain):
        xx = x.clone().requires_grad_()
        out = m(xx)
        out.sum().backward()
        outs.append((out, xx.grad, [p.grad for p in m.parameters()],
                     [b.clone() for b in m.buffers()]))
    assert calls == [1]
    assert set(model.state_dict()) == keys
    (o1, g1, p1, b1), (o2, g2, p2, b2) = outs
    for a, e in zip([o1, g1, *p1, *b1], [o2, g2, *p2, *b2]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
