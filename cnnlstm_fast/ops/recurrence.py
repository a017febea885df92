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
    """forward / setup_context / backward in the form torch.func's transforms (grad,
    vmap through its generated rule, jacrev) take, as torch.nn's own layers do: what
    backward needs is returned by forward as extra outputs marked non-differentiable
    (setup_context may save only inputs and outputs)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backend, spec, batch_sizes, need_saved, gx, h0, c0, w_hh, w_hr, b_hn):
        y, h_t, c_t, saved = backend.forward(
            spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved
        )
        # A saved tensor that is an input or one of the outputs is saved as a view of it:
        # autograd refuses to save an input returned as an output, and marking an output
        # non-differentiable would mark the same tensor among y, h_T, c_T too.
        keep = (gx, h0, c0, w_hh, w_hr, b_hn, y, h_t, c_t)
        saved = tuple(
            t.view_as(t) if isinstance(t, torch.Tensor) and any(t is k for k in keep) else t
            for t in saved
        )
        return (y, h_t, c_t, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, spec, batch_sizes, _, gx, h0, c0, w_hh, w_hr, b_hn = inputs
        y, h_t, c_t, *saved = output
        ctx.backend, ctx.spec, ctx.batch_sizes = backend, spec, batch_sizes
        ctx.input_dtypes = [None if v is None else v.dtype for v in (gx, h0, c0, w_hh, w_hr, b_hn)]
        ctx.outputs_like = [None if v is None else (v.shape, v.dtype, v.device) for v in (y, h_t, c_t)]
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*(t for t in saved if isinstance(t, torch.Tensor)))
        # the saved outputs get no gradient: no zeros the size of the activations for them
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_y, d_hT, d_cT, *_):
        if _second_derivative():
            raise NotImplementedError(  # a RuntimeError, as torch's for cuDNN's RNNs
                f"cnnlstm_fast {ctx.spec.cell} layer (backend {ctx.backend.name!r}): a second "
                "derivative through the recurrence (backward or autograd.grad with "
                "create_graph=True, e.g. a gradient penalty) is not supported: its backward "
                "is computed once, without a graph. Use backend='torch' for this layer: "
                "torch.nn's native implementation supports it (on CUDA with cuDNN disabled "
                "for the forward: torch.backends.cudnn.flags(enabled=False))."
            )
        # zeros for an output whose gradient autograd left out (materialize_grads is off)
        d_y, d_hT, d_cT = (
            g if g is not None or like is None
            else torch.zeros(like[0], dtype=like[1], device=like[2])
            for g, like in zip((d_y, d_hT, d_cT), ctx.outputs_like)
        )
        grads = ctx.backend.backward(
            ctx.spec, ctx.saved_tensors, ctx.batch_sizes, d_y, d_hT, d_cT
        )
        grads = [
            None if (g is None or dt is None or not need) else g.to(dt)
            for g, dt, need in zip(grads, ctx.input_dtypes, ctx.needs_input_grad[4:])
        ]
        return (None, None, None, None, *grads)


def _second_derivative() -> bool:
    """Whether this backward is being differentiated itself. Autograd runs a backward
    with grad mode on iff create_graph; torch.func's grad and vjp run theirs with it on
    always, one transform level per derivative, so there it is two levels or more."""
    levels = 0 if torch.compiler.is_compiling() else _functorch_grad_levels()
    return levels > 1 if levels else torch.is_grad_enabled()


def _functorch_grad_levels() -> int:
    """The torch.func transforms that differentiate (grad, vjp, jacrev, jvp) active now;
    0 outside them. torch.func has no public query for it."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # a torch without it: treated as outside the transforms
        return 0
    return sum(str(i.key()).rsplit(".", 1)[-1] in ("Grad", "Jvp")
               for i in retrieve_all_functorch_interpreters())


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
    # what backward needs is kept only where autograd will run it: grad mode on (forward
    # itself runs without it) and a tensor requiring grad
    need_saved = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (gx, h0, c0, w_hh, w_hr, b_hn))
    y, h_t, c_t, *_ = _Recurrence.apply(
        backend, spec, batch_sizes, need_saved, gx, h0, c0, w_hh, w_hr, b_hn)
    return y, h_t, c_t
