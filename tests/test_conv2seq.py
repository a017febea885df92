"""cnnlstm_fast.ConvToSequence against its definition in plain ops (norm -> activation ->
reduce over H -> the rnn's layout -> rnn, packed with lengths), forward, gradients and
the norm's running statistics; its errors; float64 gradcheck; torch.compile."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import cnnlstm_fast as clf
from helpers import leaves, module_backends

C, H, B, T, HEIGHT = 5, 6, 4, 7, 3
ACTS = {None: lambda t: t, "relu": F.relu, "leaky_relu": F.leaky_relu, "hardtanh": F.hardtanh,
        "gelu": F.gelu, "tanh": torch.tanh}


def plain(rnn, norm, activation, reduce, x, lengths=None, hx=None):
    """The definition: what ConvToSequence must compute, in torch.nn and plain ops."""
    seq = x if norm is None else norm(x)
    seq = ACTS[activation](seq)
    if reduce == "mean":
        seq = seq.mean(2)
    elif reduce == "max":
        seq = seq.amax(2)
    seq = seq.permute(0, 2, 1) if rnn.batch_first else seq.permute(2, 0, 1)
    if lengths is None:
        return rnn(seq, hx)
    packed = pack_padded_sequence(seq, lengths, batch_first=rnn.batch_first, enforce_sorted=False)
    out, hidden = rnn(packed, hx)
    return pad_packed_sequence(out, batch_first=rnn.batch_first, total_length=x.shape[-1])[0], hidden


def make(cls_name="LSTM", backend="auto", norm=True, activation="relu", reduce=None,
         dtype=torch.float32, **rnn_kwargs):
    theirs_rnn = getattr(nn, cls_name)(C, H, **rnn_kwargs).to(dtype)
    ours_rnn = getattr(clf, cls_name)(C, H, **rnn_kwargs, backend=backend).to(dtype)
    ours_rnn.load_state_dict(theirs_rnn.state_dict())
    norm_module = None
    if norm:
        norm_module = (nn.BatchNorm1d if reduce is None else nn.BatchNorm2d)(C).to(dtype)
        with torch.no_grad():  # not the identity: a learnt affine and running statistics
            norm_module.weight.uniform_(0.5, 1.5)
            norm_module.bias.uniform_(-0.5, 0.5)
            norm_module.running_mean.uniform_(-0.3, 0.3)
            norm_module.running_var.uniform_(0.5, 2.0)
    block = clf.ConvToSequence(ours_rnn, norm=copy.deepcopy(norm_module), activation=activation,
                               reduce=reduce)
    return block, (theirs_rnn, norm_module)


def raw(reduce, batch=B, steps=T, dtype=torch.float32):
    shape = (batch, C, steps) if reduce is None else (batch, C, HEIGHT, steps)
    return torch.randn(shape, dtype=dtype)


def run(fn, x, params):
    """Outputs, and gradients of x and of ``params`` for fixed random cotangents."""
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    outs = leaves(fn(x))
    gen = torch.Generator().manual_seed(3)
    sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs).backward()
    return [o.detach() for o in outs], [x.grad, *(p.grad for p in params)]


CASES = list(itertools.product(["LSTM", "GRU"], [None, "mean", "max"], [False, True]))


@pytest.mark.parametrize("backend", [*module_backends(), "auto"])
@pytest.mark.parametrize("cls_name,reduce,batch_first", CASES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("with_lengths", [None, [T, 1, 4, T], [T - 2, 1, 4, 3]],
                         ids=["padded", "lengths", "shorter_lengths"])
def test_block_computes_its_definition(cls_name, reduce, batch_first, train, with_lengths, backend):
    block, (rnn, norm) = make(cls_name, backend, reduce=reduce, batch_first=batch_first,
                              num_layers=2, bidirectional=True)
    block.train(train)
    rnn.train(train)
    norm.train(train)
    x = raw(reduce)
    lengths = None if with_lengths is None else torch.tensor(with_lengths)
    got = run(lambda v: block(v, lengths), x, [*block.rnn.parameters(), *block.norm.parameters()])
    want = run(lambda v: plain(rnn, norm, "relu", reduce, v, lengths), x,
               [*rnn.parameters(), *norm.parameters()])
    for a, e in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(block.norm, name), getattr(norm, name))


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("norm", [False, True], ids=["no_norm", "norm"])
def test_each_activation_with_and_without_norm(activation, norm):
    block, (rnn, norm_module) = make("GRU", norm=norm, activation=activation)
    x = raw(None)
    params_o = list(block.parameters())
    params_t = [*rnn.parameters(), *(norm_module.parameters() if norm else [])]
    got = run(block, x, params_o)
    want = run(lambda v: plain(rnn, norm_module, activation, None, v), x, params_t)
    for a, e in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_one_step_an_empty_batch_and_hx():
    block, (rnn, norm) = make("LSTM", batch_first=True)
    block.eval(), rnn.eval(), norm.eval()
    x = raw(None, steps=1)
    hx = (torch.randn(1, B, H), torch.randn(1, B, H))
    for a, e in zip(leaves(block(x, hx=hx)), leaves(plain(rnn, norm, "relu", None, x, hx=hx))):
        torch.testing.assert_close(a, e)
    empty = raw(None, batch=0)
    for lengths in (None, torch.zeros(0, dtype=torch.int64)):
        out, (h, c) = block(empty, lengths)
        assert out.shape == (0, T, H) and h.shape == (1, 0, H) and c.shape == (1, 0, H)


def test_float64_gradcheck():
    block, _ = make("LSTM", norm=True, activation="tanh", reduce="mean", dtype=torch.float64)
    block.eval()
    x = raw("mean", batch=2, steps=3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: block(v, torch.tensor([3, 2]))[0], (x,))
    block.train()  # batch statistics: every row's gradient depends on every other's
    assert torch.autograd.gradcheck(lambda v: block(v)[0], (x,))


def test_state_dict_holds_rnn_and_norm_and_a_torch_nn_rnn_becomes_ours_in_place():
    rnn = nn.GRU(C, H)
    block = clf.ConvToSequence(rnn, norm=nn.BatchNorm1d(C))
    assert block.rnn is rnn and isinstance(rnn, clf.GRU) and rnn.backend == "auto"
    keys = set(block.state_dict())
    assert keys == {f"rnn.{k}" for k in nn.GRU(C, H).state_dict()} | {
        f"norm.{k}" for k in nn.BatchNorm1d(C).state_dict()}
    chosen = clf.LSTM(C, H, backend="reference")
    assert clf.ConvToSequence(chosen).rnn.backend == "reference"  # ours keeps its backend


@pytest.mark.parametrize("make_block,match", [
    (lambda: clf.ConvToSequence(nn.LSTMCell(C, H)), "rnn must be an LSTM, GRU or RNN"),
    (lambda: clf.ConvToSequence(nn.LSTM(C, H), activation="swish"), "activation must be one of"),
    (lambda: clf.ConvToSequence(nn.LSTM(C, H), reduce="sum"), "reduce must be one of"),
    (lambda: clf.ConvToSequence(nn.LSTM(C, H), norm=nn.BatchNorm2d(C)), "BatchNorm1d"),
    (lambda: clf.ConvToSequence(nn.LSTM(C, H), norm=nn.BatchNorm1d(C), reduce="max"), "BatchNorm2d"),
    (lambda: clf.ConvToSequence(nn.LSTM(C, H), norm=nn.BatchNorm1d(C + 1)), r"num_features .* \(5\), got 6"),
])
def test_constructor_errors_name_the_argument(make_block, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make_block()


def test_forward_errors_name_the_argument_and_the_shapes():
    block = clf.ConvToSequence(clf.GRU(C, H))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, T\), got \(4, 5, 3, 7\)"):
        block(raw("mean"))
    with pytest.raises(ValueError, match=r"C = rnn.input_size = 5 channels .* got shape \(4, 6, 7\)"):
        block(torch.randn(B, C + 1, T))
    with pytest.raises(ValueError, match=r"lengths must be 4 integers"):
        block(raw(None), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 7\] .* got min 0, max 8"):
        block(raw(None), torch.tensor([0, 2, 8, 3]))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fullgraph_torch_compile_matches_eager(train):
    """Dynamo graph-breaks at any module that is a torch.nn LSTM/GRU/RNN (ours are)
    unless torch._dynamo.config.allow_rnn, as for torch.nn's: with it, one graph."""
    block, _ = make("GRU", backend="auto", reduce="max", batch_first=True)
    block.train(train)
    x = raw("max")
    lengths = torch.tensor([T, 2, 5, 1])
    with torch._dynamo.config.patch(allow_rnn=True):
        # padded: one graph; packed lengths are data-dependent shapes, so graph breaks
        for full, lens in ((True, None), (False, lengths)):
            eager = run(lambda v: block(v, lens), x, list(block.parameters()))
            compiled = torch.compile(block, backend="aot_eager", fullgraph=full)
            got = run(lambda v: compiled(v, lens), x, list(block.parameters()))
            for a, e in zip(got[0] + got[1], eager[0] + eager[1]):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ----- the fused path: which calls take it, and the op against its composition -----

