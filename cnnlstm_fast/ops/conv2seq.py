"""The conv-to-sequence projection: a recurrent stack's first G_x from a raw conv output.

``projection(x, scale, shift, activation, reduce, w_ih, bias, directions)`` is

    seq = reduce_H(activation(x * scale[c] + shift[c]))     # x (B, C, T) or (B, C, H, W)
    G_x[d] = seq laid out (T, B, C) @ w_ih[d]^T + bias[d]   # D tensors (T, B, G)

On CPU it is the op ``cnnlstm_fast::conv2seq_projection`` (``csrc/cpu/conv2seq.cpp``):
for float32 with AVX-512, one pass that applies the affine, the activation and the
reduction while the GEMM packs its row tiles, so the activated sequence is never
written; ATen ops otherwise. Elsewhere (CUDA) the same composition in PyTorch ops.

Its backward (registered below) recomputes the activation from the saved raw input:
dW = dG^T seq, dseq = dG W, then the reduction's, the activation's and the affine's
derivatives in PyTorch ops, which are differentiable again (double backward works).
:func:`fold_norm` turns a BatchNorm into (scale, shift) with torch's training and eval
semantics; in training its batch statistics stay in the graph, so autograd carries the
gradient through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import compiled

__all__ = ["ACTIVATIONS", "REDUCTIONS", "fold_norm", "projection", "reference_sequence"]

#: The activations the block applies (torch's defaults for their parameters).
ACTIVATIONS = {
    None: None,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "hardtanh": F.hardtanh,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}
REDUCTIONS = (None, "mean", "max")


def reference_sequence(x, norm, activation, reduce):
    """activation(norm(x)), reduced over H: the (B, C, T) sequence in PyTorch ops."""
    seq = x if norm is None else norm(x)
    act = ACTIVATIONS[activation]
    if act is not None:
        seq = act(seq)
    if reduce == "mean":
        seq = seq.mean(2)
    elif reduce == "max":
        seq = seq.amax(2)
    return seq


def fold_norm(norm: nn.modules.batchnorm._BatchNorm | None, x: torch.Tensor):
    """``norm(x)`` as a per-channel ``x * scale + shift``: (scale, shift), or (None, None)
    without a norm. Follows ``torch.nn.functional.batch_norm``: batch statistics (biased
    variance) where the module trains or keeps no running statistics, and then the running
    statistics updated (unbiased variance, ``momentum``, or the cumulative average when
    it is None) and ``num_batches_tracked`` counted, as the module's forward does."""
    if norm is None:
        return None, None
    dims = [0] + list(range(2, x.dim()))
    average = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        average = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    if batch_stats:
        count = x.numel() // max(x.shape[1], 1)
        if count <= 1 and norm.training and x.numel():
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {torch.Size(x.shape)}")
        var, mean = torch.var_mean(x, dims, correction=0)
        if norm.training and norm.running_mean is not None and count > 0:
            with torch.no_grad():
                norm.running_mean.mul_(1 - average).add_(mean.detach(), alpha=average)
                unbiased = var.detach() * (count / max(count - 1, 1))
                norm.running_var.mul_(1 - average).add_(unbiased, alpha=average)
    else:
        mean, var = norm.running_mean, norm.running_var
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale.to(x.dtype), shift.to(x.dtype)


def projection(x, scale, shift, activation, reduce, w_ih, bias, directions, batch_order=None):
    """G_x of each direction, a list of D contiguous (T, B, G) tensors (see the module
    docstring). ``batch_order`` (B int64, a CPU permutation): row b of x becomes row
    ``batch_order[b]`` of G_x (a packed sequence's sorted order)."""
    if x.device.type == "cpu" and _op() is not None:
        return _op()(x, scale, shift, activation or "none", reduce or "none", w_ih, bias,
                     directions, batch_order)
    seq = _affine_act(x, scale, shift, activation, reduce)[0]
    if batch_order is not None:
        seq = seq.index_select(0, torch.argsort(batch_order.to(seq.device)))
    steps, batch = seq.shape[2], seq.shape[0]
    gx = F.linear(seq.permute(2, 0, 1), w_ih, bias)
    return [part.contiguous() for part in gx.view(steps, batch, directions, -1).unbind(2)]


