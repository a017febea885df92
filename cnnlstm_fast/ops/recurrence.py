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


def _saved_as_views(saved, keep):
    """A saved tensor that is an input or one of the outputs, as a view of it: autograd
    refuses to save an input returned as an output, and marking an output
    non-differentiable would mark the same tensor among y, h_T, c_T too."""
    return tuple(
        t.view_as(t) if isinstance(t, torch.Tensor) and any(t is k for k in keep) else t
        for t in saved
    )


@dataclasses.dataclass
class _DirectionContext:
    """What one direction's backward needs besides its saved tensors."""

    spec: RecurrenceSpec
    input_dtypes: list
    outputs_like: list
    gx_shape: torch.Size
    n_saved: int
    n_kept: int


def _direction_context(spec, tensors, outputs, saved, need_saved):
    """Records one direction's context; returns it and the inputs kept for a second
    derivative (G_x itself only where nothing to recompute it from was given: it would
    keep a buffer as large as the activations)."""
    gx, h0, c0, w_hh, w_hr, b_hn, x, w_ih, bias, index = tensors
    kept = (None if x is not None else gx, h0, c0, w_hh, w_hr, b_hn, x, w_ih, bias, index)
    kept = kept if need_saved else ()
    ctx = _DirectionContext(
        spec,
        [None if v is None else v.dtype for v in (gx, h0, c0, w_hh, w_hr, b_hn)],
        [None if v is None else (v.shape, v.dtype, v.device) for v in outputs],
        gx.shape, len(saved), len(kept))
    return ctx, kept


def _materialized(grads, outputs_like):
    """Zeros for an output whose gradient autograd left out (materialize_grads is off)."""
    return tuple(
        g if g is not None or like is None
        else torch.zeros(like[0], dtype=like[1], device=like[2])
        for g, like in zip(grads, outputs_like)
    )


def _input_gradients(direction, batch_sizes, grads, needs, kept, d_y, d_hT, d_cT):
    """The backend's gradients of one direction (dG_x, dh0, dc0, dW_hh, dW_hr, db_hn) in
    their inputs' dtypes, None where not needed; where a graph is being built around the
    backward, they leave through a node that can be differentiated (by recomputation, only
    if it is)."""
    grads = [
        None if (g is None or dt is None or not need) else g.to(dt)
        for g, dt, need in zip(grads, direction.input_dtypes, needs)
    ]
    if torch.is_grad_enabled() and any(g is not None for g in grads):
        present = [i for i, g in enumerate(grads) if g is not None]
        fn = functools.partial(_recurrence_gradients, direction.spec, batch_sizes,
                               direction.gx_shape, tuple(present))
        values = _Recomputed.apply(fn, len(present), *(grads[i] for i in present),
                                   *kept, d_y, d_hT, d_cT)
        for i, v in zip(present, values):
            grads[i] = v
    return grads


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
        saved = _saved_as_views(saved, (gx, h0, c0, w_hh, w_hr, b_hn, y, h_t, c_t))
        return (y, h_t, c_t, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, spec, batch_sizes, need_saved, *tensors = inputs
        y, h_t, c_t, *saved = output
        ctx.backend, ctx.batch_sizes = backend, batch_sizes
        ctx.direction, kept = _direction_context(spec, tensors, (y, h_t, c_t), saved, need_saved)
        ctx.save_for_backward(*saved, *kept)
        ctx.mark_non_differentiable(*(t for t in saved if isinstance(t, torch.Tensor)))
        # the saved outputs get no gradient: no zeros the size of the activations for them
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_y, d_hT, d_cT, *_):
        direction = ctx.direction
        tensors = ctx.saved_tensors
        saved, kept = tensors[: direction.n_saved], tensors[direction.n_saved :]
        d_y, d_hT, d_cT = _materialized((d_y, d_hT, d_cT), direction.outputs_like)
        with torch.no_grad():
            grads = ctx.backend.backward(direction.spec, saved, ctx.batch_sizes, d_y, d_hT, d_cT)
        grads = _input_gradients(direction, ctx.batch_sizes, grads, ctx.needs_input_grad[4:10],
                                 kept, d_y, d_hT, d_cT)
        return (None, None, None, None, *grads, None, None, None, None)