def _spy(monkeypatch):
    from cnnlstm_fast.ops import conv2seq as ops

    calls = []
    real = ops.projection

    def spy(*args):
        if args[1] is not None:  # with the norm's scale: the block's call, not a layer's
            calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(ops, "projection", spy)
    return calls


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calls_on_our_backends_take_the_fused_projection(monkeypatch, backend, dtype):
    calls = _spy(monkeypatch)
    block, _ = make("LSTM", backend=backend, reduce="max", dtype=dtype, bidirectional=True)
    block(raw("max", dtype=dtype))
    assert calls == [dtype]
    block(raw("max", dtype=dtype), torch.tensor([T, 1, 4, T - 2]))  # packed: fused too
    assert calls == [dtype, dtype]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the composition
        block(raw("max", dtype=dtype))
    torch_block, _ = make("LSTM", backend="torch", reduce="max", dtype=dtype)
    torch_block(raw("max", dtype=dtype))
    assert calls == [dtype, dtype]


def _composition(x, scale, shift, activation, reduce, w_ih, bias, directions):
    from cnnlstm_fast.ops import conv2seq as ops

    seq, _, _ = ops._affine_act(x, scale, shift, activation, reduce)
    gx = F.linear(seq.permute(2, 0, 1), w_ih, bias)
    return gx.view(seq.shape[2], seq.shape[0], directions, -1).permute(2, 0, 1, 3)


