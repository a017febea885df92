"""The recurrence op: one layer, one direction, any cell, any backend.

An autograd.Function that calls a backend's forward and its explicit backward (the
contract in ``cnnlstm_fast/backends/base.py``). Gradients come back in the dtype of
the tensor they belong to.

Second derivatives. The backend's backward computes the gradients once, from the
saved activations, without a graph. Where a graph is asked for (``create_graph=True``,
torch.func's grad/vjp), those same gradients leave through :class:`_GradientOfRecurrence`,
a node that costs nothing until it is differentiated: only then (a gradient penalty, a
Hessian-vector product, MAML's outer step) does its backward recompute the layer from its
inputs with the reference recurrence in autograd-recorded ops and differentiate that
recomputation's gradients, to any order. A first-order backward, ``create_graph`` or not,
runs the backend's backward alone, as fast as before.

The recomputation needs the layer's inputs. G_x is not kept for it (it is as large as
the saved activations): the module hands over what G_x was computed from (the layer's
input, W_ih, the folded bias and, for packed input, the index that pads it), which the
input projection's own backward keeps alive anyway, and G_x is recomputed from them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
import torch.nn.functional as F

from ..backends.base import Backend, RecurrenceSpec
from ..backends.reference import differentiable_forward


@dataclasses.dataclass(frozen=True)
class ProjectionSource:
    """What G_x was computed from: ``G_x = pad(linear(x, w_ih, bias))`` reshaped to
    (T, B, gates*H), where pad scatters packed rows to their flat positions ``index`` of
    the padded (T*B) rows (None: no padding)."""

    x: torch.Tensor
    w_ih: torch.Tensor
    bias: torch.Tensor | None = None
    index: torch.Tensor | None = None


class _Recurrence(torch.autograd.Function):
    """forward / setup_context / backward in the form torch.func's transforms (grad,
    vmap through its generated rule, jacrev) take, as torch.nn's own layers do: what
    backward needs is returned by forward as extra outputs marked non-differentiable
    (setup_context may save only inputs and outputs)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backend, spec, batch_sizes, need_saved, gx, h0, c0, w_hh, w_hr, b_hn,
                x, w_ih, bias, index):
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
        backend, spec, batch_sizes, need_saved, *tensors = inputs
        gx, h0, c0, w_hh, w_hr, b_hn, x, w_ih, bias, index = tensors
        y, h_t, c_t, *saved = output
        ctx.backend, ctx.spec, ctx.batch_sizes = backend, spec, batch_sizes
        ctx.input_dtypes = [None if v is None else v.dtype for v in (gx, h0, c0, w_hh, w_hr, b_hn)]
        ctx.outputs_like = [None if v is None else (v.shape, v.dtype, v.device) for v in (y, h_t, c_t)]
        ctx.gx_shape = gx.shape
        ctx.n_saved = len(saved)
        # the layer's inputs, for a second derivative: G_x itself only where nothing to
        # recompute it from was given (it would keep a buffer as large as the activations)
        inputs_kept = (None if x is not None else gx, h0, c0, w_hh, w_hr, b_hn, x, w_ih, bias, index)
        ctx.save_for_backward(*saved, *(inputs_kept if need_saved else ()))
        ctx.mark_non_differentiable(*(t for t in saved if isinstance(t, torch.Tensor)))
        # the saved outputs get no gradient: no zeros the size of the activations for them
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_y, d_hT, d_cT, *_):
        tensors = ctx.saved_tensors
        saved, kept = tensors[: ctx.n_saved], tensors[ctx.n_saved :]
        # zeros for an output whose gradient autograd left out (materialize_grads is off)
        d_y, d_hT, d_cT = (
            g if g is not None or like is None
            else torch.zeros(like[0], dtype=like[1], device=like[2])
            for g, like in zip((d_y, d_hT, d_cT), ctx.outputs_like)
        )
        needs = ctx.needs_input_grad[4:10]
        with torch.no_grad():
            grads = ctx.backend.backward(ctx.spec, saved, ctx.batch_sizes, d_y, d_hT, d_cT)
            grads = [
                None if (g is None or dt is None or not need) else g.to(dt)
                for g, dt, need in zip(grads, ctx.input_dtypes, needs)
            ]
        if torch.is_grad_enabled() and any(g is not None for g in grads):
            # a graph is being built around this backward: the gradients leave through a
            # node that can be differentiated (by recomputation, only if it is)
            present = [i for i, g in enumerate(grads) if g is not None]
            fn = functools.partial(_recurrence_gradients, ctx.spec, ctx.batch_sizes,
                                   ctx.gx_shape, tuple(present))
            values = _Recomputed.apply(fn, len(present), *(grads[i] for i in present),
                                       *kept, d_y, d_hT, d_cT)
            for i, v in zip(present, values):
                grads[i] = v
        return (None, None, None, None, *grads, None, None, None, None)