class _Recurrences(torch.autograd.Function):
    """The recurrence of D directions of one layer in one node, for a backend whose
    ``forward_directions``/``backward_directions`` run them side by side (the ``cpu``
    backend: ``csrc/cpu/directions.cpp``); per direction exactly :class:`_Recurrence`.
    The inputs are the layer input ``x`` and packed ``index`` the directions share (each
    passed once: Dynamo refuses a tensor passed twice), then 8 tensors per direction
    (:class:`_Recurrence`'s without x and index); the outputs ``(y, h_T, c_T)`` of each
    direction, then each direction's saved tensors."""

    @staticmethod
    def forward(backend, specs, batch_sizes, need_saved, x, index, *tensors):
        per = _per_direction(len(specs), x, index, tensors)
        results = backend.forward_directions(
            specs, *([p[i] for p in per] for i in range(6)), batch_sizes, need_saved)
        outputs, saved = [], []
        for p, (y, h_t, c_t, s) in zip(per, results):
            outputs += [y, h_t, c_t]
            saved += _saved_as_views(s, (*p[:6], y, h_t, c_t))
        return (*outputs, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, specs, batch_sizes, need_saved, x, index, *tensors = inputs
        D = len(specs)
        per = _per_direction(D, x, index, tensors)
        n_saved = (len(output) - 3 * D) // D
        ctx.backend, ctx.batch_sizes = backend, batch_sizes
        ctx.directions, all_saved, all_kept = [], [], []
        for d, spec in enumerate(specs):
            saved = output[3 * D + d * n_saved : 3 * D + (d + 1) * n_saved]
            direction, kept = _direction_context(
                spec, per[d], output[3 * d : 3 * d + 3], saved, need_saved)
            ctx.directions.append(direction)
            all_saved += saved
            all_kept += kept
        ctx.save_for_backward(*all_saved, *all_kept)
        ctx.mark_non_differentiable(*(t for t in all_saved if isinstance(t, torch.Tensor)))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *output_grads):
        directions = ctx.directions
        D = len(directions)
        tensors = ctx.saved_tensors
        n_saved = directions[0].n_saved
        saved = [tensors[d * n_saved : (d + 1) * n_saved] for d in range(D)]
        kept_at = D * n_saved
        d_outputs = [_materialized(output_grads[3 * d : 3 * d + 3], directions[d].outputs_like)
                     for d in range(D)]
        with torch.no_grad():
            all_grads = ctx.backend.backward_directions(
                [d.spec for d in directions], saved, ctx.batch_sizes,
                *([g[i] for g in d_outputs] for i in range(3)))
        result = []
        needs = ctx.needs_input_grad[6:]
        for d, (direction, grads) in enumerate(zip(directions, all_grads)):
            kept = tensors[kept_at : kept_at + direction.n_kept]
            kept_at += direction.n_kept
            grads = _input_gradients(direction, ctx.batch_sizes, grads,
                                     needs[8 * d : 8 * d + 6], kept, *d_outputs[d])
            result += [*grads, None, None]
        return (None, None, None, None, None, None, *result)


def _per_direction(D, x, index, tensors):
    """Each direction's 10 tensors in :class:`_Recurrence`'s order, from the shared x and
    index and the 8 tensors per direction."""
    return [(*tensors[8 * d : 8 * d + 6], x, *tensors[8 * d + 6 : 8 * d + 8], index)
            for d in range(D)]


class _RecurrenceForwardAD(_Recurrence):
    """The recurrence op with a jvp rule, used where a torch.func transform or a
    forward-mode AD level is active (Dynamo refuses a Function with a custom jvp, so
    torch.compile traces the plain one)."""

    @staticmethod
    def jvp(ctx, *tangents):
        # forward-mode AD (torch.func.jvp, jacfwd, hessian): the reference recurrence's
        # tangents, recomputed in recorded ops; the saved outputs have none
        tangent_y, tangent_h, tangent_c = _tangents(
            functools.partial(_outputs, ctx.direction.spec, ctx.batch_sizes), ctx.primals,
            tangents[4:10])
        return (tangent_y, tangent_h, tangent_c, *([None] * ctx.direction.n_saved))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _Recurrence.setup_context(ctx, inputs, output)
        ctx.primals = inputs[4:10]


