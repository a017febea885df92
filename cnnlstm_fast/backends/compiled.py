"""What the ``cpu`` and ``cuda`` backends share: the compiled torch.library ops.

``cnnlstm_fast::recurrence_forward`` / ``recurrence_backward`` are declared once in C++
(``csrc/cpu/recurrence.cpp``) with a CPU kernel there and a CUDA kernel in
``csrc/recurrence_cuda.cpp``; the dispatcher picks by the tensors' device. Both save
exactly what the ``reference`` backend saves (activations, the state before each step,
and the LSTM cell state / GRU ``a_n + b_hn``), in the compute dtype (float32 for 16-bit
inputs). The fake (shape) implementations here let torch.compile trace the ops.
"""

from __future__ import annotations

import functools
import threading

import torch

from .. import _ext
from .base import GATES, Backend
from .reference import compute_dtype

_SAVES_EXTRA = ("lstm", "gru")


_ops_lock = threading.Lock()


def ops():
    """``torch.ops.cnnlstm_fast`` once the extension is loaded and the fakes are
    registered; None when the extension is missing. Registered once, also when several
    threads make their first call at the same time (a second registration warns)."""
    with _ops_lock:
        return _ops()


@functools.cache
def _ops():
    if _ext.load() is None:
        return None
    namespace = torch.ops.cnnlstm_fast
    if not hasattr(namespace, "recurrence_forward"):
        return None
    torch.library.register_fake("cnnlstm_fast::recurrence_forward")(_forward_fake)
    torch.library.register_fake("cnnlstm_fast::recurrence_backward")(_backward_fake)
    torch.library.register_fake("cnnlstm_fast::linear")(_linear_fake)
    torch.library.register_fake("cnnlstm_fast::recurrence_forward_from_input")(
        _forward_from_input_fake
    )
    torch.library.register_autograd(
        "cnnlstm_fast::linear", _linear_backward, setup_context=_linear_setup_context
    )
    if hasattr(namespace, "pad_rows"):
        torch.library.register_fake("cnnlstm_fast::pad_rows")(_pad_rows_fake)
        torch.library.register_fake("cnnlstm_fast::pack_rows")(_pack_rows_fake)
        torch.library.register_autograd(
            "cnnlstm_fast::pad_rows", _pad_rows_backward, setup_context=_rows_setup_context)
        torch.library.register_autograd(
            "cnnlstm_fast::pack_rows", _pack_rows_backward, setup_context=_rows_setup_context)
        torch.library.register_fake("cnnlstm_fast::cat_features")(_cat_features_fake)
        torch.library.register_autograd(
            "cnnlstm_fast::cat_features", _cat_features_backward,
            setup_context=_cat_features_setup_context)
    if hasattr(namespace, "recurrence_forward_directions"):
        torch.library.register_fake("cnnlstm_fast::recurrence_forward_directions")(
            _forward_directions_fake)
        torch.library.register_fake("cnnlstm_fast::recurrence_backward_directions")(
            _backward_directions_fake)
        torch.library.register_fake("cnnlstm_fast::recurrence_forward_from_input_directions")(
            _forward_from_input_directions_fake)
    from ..ops import conv2seq  # here, not at the top: ops.conv2seq imports this module

    conv2seq.register(namespace)
    return namespace


def _cat_features_fake(parts):
    return parts[0].new_empty(*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))


def _cat_features_setup_context(ctx, inputs, output):
    ctx.widths = [p.shape[-1] for p in inputs[0]]


def _cat_features_backward(ctx, grad):
    """Each part's gradient is its slice of the features: a view, no copy."""
    return list(grad.split(ctx.widths, -1))


def _pad_rows_fake(data, index, rows):
    return data.new_empty(rows, data.shape[1])


def _pack_rows_fake(padded, index):
    return padded.new_empty(index.shape[0], padded.shape[1])


def _rows_setup_context(ctx, inputs, output):
    """pad_rows and pack_rows: each one's gradient is the other (differentiable too)."""
    ctx.save_for_backward(inputs[1])
    ctx.rows = inputs[0].shape[0]


def _pad_rows_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.cnnlstm_fast.pack_rows(grad, index), None, None


def _pack_rows_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.cnnlstm_fast.pad_rows(grad, index, ctx.rows), None


def _forward_from_input_fake(cell, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn, reverse,
                             kernel_name="auto", batch_sizes=None):
    return (
        x.new_empty(*x.shape[:-1], h0.shape[1]),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape) if cell == "lstm" else x.new_empty(0),
    )


def _linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _rows(t):
    """``t`` as a matrix of its last dimension's vectors: reshape(-1, n) is ambiguous for
    n == 0 (an input_size or hidden_size of 0), flatten is not."""
    return t.flatten(0, -2) if t.dim() > 1 else t.unsqueeze(0)


def _linear_backward(ctx, grad):
    """dx = grad W, dW = grad^T x, db = sum of grad, the GEMMs again through the op
    (transposed views, no copies; differentiable, so double backward works too)."""
    x, weight = ctx.saved_tensors
    linear = torch.ops.cnnlstm_fast.linear
    grad_2d = _rows(grad)
    d_x = linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
    d_w = (
        linear(grad_2d.t(), _rows(x).t(), None)
        if ctx.needs_input_grad[1]
        else None
    )
    d_b = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return d_x, d_w, d_b