def _affine_act(x, scale, shift, activation, reduce):
    """(seq (B, C, T), pre-activation, activation before the reduction)."""
    shape = [1] * x.dim()
    if x.dim() > 1:
        shape[1] = x.shape[1]
    pre = x
    if scale is not None:
        pre = pre * scale.view(shape)
    if shift is not None:
        pre = pre + shift.view(shape)
    act = ACTIVATIONS[None if activation == "none" else activation]
    a = pre if act is None else act(pre)
    if reduce == "mean":
        seq = a.mean(2)
    elif reduce == "max":
        seq = a.amax(2)
    else:
        seq = a
    return seq, pre, a


def _activation_backward(activation, grad, pre, a):
    if activation in (None, "none"):
        return grad
    if activation == "relu":
        return grad * (pre > 0)
    if activation == "leaky_relu":
        return torch.where(pre > 0, grad, grad * 0.01)
    if activation == "hardtanh":
        return grad * ((pre > -1) & (pre < 1))
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    return grad * (1 - a * a)  # tanh


def _fast_backward(x) -> bool:
    """Whether the backward's GEMMs run in C++ (conv2seq_projection_backward): float32 on
    a CPU with the AVX-512 GEMM, and not while a graph of the backward is recorded
    (create_graph: the op has no derivative of its own, the PyTorch ops do)."""
    from ..backends import _cpu_gemm_is_avx512

    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and _op() is not None and _cpu_gemm_is_avx512())


def _projection_backward(grads, seq, w_ih, need_seq, need_w):
    """(d_seq (B, C, T), dW) of G_x[d] = seq (T, B, C) W_d^T, in PyTorch ops."""
    batch, _, steps = seq.shape
    gates = w_ih.shape[0] // len(grads)
    rows = seq.permute(2, 0, 1).reshape(steps * batch, seq.shape[1])  # time-major
    mm = _matmul(seq)
    d_rows = d_w = None
    for d, grad in enumerate(grads):
        g = grad.reshape(steps * batch, gates)
        if need_seq:
            part = mm(g, w_ih[d * gates:(d + 1) * gates])
            d_rows = part if d_rows is None else d_rows + part
        if need_w:
            part = mm(g.t(), rows)
            d_w = part if d_w is None else torch.cat([d_w, part])
    d_seq = None if d_rows is None else d_rows.view(steps, batch, -1).permute(1, 2, 0)
    return d_seq, d_w


def _matmul(like):
    """a @ b: float32 CPU products through the cpu backend's GEMM (``cnnlstm_fast::linear``,
    as the layers' own projection gradients), torch's matmul otherwise."""
    if like.device.type == "cpu" and like.dtype == torch.float32 and _op() is not None:
        linear = torch.ops.cnnlstm_fast.linear
        return lambda a, b: linear(a, b.t(), None)
    return torch.matmul


def _fake(x, scale, shift, activation, reduce, w_ih, bias, directions, batch_order):
    steps, batch = x.shape[-1], x.shape[0]
    gates = w_ih.shape[0] // directions
    return [x.new_empty(steps, batch, gates) for _ in range(directions)]


def _setup_context(ctx, inputs, output):
    x, scale, shift, activation, reduce, w_ih, bias, directions, batch_order = inputs
    ctx.save_for_backward(x, scale, shift, w_ih, batch_order)
    ctx.activation, ctx.reduce, ctx.directions = activation, reduce, directions
    ctx.has_bias = bias is not None