OP_SHAPES = [  # (B, C, H or None, T, G, D): odd sizes, T past a 96-row task and 12-row
    (1, 1, None, 1, 1, 1),  # tiles, C past a 256-channel block of K, G off the 32-column panel
    (3, 7, None, 13, 20, 2),
    (2, 300, None, 101, 36, 2),
    (5, 17, 2, 29, 64, 1),
    (4, 9, 1, 97, 12, 2),
]


@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu", "hardtanh", "gelu", "tanh"])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=str)
def test_projection_op_matches_its_composition_forward_and_backward(activation, shape):
    from cnnlstm_fast.ops import conv2seq as ops

    b, c, height, t, g, d = shape
    reduces = [None] if height is None else ["mean", "max"]
    for reduce in reduces:
        full = (b, c, t) if height is None else (b, c, height, t)
        # the conv's output in channels_last-like strides: no copy is asked of it
        x = torch.randn(tuple(reversed(full))).permute(*reversed(range(len(full))))
        x = (x * 2).requires_grad_()
        scale = torch.rand(c).add(0.5).requires_grad_()
        shift = torch.randn(c).requires_grad_()
        w = torch.randn(d * g, c).div(c ** 0.5).requires_grad_()
        bias = torch.randn(d * g).requires_grad_()
        args = (scale, shift, activation, reduce, w, bias, d)
        parts = ops.projection(x, *args)
        assert [p.shape for p in parts] == [(t, b, g)] * d
        assert all(p.is_contiguous() for p in parts)
        got = torch.stack(parts)
        want = _composition(x, *args)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        cot = torch.randn_like(got)
        inputs = (x, scale, shift, w, bias)
        g_got = torch.autograd.grad((got * cot).sum(), inputs)
        g_want = torch.autograd.grad((want * cot).sum(), inputs)
        for a, e in zip(g_got, g_want):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reduce", [None, "mean", "max"])
