"""The recurrence op: one layer, one direction, any cell, any backend.

An autograd.Function that calls a backend's forward and its explicit backward (the
contract in ``cnnlstm_fast/backends/base.py``). Gradients come back in the dtype of
the tensor they belong to.

The backward is computed once, from the saved activations, without a graph: a second
derivative (``create_graph=True``, as a gradient penalty takes) raises an error instead
of leaving out the recurrence's terms. ``once_differentiable`` alone would not catch it:
it raises only when the incoming gradients require grad, and ``y.sum()``'s do not.
"""

from __future__ import annotations

import torch

from ..backends.base import Backend, RecurrenceSpec


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, spec, batch_sizes, grad_enabled, gx, h0, c0, w_hh, w_hr, b_hn):
        # needs_input_grad is set from requires_grad even under no_grad; the grad mode of
        # the caller (forward() itself always runs without it) decides.
        need_saved = grad_enabled and any(ctx.needs_input_grad[4:])
        y, h_t, c_t, saved = backend.forward(
            spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved
        )
        ctx.backend, ctx.spec, ctx.batch_sizes = backend, spec, batch_sizes
        ctx.input_dtypes = [None if v is None else v.dtype for v in (gx, h0, c0, w_hh, w_hr, b_hn)]
        ctx.save_for_backward(*saved)
        if c_t is None:
            return y, h_t
        return y, h_t, c_t

    @staticmethod
    def backward(ctx, d_y, d_hT, d_cT=None):
        if torch.is_grad_enabled():  # autograd runs a backward with grad on iff create_graph
            raise NotImplementedError(  # a RuntimeError, as torch's for cuDNN's RNNs
                f"cnnlstm_fast {ctx.spec.cell} layer (backend {ctx.backend.name!r}): a second "
                "derivative through the recurrence (backward or autograd.grad with "
                "create_graph=True, e.g. a gradient penalty) is not supported: its backward "
                "is computed once, without a graph. Use backend='torch' for this layer: "
                "torch.nn's native implementation supports it (on CUDA with cuDNN disabled "
                "for the forward: torch.backends.cudnn.flags(enabled=False))."
            )
        grads = ctx.backend.backward(
            ctx.spec, ctx.saved_tensors, ctx.batch_sizes, d_y, d_hT, d_cT
        )
        grads = [
            None if (g is None or dt is None or not need) else g.to(dt)
            for g, dt, need in zip(grads, ctx.input_dtypes, ctx.needs_input_grad[4:])
        ]
        return (None, None, None, None, *grads)


def recurrence(
    backend: Backend,
    spec: RecurrenceSpec,
    gx: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None = None,
    b_hn: torch.Tensor | None = None,
    batch_sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Runs one layer and direction: returns ``(Y, h_T, c_T or None)``."""
    grad_enabled = torch.is_grad_enabled()
    out = _Recurrence.apply(backend, spec, batch_sizes, grad_enabled, gx, h0, c0, w_hh, w_hr, b_hn)
    if c0 is None:
        return out[0], out[1], None
    return out