class _RecurrenceForwardAD(_Recurrence):
    """The recurrence op with a jvp rule, used where a torch.func transform or a
    forward-mode AD level is active (Dynamo refuses a Function with a custom jvp, so
    torch.compile traces the plain one)."""

    @staticmethod
    def jvp(ctx, *tangents):
        # forward-mode AD (torch.func.jvp, jacfwd, hessian): the reference recurrence's
        # tangents, recomputed in recorded ops; the saved outputs have none
        tangent_y, tangent_h, tangent_c = _tangents(
            functools.partial(_outputs, ctx.spec, ctx.batch_sizes), ctx.primals, tangents[4:10])
        return (tangent_y, tangent_h, tangent_c, *([None] * ctx.n_saved))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _Recurrence.setup_context(ctx, inputs, output)
        ctx.primals = inputs[4:10]


def recompute_gx(gx_shape, x, w_ih, bias, index):
    """G_x from what it was computed from (see :class:`ProjectionSource`), recorded."""
    gx = F.linear(x, w_ih, bias)
    if index is not None:
        gx = gx.new_zeros(gx_shape[0] * gx_shape[1], gx.shape[-1]).index_copy(0, index, gx)
    return gx.reshape(gx_shape)


def _recurrence_gradients(spec, batch_sizes, gx_shape, present,
                          gx, h0, c0, w_hh, w_hr, b_hn, x, w_ih, bias, index, d_y, d_hT, d_cT):
    """The recurrence's first-order gradients (those at positions ``present`` of
    (dG_x, dh0, dc0, dW_hh, dW_hr, db_hn)) in recorded ops: the reference recurrence
    recomputed from the layer's inputs (G_x from its source) and differentiated."""
    if gx is None:
        gx = recompute_gx(gx_shape, x, w_ih, bias, index)
    state = [gx, h0, c0, w_hh, w_hr, b_hn]

    def outputs(*wrt):
        args = list(state)
        for i, v in zip(present, wrt):
            args[i] = v
        return tuple(o for o in differentiable_forward(spec, *args, batch_sizes) if o is not None)

    # torch.func's vjp: a level of its own, so each input is differentiated apart (h0 and
    # c0 may be one tensor) and nothing of the graph around the inputs is walked
    _, vjp = torch.func.vjp(outputs, *(state[i] for i in present))
    return vjp(tuple(d for d in (d_y, d_hT, d_cT) if d is not None))


def _outputs(spec, batch_sizes, *state):
    return differentiable_forward(spec, *state, batch_sizes)