def test_projection_op_float64_gradcheck_and_gradgradcheck(reduce):
    from cnnlstm_fast.ops import conv2seq as ops

    full = (2, 3, 5) if reduce is None else (2, 3, 2, 5)
    dt = torch.float64
    x = torch.randn(full, dtype=dt, requires_grad=True)
    scale = torch.rand(3, dtype=dt).add(0.5).requires_grad_()
    shift = torch.randn(3, dtype=dt, requires_grad=True)
    w = torch.randn(2 * 4, 3, dtype=dt, requires_grad=True)
    bias = torch.randn(8, dtype=dt, requires_grad=True)

    def f(x, scale, shift, w, bias):
        return tuple(ops.projection(x, scale, shift, "tanh", reduce, w, bias, 2))

    assert torch.autograd.gradcheck(f, (x, scale, shift, w, bias))
    assert torch.autograd.gradgradcheck(f, (x, scale, shift, w, bias))


def _input_sized_copies(fn, numel):
    """Copies (clone, copy_, contiguous) of a tensor of ``numel`` elements made by fn()."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        fn()
    found = []
    for event in prof.events():
        if event.name in ("aten::copy_", "aten::clone", "aten::contiguous") and event.input_shapes:
            shape = event.input_shapes[0]
            if shape and int(torch.Size(shape).numel()) == numel:
                found.append((event.name, shape))
    return found


@pytest.mark.parametrize("view", ["batch_first_transpose", "time_major_permute"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cpu_layers_read_a_conv_output_view_without_copying_it(view, bidirectional):
    """§1 of the whole-model work: (B, C, T).transpose(1, 2) for batch_first and
    (B, C, T).permute(2, 0, 1) time-major reach the input projection as views, forward
    (inference and training) and backward make no copy of the input's storage."""
    batch, channels, steps = 5, 24, 37
    batch_first = view == "batch_first_transpose"
    rnn = clf.LSTM(channels, 16, num_layers=2, bidirectional=bidirectional,
                   batch_first=batch_first, backend="cpu")
    ref = nn.LSTM(channels, 16, num_layers=2, bidirectional=bidirectional,
                  batch_first=batch_first)
    ref.load_state_dict(rnn.state_dict())
    raw_x = torch.randn(batch, channels, steps, requires_grad=True)
    as_seq = (lambda r: r.transpose(1, 2)) if batch_first else (lambda r: r.permute(2, 0, 1))
    numel = raw_x.numel()
    with torch.no_grad():
        assert _input_sized_copies(lambda: rnn(as_seq(raw_x)), numel) == []
        torch.testing.assert_close(rnn(as_seq(raw_x))[0], ref(as_seq(raw_x))[0])
    out = {}

    def train():
        out["y"] = rnn(as_seq(raw_x))[0]
        out["y"].sum().backward()

    assert _input_sized_copies(train, numel) == []
    grad = raw_x.grad.clone()
    raw_x.grad = None
    ref(as_seq(raw_x))[0].sum().backward()
    torch.testing.assert_close(grad, raw_x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_fused_path_compiles_to_one_graph(monkeypatch, train, cls_name):
    """The fused path itself under torch.compile(fullgraph=True): the backend pinned to
    cpu, so the block fuses at any length (auto would hand these short sequences to
    torch.nn), forward and backward through the op's fake and autograd formula."""
    calls = _spy(monkeypatch)
    block, _ = make(cls_name, backend="cpu", reduce="mean", batch_first=True,
                    bidirectional=True, num_layers=2)
    block.train(train)
    x = raw("mean")
    eager = run(block, x, list(block.parameters()))
    assert calls == [torch.float32]
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        got = run(compiled, x, list(block.parameters()))
    assert calls == [torch.float32] * 2  # traced through the fused path too
    for a, e in zip(got[0] + got[1], eager[0] + eager[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
