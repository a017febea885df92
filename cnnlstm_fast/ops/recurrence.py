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
    def forward(backend, spec, batch_sizes, need_saved, outer, gx, h0, c0, w_hh, w_hr, b_hn):
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
        backend, spec, batch_sizes, _, outer, gx, h0, c0, w_hh, w_hr, b_hn = inputs
        y, h_t, c_t, *saved = output
        ctx.backend, ctx.spec, ctx.batch_sizes, ctx.outer = backend, spec, batch_sizes, outer
        ctx.input_dtypes = [None if v is None else v.dtype for v in (gx, h0, c0, w_hh, w_hr, b_hn)]
        ctx.outputs_like = [None if v is None else (v.shape, v.dtype, v.device) for v in (y, h_t, c_t)]
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*(t for t in saved if isinstance(t, torch.Tensor)))
        # the saved outputs get no gradient: no zeros the size of the activations for them
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_y, d_hT, d_cT, *_):
        if ctx.outer and torch.is_grad_enabled():
            raise NotImplementedError(_second_derivative_message(ctx) + (
                " (Here: a torch.func transform's gradient, with a tensor that requires "
                "grad outside the transform too.)"))
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
            for g, dt, need in zip(grads, ctx.input_dtypes, ctx.needs_input_grad[5:])
        ]
        if torch.is_grad_enabled():
            # A graph is being built around this backward (create_graph=True, torch.func's
            # vjp/grad): our gradients are computed without one, so a derivative of them
            # would lack the recurrence's terms. They leave through a node that raises
            # when it is differentiated, and only then: a first-order vjp still works.
            grads = _refuse_second_derivative(ctx, grads)
        return (None, None, None, None, None, *grads)


_SECOND_DERIVATIVE = (
    "cnnlstm_fast {cell} layer (backend {backend!r}): a second derivative through the "
    "recurrence (backward or autograd.grad with create_graph=True and then a derivative "
    "of those gradients, e.g. a gradient penalty, a Hessian, torch.func.grad of grad) is "
    "not supported: its backward is computed once, without a graph. Use backend='torch' "
    "for this layer: torch.nn's native implementation supports it (on CUDA with cuDNN "
    "disabled for the forward: torch.backends.cudnn.flags(enabled=False))."
)


def _second_derivative_message(ctx) -> str:
    return _SECOND_DERIVATIVE.format(cell=ctx.spec.cell, backend=ctx.backend.name)


class _NoSecondDerivative(torch.autograd.Function):
    """Passes gradients through (as views) with a backward that raises: what makes a
    second derivative through the recurrence an error instead of a silent drop."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message, anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(ctx.message)  # a RuntimeError, as torch's for cuDNN's RNNs


def _refuse_second_derivative(ctx, grads):
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    message = _second_derivative_message(ctx)
    # a leaf that requires grad: the outputs are in the graph even where nothing else
    # the gradients depend on requires grad (a penalty on the input's gradient with the
    # weights frozen)
    anchor = torch.zeros((), device=present[0].device, requires_grad=True)
    refused = iter(_NoSecondDerivative.apply(message, anchor, *present))
    return [None if g is None else next(refused) for g in grads]


def _requires_grad_outside(t) -> bool:
    """Whether ``t`` requires grad at a level below the current torch.func transform."""
    if t is None:
        return False
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, jvp...) or a forward-mode AD
    level is active: tensors' requires_grad does not show what they will need there (a
    BatchedTensor's is False, a dual tensor needs no backward but its tangent). Outside
    torch.compile's tracing only (it cannot trace the query)."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None


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
    tensors = (gx, h0, c0, w_hh, w_hr, b_hn)
    grad_enabled = torch.is_grad_enabled()
    transformed = grad_enabled and transforms_active()
    need_saved = grad_enabled and (
        any(t is not None and t.requires_grad for t in tensors) or transformed)
    # Inside a torch.func transform with a tensor that requires grad outside it too (MAML:
    # autograd over torch.func.grad), the gradients this level computes could be
    # differentiated outside, which our backward cannot support: its backward refuses.
    outer = transformed and any(_requires_grad_outside(t) for t in tensors)
    y, h_t, c_t, *_ = _Recurrence.apply(
        backend, spec, batch_sizes, need_saved, outer, *tensors)
    return y, h_t, c_t