def _forward_fake(cell, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, reverse, need_saved,
                  kernel_name="auto", pdl=False, experimental=False):
    # gx (T, B, G), or (N, G) packed rows on the cpu backend: y and the saved tensors
    # have its rows
    rows, gate_width = gx.shape[:-1], gx.shape[-1]
    batch = h0.shape[0]
    hidden = gate_width // GATES[cell]
    out = h0.shape[1]
    acc = compute_dtype(gx.dtype)

    def saved(*shape, keep=True):
        return gx.new_empty(*shape, dtype=acc) if need_saved and keep else gx.new_empty(0, dtype=acc)

    return (
        gx.new_empty(*rows, out),
        h0.new_empty(batch, out),
        c0.new_empty(batch, hidden) if cell == "lstm" else gx.new_empty(0, dtype=acc),
        saved(*rows, gate_width),
        saved(*rows, out),
        saved(*rows, hidden, keep=cell in _SAVES_EXTRA),
    )


def _backward_fake(cell, act, h_prev, extra, w_hh, w_hr, batch_sizes, reverse, d_y, d_hT, d_cT,
                   kernel_name="auto", pdl=False, experimental=False):
    rows, gate_width = act.shape[:-1], act.shape[-1]  # (T, B) or packed (N,)
    batch = d_hT.shape[0]
    hidden = gate_width // GATES[cell]
    acc = compute_dtype(d_y.dtype)
    return (
        d_y.new_empty(*rows, gate_width),
        d_hT.new_empty(d_hT.shape),
        (d_cT if d_cT is not None else d_hT).new_empty(batch, hidden)
        if cell == "lstm"
        else act.new_empty(0),
        w_hh.new_empty(w_hh.shape),
        w_hr.new_empty(w_hr.shape) if w_hr is not None else act.new_empty(0),
        act.new_empty(hidden, dtype=acc) if cell == "gru" else act.new_empty(0),
    )


def _transposed(per_direction):
    """D tuples of N tensors as N lists of D tensors (what the directions ops return)."""
    return tuple(list(column) for column in zip(*per_direction))


def _forward_directions_fake(cell, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, reverse,
                             need_saved, kernel_name="auto"):
    return _transposed(_forward_fake(cell, gx[d], h0[d], c0[d], w_hh[d], w_hr[d], b_hn[d],
                                     batch_sizes, reverse[d], need_saved)
                       for d in range(len(gx)))


def _backward_directions_fake(cell, act, h_prev, extra, w_hh, w_hr, batch_sizes, reverse, d_y,
                              d_hT, d_cT, kernel_name="auto"):
    return _transposed(_backward_fake(cell, act[d], h_prev[d], extra[d], w_hh[d], w_hr[d],
                                      batch_sizes, reverse[d], d_y[d], d_hT[d], d_cT[d])
                       for d in range(len(act)))


def _forward_from_input_directions_fake(cell, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn,
                                        reverse, kernel_name="auto", batch_sizes=None,
                                        side_by_side=True):
    _, hs, cs = _transposed(_forward_from_input_fake(cell, x, w_ih[d], gx_bias[d], h0[d], c0[d],
                                                     w_hh[d], w_hr[d], b_hn[d], reverse[d])
                            for d in range(len(w_ih)))
    return x.new_empty(*x.shape[:-1], len(w_ih) * h0[0].shape[1]), hs, cs


class CompiledOpsBackend(Backend):
    """A backend whose recurrence is the compiled op pair (see the module docstring)."""

    def unavailable_reason(self) -> str | None:
        if ops() is None:
            return _ext.load_error() or "cnnlstm_fast._C has no recurrence ops"
        return None

    def kernel_arguments(self, backward: bool) -> dict:
        """The ops' kernel selection (``kernel_name``, ``pdl``, ``experimental``) for a call:
        none here, the ops' defaults; the cpu backend's is ``cpu.set_kernel``'s setting, the
        cuda backend's what ``cnnlstm_fast/experimental.py`` selects."""
        return {}

    def forward(self, spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved):
        # torch.ops directly (not ops()): Dynamo traces this call, and unavailable_reason()
        # has loaded the extension and registered the fakes before any forward.
        y, h_t, c_t, act, h_prev, extra = torch.ops.cnnlstm_fast.recurrence_forward(
            spec.cell, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, spec.reverse, need_saved,
            **self.kernel_arguments(backward=False),
        )
        saved = ()
        if need_saved:
            saved = (act, h_prev, extra if spec.cell in _SAVES_EXTRA else None, w_hh, w_hr)
        return y, h_t, c_t if spec.cell == "lstm" else None, saved

    def backward(self, spec, saved, batch_sizes, d_y, d_hT, d_cT):
        act, h_prev, extra, w_hh, w_hr = saved
        d_gx, dh0, dc0, d_w_hh, d_w_hr, d_b_hn = torch.ops.cnnlstm_fast.recurrence_backward(
            spec.cell, act, h_prev, extra, w_hh, w_hr, batch_sizes, spec.reverse,
            d_y, d_hT, d_cT, **self.kernel_arguments(backward=True),
        )
        return (
            d_gx,
            dh0,
            dc0 if spec.cell == "lstm" else None,
            d_w_hh,
            d_w_hr if w_hr is not None else None,
            d_b_hn if spec.cell == "gru" else None,
        )