def _backward(ctx, grads):
    x, scale, shift, w_ih, batch_order = ctx.saved_tensors
    need = ctx.needs_input_grad
    directions = ctx.directions
    steps, batch = x.shape[-1], x.shape[0]
    gates = w_ih.shape[0] // directions
    grads = [torch.zeros(steps, batch, gates, dtype=x.dtype, device=x.device) if g is None
             else g for g in grads]
    need_seq = need[0] or need[1] or need[2]
    # the prologue's backward in one C++ pass (not while a graph of the backward is
    # recorded: create_graph needs the PyTorch ops below, which are differentiable)
    fast_prologue = (x.device.type == "cpu" and not torch.is_grad_enabled()
                     and ctx.reduce != "max" and _OP is not None)
    seq = pre = a = None
    if need[5] or not fast_prologue:
        seq, pre, a = _affine_act(x, scale, shift, ctx.activation, ctx.reduce)
    if _fast_backward(x):
        if seq is None:  # dW not asked for: the op reads no sequence
            seq = x.new_empty(()).expand(x.shape[0], x.shape[1], x.shape[-1])
        d_seq, d_w = torch.ops.cnnlstm_fast.conv2seq_projection_backward(
            grads, seq, w_ih, need_seq, need[5], batch_order)
    else:
        if batch_order is not None:  # each sequence's rows back at its own index
            grads = [g.index_select(1, batch_order) for g in grads]
        d_seq, d_w = _projection_backward(grads, seq, w_ih, need_seq, need[5])
    d_b = torch.cat([g.sum((0, 1)) for g in grads]) if ctx.has_bias and need[6] else None
    d_x = d_scale = d_shift = None
    if d_seq is not None and fast_prologue:
        d_x, d_scale, d_shift = torch.ops.cnnlstm_fast.conv2seq_prologue_backward(
            x, d_seq, scale, shift, ctx.activation or "none", ctx.reduce or "none", need[0])
        d_scale = d_scale if need[1] and scale is not None else None
        d_shift = d_shift if need[2] and shift is not None else None
    elif d_seq is not None:
        if ctx.reduce == "mean":
            d_a = (d_seq / a.shape[2]).unsqueeze(2).expand_as(a)
        elif ctx.reduce == "max":
            hit = a == seq.unsqueeze(2)
            d_a = hit * (d_seq / hit.sum(2)).unsqueeze(2)
        else:
            d_a = d_seq
        d_pre = _activation_backward(ctx.activation, d_a, pre, a)
        dims = [0] + list(range(2, x.dim()))
        shape = [1] * x.dim()
        shape[1] = x.shape[1]
        if need[0]:
            d_x = d_pre if scale is None else d_pre * scale.view(shape)
        if need[1] and scale is not None:
            d_scale = (d_pre * x).sum(dims)
        if need[2] and shift is not None:
            d_shift = d_pre.sum(dims)
    return d_x, d_scale, d_shift, None, None, d_w, d_b, None, None


def _backward_fake(grads, seq, w_ih, need_seq, need_w, batch_order):
    batch, channels, steps = seq.shape
    return (seq.new_empty(batch, channels, steps) if need_seq else None,
            w_ih.new_empty(w_ih.shape) if need_w else None)


def _prologue_backward_fake(x, d_seq, scale, shift, activation, reduce, need_x):
    channels = x.shape[1]
    return (x.new_empty(x.shape) if need_x else None, x.new_empty(channels),
            x.new_empty(channels))


_OP = None  # the registered op, once _registered() has run


def register(namespace) -> None:
    """Registers the op's fake and autograd formula (called once, by
    ``backends.compiled.ops()`` when it loads the extension)."""
    global _OP
    if not hasattr(namespace, "conv2seq_projection"):
        return
    torch.library.register_fake("cnnlstm_fast::conv2seq_projection")(_fake)
    torch.library.register_fake("cnnlstm_fast::conv2seq_projection_backward")(_backward_fake)
    torch.library.register_fake("cnnlstm_fast::conv2seq_prologue_backward")(
        _prologue_backward_fake)
    torch.library.register_autograd("cnnlstm_fast::conv2seq_projection", _backward,
                                    setup_context=_setup_context)
    _OP = namespace.conv2seq_projection


def _op():
    """The op, or None without the extension. Under torch.compile only read: the
    extension was loaded by an eager call before (the module constructors make one), and
    Dynamo cannot trace the loading's lock."""
    if not torch.compiler.is_compiling():
        compiled.ops()
    return _OP