def recompute_gx(gx_shape, x, w_ih, bias, index):
    """G_x from what it was computed from (see :class:`ProjectionSource`), recorded:
    (T, B, G), or for a backend with ``packed_rows`` on packed input (N, G)."""
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
        return tuple(o for o in _outputs(spec, batch_sizes, *args) if o is not None)

    # torch.func's vjp: a level of its own, so each input is differentiated apart (h0 and
    # c0 may be one tensor) and nothing of the graph around the inputs is walked
    _, vjp = torch.func.vjp(outputs, *(state[i] for i in present))
    return vjp(tuple(d for d in (d_y, d_hT, d_cT) if d is not None))


def packed_index(batch_sizes: torch.Tensor, device: torch.device, on_device: bool):
    """Flat positions t * B + b of the valid (t, b) of a packed batch, in packed order.

    Built on the CPU and copied from pinned memory without blocking the host, or with
    ``on_device`` from aranges on ``device``, one per run of equal batch sizes: no copy
    from host memory, which a CUDA graph capture cannot take (a blocking copy
    synchronises the stream; an asynchronous one would re-read a freed buffer at every
    replay)."""
    steps, batch = len(batch_sizes), int(batch_sizes[0])
    if on_device:
        sizes, parts, start = batch_sizes.tolist(), [], 0
        for t in range(1, steps + 1):
            if t == steps or sizes[t] != sizes[start]:
                rows = torch.arange(start, t, device=device) * batch
                parts.append((rows[:, None] + torch.arange(sizes[start], device=device)).reshape(-1))
                start = t
        return torch.cat(parts)
    cols = torch.arange(batch)
    index = (torch.arange(steps)[:, None] * batch + cols)[cols[None, :] < batch_sizes[:, None]]
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def _outputs(spec, batch_sizes, gx, *state):
    """The reference recurrence's (Y, h_T, c_T) in recorded ops. G_x of 2 dims is a
    PackedSequence's rows (a backend with ``packed_rows``): padded for the reference,
    its Y packed back."""
    if gx.dim() == 3:
        return differentiable_forward(spec, gx, *state, batch_sizes)
    steps, batch = len(batch_sizes), int(batch_sizes[0])
    index = packed_index(batch_sizes, gx.device, on_device=False)
    padded = gx.new_zeros(steps * batch, gx.shape[-1]).index_copy(0, index, gx)
    y, h_t, c_t = differentiable_forward(spec, padded.view(steps, batch, -1), *state, batch_sizes)
    return y.reshape(steps * batch, -1).index_select(0, index), h_t, c_t


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


def recurrence_directions(
    backend: Backend,
    specs: list[RecurrenceSpec],
    gx: list[torch.Tensor],
    h0: list[torch.Tensor],
    c0: list[torch.Tensor | None],
    w_hh: list[torch.Tensor],
    w_hr: list[torch.Tensor | None],
    b_hn: list[torch.Tensor | None],
    batch_sizes: torch.Tensor | None,
    sources: list[ProjectionSource | None],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """:func:`recurrence` for the directions of one layer at once (each list holds one
    entry per direction, ``specs[d].reverse`` says which way direction d runs), on a
    backend with ``forward_directions``: one autograd node, the directions side by side
    in forward and backward. Not for torch.func transforms or forward-mode AD (use
    :func:`recurrence` per direction there)."""
    given = [s for s in sources if s is not None]
    if given and (len(given) < len(sources) or any(
            s.x is not given[0].x or s.index is not given[0].index for s in given)):
        raise ValueError("recurrence_directions: the directions' sources must all be given "
                         "and share x and index, or all be None")
    x, index = (given[0].x, given[0].index) if given else (None, None)
    per_direction = []
    for d in range(len(specs)):
        per_direction += [gx[d], h0[d], c0[d], w_hh[d], w_hr[d], b_hn[d],
                          *((None, None) if not given else (sources[d].w_ih, sources[d].bias))]
    need_saved = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for d in range(len(specs)) for t in per_direction[8 * d : 8 * d + 6])
    outputs = _Recurrences.apply(backend, list(specs), batch_sizes, need_saved, x, index,
                                 *per_direction)
    return [tuple(outputs[3 * d : 3 * d + 3]) for d in range(len(specs))]


# torch's Function.apply binds its arguments to forward's signature on every call (for
# setup_context-style Functions); inspect.signature reads a function's __signature__
# first, so the signature is built once instead of per call
for _function in (_Recurrence, _Recurrences, _Recomputed):
    _function.forward.__signature__ = inspect.signature(_function.forward)