def _tangents(fn, primals, tangents):
    """The output tangents of ``fn(*primals)`` (None for an output that is None) through
    torch.func.jvp; a None primal stays None, a missing tangent is zero."""
    at = [i for i, p in enumerate(primals) if p is not None]
    missing = []

    def values(*args):
        full = list(primals)
        for i, v in zip(at, args):
            full[i] = v
        outs = fn(*full)
        missing[:] = [o is None for o in outs]
        return tuple(o for o in outs if o is not None)

    at_primals = tuple(primals[i] for i in at)
    at_tangents = tuple(torch.zeros_like(primals[i]) if tangents[i] is None else tangents[i]
                        for i in at)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        _, out_tangents = torch.func.jvp(values, at_primals, at_tangents)
    else:
        # plain forward-mode AD (torch.autograd.forward_ad), which does not nest: J v as
        # the derivative of the vjp u -> J^T u along v, in reverse mode
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in at_primals]
            outs = values(*leaves)
            us = [torch.zeros_like(o, requires_grad=True) for o in outs]
            vjps = torch.autograd.grad(outs, leaves, us, create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, t in zip(vjps, at_tangents) if g is not None]
            out_tangents = torch.autograd.grad([g for g, _ in pairs], us, [t for _, t in pairs],
                                               allow_unused=True)
        out_tangents = [torch.zeros_like(o) if t is None else t for o, t in zip(outs, out_tangents)]
    out_tangents = iter(out_tangents)
    return tuple(None if m else next(out_tangents) for m in missing)


class _Recomputed(torch.autograd.Function):
    """Values computed without a graph, passed through as views, standing for
    ``fn(*inputs)``: differentiating them differentiates ``fn`` recomputed in recorded
    ops (torch.func.vjp), which autograd records in turn where that derivative is itself
    differentiated, so every order works. Nothing is recomputed unless a derivative of
    the values is taken."""

    generate_vmap_rule = True

    @staticmethod
    def forward(fn, n_values, *args):
        return tuple(v.view_as(v) for v in args[:n_values])

    @staticmethod
    def setup_context(ctx, inputs, output):
        fn, n_values, *args = inputs
        ctx.fn, ctx.n_values = fn, n_values
        ctx.save_for_backward(*args[n_values:])
        ctx.save_for_forward(*args[n_values:])

    @staticmethod
    def jvp(ctx, *tangents):
        return _tangents(ctx.fn, ctx.saved_tensors, tangents[2 + ctx.n_values :])

    @staticmethod
    def backward(ctx, *cotangents):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2 + ctx.n_values :]
        wrt = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
        grads = [None] * len(inputs)
        if not wrt:
            return (None, None, *([None] * ctx.n_values), *grads)

        def values(*args):
            full = list(inputs)
            for i, v in zip(wrt, args):
                full[i] = v
            return ctx.fn(*full)

        with torch.autocast(_device_type(inputs), enabled=False):
            outs, vjp = torch.func.vjp(values, *(inputs[i] for i in wrt))
            got = vjp(tuple(torch.zeros_like(o) if c is None else c
                            for o, c in zip(outs, cotangents)))
        for i, g in zip(wrt, got):
            grads[i] = g
        return (None, None, *([None] * ctx.n_values), *grads)


def _device_type(tensors) -> str:
    return next(t.device.type for t in tensors if isinstance(t, torch.Tensor))


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
    source: ProjectionSource | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Runs one layer and direction: returns ``(Y, h_T, c_T or None)``. ``source``
    says what ``gx`` was computed from, so that a second derivative can recompute it
    instead of keeping it (without it, ``gx`` is kept while the backward may run)."""
    # what backward needs is kept only where autograd will run it: grad mode on (forward
    # itself runs without it) and a tensor requiring grad
    tensors = (gx, h0, c0, w_hh, w_hr, b_hn)
    transformed = transforms_active()
    need_saved = torch.is_grad_enabled() and (
        transformed or any(t is not None and t.requires_grad for t in tensors))
    src = (None,) * 4 if source is None else (source.x, source.w_ih, source.bias, source.index)
    op = _RecurrenceForwardAD if transformed else _Recurrence
    y, h_t, c_t, *_ = op.apply(backend, spec, batch_sizes, need_saved, *tensors, *src)
    return y, h_t, c_t


# torch's Function.apply binds its arguments to forward's signature on every call (for
# setup_context-style Functions); inspect.signature reads a function's __signature__
# first, so the signature is built once instead of per call
for _function in (_Recurrence, _Recomputed):
    _function.forward.__signature__ = inspect.signature(_function.forward)
