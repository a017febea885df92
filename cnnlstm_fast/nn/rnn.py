"""Drop-in LSTM, GRU and RNN modules and their cells.

Each class subclasses the torch.nn class of the same name: constructor (plus the
keyword-only ``backend``), parameters, initialisation, state_dict, forward signature,
return values and error messages are torch's. Only the computation is ours: the
module handles arguments, PackedSequence/unbatched input, the layers x directions
loop and inter-layer dropout; each layer and direction is one input-projection GEMM
(``G_x = x W_ih^T + b``) followed by the recurrence op of the resolved backend, or, in
inference on a backend that has it, one op from the layer's input (``forward_from_input``:
packed rows kept packed, a bidirectional layer's output written in place).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from ..backends import tuned
from ..backends.base import RecurrenceSpec
from ..ops.recurrence import ProjectionSource
from ..ops.recurrence import packed_index as _packed_index
from ..ops.recurrence import recurrence, recurrence_directions, transforms_active

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell"]


_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def _cell_of(module: nn.Module) -> str:
    mode = getattr(module, "mode", None)
    if mode is not None:  # RNNBase
        return _MODES[mode]
    if isinstance(module, nn.LSTMCell):
        return "lstm"
    if isinstance(module, nn.GRUCell):
        return "gru"
    if module.nonlinearity in ("tanh", "relu"):
        return f"rnn_{module.nonlinearity}"
    # torch's RNNCell takes any nonlinearity at construction and raises this in forward
    raise RuntimeError(f"Unknown nonlinearity: {module.nonlinearity}")


def _split_bias(cell: str, b_ih, b_hh, hidden: int):
    """(bias folded into G_x, b_hn kept inside the recurrence or None)."""
    if b_ih is None:
        return None, None
    if cell != "gru":
        return b_ih + b_hh, None
    two_h = 2 * hidden
    return torch.cat((b_ih[:two_h] + b_hh[:two_h], b_ih[two_h:])), b_hh[two_h:]


# Under torch.autocast, torch.nn's recurrent layers run wholly in the autocast dtype where
# their op is on autocast's lower-precision list: on CPU (measured with torch 2.13, see
# tests/test_autocast.py) the LSTM oneDNN runs (unpacked, no proj_size), RNN and RNNCell;
# on CUDA every layer and cell (cuDNN RNN and the *_cell ops). Elsewhere torch's own loop
# runs, whose matmuls are lowered but whose state update follows type promotion.
def _lowered(kind: str, cell: str, device: str, ragged: bool, proj: int, empty: bool) -> bool:
    """``ragged``: packed with unequal lengths (torch's packed LSTM takes oneDNN where
    all lengths are equal); ``empty``: no element (oneDNN is not used then)."""
    if device == "cuda":
        return True
    if device != "cpu":
        return False
    if cell == "lstm":
        return (kind == "seq" and not ragged and proj == 0 and not empty
                and torch._C._get_mkldnn_enabled())
    return cell in ("rnn_tanh", "rnn_relu")


@dataclasses.dataclass(frozen=True)
class _Dtypes:
    """The dtypes of one call, as torch.nn's would have them: ``compute`` is what our
    recurrence runs in (inputs, states and weights cast to it), ``h``/``c`` those of the
    returned output and hidden state, and of the cell state; ``error`` the error
    torch.nn raises for these dtypes (None: none)."""

    compute: torch.dtype
    h: torch.dtype
    c: torch.dtype | None
    error: str | None = None


def _mixed_matmul(a: torch.dtype, b: torch.dtype) -> str:
    return (f"mat1 and mat2 must have the same dtype, but got {_scalar_type(a)} and "
            f"{_scalar_type(b)}")


def _plan_dtypes(kind, cell, data, h_dtype, c_dtype, ragged, proj, steps) -> _Dtypes:
    """torch.nn's dtype rules for a call (``h_dtype``/``c_dtype`` those of the given
    states, or the input's where none is given).

    Lowered (see ``_lowered``) under autocast: everything in the autocast dtype A.
    Otherwise the matmuls run in M (A under autocast, else the input's dtype, which the
    states entering a matmul must then have) and the state update promotes: a GRU's h
    becomes promote(M, h0), an LSTM's c promote(M, c0) and its h the same, or M behind a
    projection. We compute in the widest of the returned dtypes (float32 for 16-bit
    ones under CPU autocast: at least torch's precision) and return torch's dtypes."""
    device = data.device.type
    autocast = data.dtype.is_floating_point and torch.is_autocast_enabled(device)
    if not autocast and h_dtype == c_dtype == data.dtype:  # the common call, kept cheap
        return _Dtypes(data.dtype, data.dtype, data.dtype if cell == "lstm" else None)
    if autocast:
        plan = _plan_dtypes_autocast(kind, cell, data, h_dtype, c_dtype, ragged, proj)
        if device == "cpu" and plan.compute in (torch.float16, torch.bfloat16):
            # computed in float32, the CPU kernels' dtype, and returned in torch's dtypes:
            # torch's own 16-bit results round more (its f32 weights' gradients are
            # never rounded to 16 bits, which a 16-bit projection's GEMM would do)
            plan = dataclasses.replace(plan, compute=torch.float32)
        return plan
    return _plan_dtypes_plain(kind, cell, data, h_dtype, c_dtype, ragged, proj, steps)


def _plan_dtypes_autocast(kind, cell, data, h_dtype, c_dtype, ragged, proj) -> _Dtypes:
    low = torch.get_autocast_dtype(data.device.type)
    if _lowered(kind, cell, data.device.type, ragged, proj, data.numel() == 0):
        return _Dtypes(low, low, low if cell == "lstm" else None)
    return _promoted(cell, low, h_dtype, c_dtype, proj)


def _promoted(cell, matmul, h_dtype, c_dtype, proj, error=None) -> _Dtypes:
    """torch's own loop: matmuls in ``matmul``, the state update promoted."""
    if cell == "lstm":
        c = torch.promote_types(matmul, c_dtype)
        return _Dtypes(c, matmul if proj else c, c, error)
    if cell == "gru":
        h = torch.promote_types(matmul, h_dtype)
        return _Dtypes(h, h, None, error)
    return _Dtypes(matmul, matmul, None, error)


def _plan_dtypes_plain(kind, cell, data, h_dtype, c_dtype, ragged, proj, steps) -> _Dtypes:
    """Without autocast: the states meet W_hh (the input's dtype) as they are."""
    matmul = data.dtype
    error = None
    if h_dtype != matmul:  # h0 enters the recurrent matmul as it is
        error = _mixed_matmul(h_dtype, matmul)
    elif cell == "lstm" and c_dtype != matmul:
        c = torch.promote_types(matmul, c_dtype)
        if _lowered(kind, cell, data.device.type, ragged, proj, data.numel() == 0):
            error = _mixed_matmul(c_dtype, matmul)  # one op for all states (oneDNN, cuDNN)
        elif c != matmul and (proj or steps > 1):
            error = _mixed_matmul(c, matmul)  # a promoted h meets W_hr, or W_hh next step
    return _promoted(cell, matmul, h_dtype, c_dtype, proj, error)


def _state_dtypes(hx, default: torch.dtype):
    """dtypes of (h0, c0) in a raw ``hx`` argument: a state's tensor or ``default``."""
    if hx is None:
        return default, default
    if isinstance(hx, torch.Tensor):
        return hx.dtype, default
    found = [s.dtype if isinstance(s, torch.Tensor) else default for s in hx[:2]]
    return (*found, default, default)[:2]


def _call_key(module, data: torch.Tensor, batch: int, steps: int, hx):
    """What a call's resolution depends on, as a tuple a module compares with its last
    call's (``_SequenceMixin.forward``), or None where the call is not to be memoised:
    autocast, torch.compile's tracing, a watching ``tune``/``explain``, and a DEBUG log
    of the choices (which logs every call). The rest of what ``backends.resolve`` reads
    is in the tuple: the module's backend, whether the backward is needed, the input's
    dtype, device, rank and sizes, the states' dtypes, and ``backends.generation()``
    (the registry, the process default, the tuning record, the cpu GEMM in use,
    deterministic algorithms). The malloc settings the training rows read from the
    environment are read at a module's first call of a signature, as glibc reads them
    once at start.

    Resolving costs ~10 us in a tight loop, but ~50 us a call after a layer's own work
    has evicted the interpreter's data from the caches (measured on the 2-core EPYC: a
    0.45 ms LSTM call ran 0.90x torch.nn's under ``auto`` where ``auto`` chose torch.nn,
    0.97x with this memo); the key costs a few microseconds."""
    # compiling first: Dynamo traces no logging call
    if (torch.compiler.is_compiling() or tuned.on_call is not None
            or backends.logging_choices()):
        return None
    device = data.device
    if torch.is_autocast_enabled(device.type):
        return None
    if hx is None:
        states = None
    elif isinstance(hx, torch.Tensor):
        states = hx.dtype
    else:
        states = tuple(s.dtype if isinstance(s, torch.Tensor) else type(s) for s in hx)
    return (module.backend, module._needs_grad(data, hx), data.dtype, device, data.dim(),
            batch, steps, states, *backends.generation())


def _as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)``, skipped (a microsecond a call) where nothing changes."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _check_same_device(input: torch.Tensor, states) -> None:
    for state in states:
        if state.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor "
                f"at {input.device} and hidden tensor at {state.device}"
            )


def _scalar_type(dtype: torch.dtype) -> str:
    """The name torch's C++ errors give a dtype (Float, Double, BFloat16, Long...)."""
    return torch.empty((), dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


_TORCH_LAYERS = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def _torch_class_of_type(cls: type) -> type:
    """The torch.nn layer class ``cls`` derives from (its messages name that class).
    Other classes of torch.nn may come first: torch.nn.utils.parametrize puts one on top
    of each parametrized module's class."""
    return next(c for c in cls.__mro__ if c in _TORCH_LAYERS)


def _torch_class(module: nn.Module) -> type:
    return _torch_class_of_type(type(module))


_ROWS_OPS: list = []  # [the op namespace or None] once resolved


def _rows_ops():
    """``torch.ops.cnnlstm_fast`` where the extension has ``pad_rows``/``pack_rows``
    (their fakes and autograd registered), else None. Resolved on the first eager call
    (a global read is all that torch.compile traces; while it traces before any eager
    call, the PyTorch-ops path). Not under torch.func's transforms (the formulas
    registered for C++ ops do not support them)."""
    if not _ROWS_OPS:
        if torch.compiler.is_compiling():
            return None
        from ..backends.compiled import ops

        namespace = ops()
        _ROWS_OPS.append(namespace if hasattr(namespace, "pad_rows") else None)
    return _ROWS_OPS[0]


def _cat_features(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, -1)``, on CPU into a buffer of the cpu backend's cache."""
    ops = _rows_ops() if parts[0].device.type == "cpu" and not transforms_active() else None
    return torch.cat(parts, -1) if ops is None else ops.cat_features(parts)


class _PackedLayout:
    """Moves packed rows (N, F) to the padded time-major layout (T, B, F) and back.

    The packed order is exactly the row-major order of the valid (t, b) positions, so
    one index of flat positions serves both ways."""

    def __init__(self, batch_sizes: torch.Tensor, device: torch.device):
        self.steps = len(batch_sizes)
        self.batch = int(batch_sizes[0])
        self._batch_sizes, self._device = batch_sizes, device
        self._capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    @functools.cached_property
    def index(self) -> torch.Tensor:
        """The flat padded position of each packed row, made on first use (the cpu
        backend's inference reads packed rows in place and never needs it)."""
        return _packed_index(self._batch_sizes, self._device, on_device=self._capturing)

    def to_padded(self, data: torch.Tensor) -> torch.Tensor:
        rows = self.steps * self.batch
        ops = _rows_ops() if data.device.type == "cpu" and not transforms_active() else None
        if ops is not None:
            # one op, its buffer from the cpu backend's cache (csrc/cpu/packing.cpp)
            return ops.pad_rows(data, self.index, rows).view(self.steps, self.batch, -1)
        out = data.new_zeros(rows, data.shape[1])
        # in place into the fresh zeros: index_copy would copy them first
        return out.index_copy_(0, self.index, data).view(self.steps, self.batch, -1)

    def to_packed(self, padded: torch.Tensor) -> torch.Tensor:
        rows = padded.reshape(self.steps * self.batch, -1)
        ops = _rows_ops() if rows.device.type == "cpu" and not transforms_active() else None
        return rows.index_select(0, self.index) if ops is None else ops.pack_rows(rows, self.index)


class _BackendMixin:
    """The ``backend`` attribute shared by the sequence modules and the cells."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backends._check_name(backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def _check_input_dtype(self, data: torch.Tensor) -> None:
        """The error torch.nn's first matmul raises for an input of another dtype than
        the weights, outside autocast."""
        weight = self._flat_weights[0] if isinstance(self, nn.RNNBase) else self.weight_ih
        if data.dtype != weight.dtype and not torch.is_autocast_enabled(data.device.type):
            raise RuntimeError(_mixed_matmul(data.dtype, weight.dtype))

    def _needs_grad(self, data: torch.Tensor, hx) -> bool:
        """Whether autograd will need this call's backward: grad mode on and the input, a
        state of ``hx`` or a weight requires grad. The weights as the forward reads them:
        its Parameters, a parametrized weight (whose Parameter lives in a submodule), or
        a plain tensor set in a weight's place (weight tying, a hypernetwork)."""
        if not torch.is_grad_enabled():
            return False
        if data.requires_grad or transforms_active():
            return True
        states = hx if isinstance(hx, (tuple, list)) else (hx,)
        if any(isinstance(s, torch.Tensor) and s.requires_grad for s in states):
            return True
        own = self._parameters
        # _parameters first: it settles a training call without walking the module tree
        if any(p is not None and p.requires_grad for p in own.values()):
            return True
        if any(p.requires_grad for p in self.parameters()):
            return True
        names = (self._flat_weights_names if isinstance(self, nn.RNNBase)
                 else ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        for name in names:
            if name not in own:  # not a Parameter of this module: read it as forward does
                weight = getattr(self, name, None)
                if isinstance(weight, torch.Tensor) and weight.requires_grad:
                    return True
        return False

    def _resolve(self, data: torch.Tensor, batch: int, steps: int, packed: bool, hx=None,
                 ragged: bool = False, resolve: bool = True, watched: bool = False):
        """(backend, spec, dtypes) for a call that :func:`backends.resolve_early` did not
        settle (the forwards ask it first: the cheap path of short calls); the backend
        None without ``resolve``. ``watched``: the forward showed the call to
        ``tuned.on_call`` already (ConvToSequence's fused path resolves here directly)."""
        if resolve and not watched and tuned.on_call is not None:
            tuned.on_call(self, data, hx)
        device = data.device
        cell = _cell_of(self)
        needs_grad = self._needs_grad(data, hx)
        proj = getattr(self, "proj_size", 0)
        if isinstance(self, nn.RNNBase):
            kind = "seq"
            layer = (kind, self.input_size, self.num_layers, 2 if self.bidirectional else 1)
        else:
            kind = "cell"
            layer = (kind, self.input_size, 1, 1)
        dtypes = _plan_dtypes(kind, cell, data, *_state_dtypes(hx, data.dtype), ragged, proj, steps)
        spec = RecurrenceSpec(
            cell=cell,
            hidden_size=self.hidden_size,
            proj_size=proj,
            reverse=False,
            device=device,
            dtype=dtypes.compute,
            batch=batch,
            steps=steps,
            variable_lengths=packed,
            needs_grad=needs_grad,
            layer=layer,
        )
        return backends.resolve(self.backend, spec) if resolve else None, spec, dtypes

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # inspect.signature(cls) shows torch's constructor plus ``backend``.
        if not issubclass(cls, nn.Module):
            return
        if cls.__module__ != __name__:
            # A subclass of ours (a user's, or torch.nn.utils.parametrize's per-module
            # class) inherits our signature, unless it has a constructor of its own:
            # then inspect reads that one (None makes it skip the inherited attribute).
            own_init = next(c for c in cls.__mro__ if "__init__" in vars(c))
            if own_init.__module__ != __name__:
                cls.__signature__ = None
            return
        init = _torch_class_of_type(cls).__init__
        overloads = typing.get_overloads(init)
        base = inspect.signature(overloads[0] if overloads else init)
        params = [p for p in base.parameters.values() if p.name != "self"]
        backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto")
        if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
            params.insert(len(params) - 1, backend)
        else:
            params.append(backend)
        cls.__signature__ = base.replace(parameters=params)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")

    def __getstate__(self):
        # the last call's resolution (_SequenceMixin.forward) is this process's: a copy,
        # a pickle or torch.save(module) resolves afresh
        state = super().__getstate__()
        if "_last_resolved" in state:
            state = {k: v for k, v in state.items() if k != "_last_resolved"}
        return state


class _SequenceMixin(_BackendMixin):
    """forward() of LSTM/GRU/RNN on the recurrence op of the resolved backend."""

    def forward(self, input, hx=None):
        if tuned.on_call is not None:  # tune, explain or tuning on first use watch the calls
            tuned.on_call(self, input, hx)
        data, packed, batch, steps = self._shape(input)
        if backends.resolve_early(self.backend, data, steps) is not None:
            return super().forward(input, hx)
        key = None if packed else _call_key(self, data, batch, steps, hx)
        memo = self.__dict__.get("_last_resolved") if key is not None else None
        if memo is not None and memo[0] == key:
            backend, spec, dtypes = memo[1]
            if backend.whole_module:
                return super().forward(input, hx)
            return self._forward_recurrence(backend, spec, dtypes, input, hx)
        try:
            ragged = packed and bool(input.batch_sizes[0] != input.batch_sizes[-1])
            backend, spec, dtypes = self._resolve(data, batch, steps, packed, hx, ragged,
                                                  watched=True)
        except backends.BackendUnavailableError:
            # an input torch.nn refuses as well (an integer one, a dtype other than the
            # weights'): torch.nn's error, as its forward raises it, before ours
            # torch's LSTM does not check a packed input's arguments: its matmul raises
            if data.dim() in (2, 3) and not (packed and self.mode == "LSTM"):
                # torch.nn's forward checks the dimensions first
                self.check_input(data if packed or data.dim() == 3 else data.unsqueeze(1),
                                 input.batch_sizes if packed else None)
            self._check_input_dtype(data)
            raise
        if key is not None:
            self.__dict__["_last_resolved"] = (key, (backend, spec, dtypes))
        if backend.whole_module:
            return super().forward(input, hx)
        return self._forward_recurrence(backend, spec, dtypes, input, hx)

    def _shape(self, input):
        """(data, packed, batch, steps) of a call's input."""
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        if packed:
            batch, steps = int(input.batch_sizes[0]), len(input.batch_sizes)
        elif data.dim() == 3:
            batch = data.size(0 if self.batch_first else 1)
            steps = data.size(1 if self.batch_first else 0)
        else:
            batch, steps = 1, data.size(0) if data.dim() else 0
        return data, packed, batch, steps

    def _call_spec(self, input, hx=None) -> RecurrenceSpec:
        """The spec ``auto`` resolves for ``forward(input, hx)`` (what ``tune`` keys)."""
        data, packed, batch, steps = self._shape(input)
        ragged = packed and bool(input.batch_sizes[0] != input.batch_sizes[-1])
        return self._resolve(data, batch, steps, packed, hx, ragged, resolve=False)[1]

    def _zeros_state(self, batch: int, like: torch.Tensor):
        directions = 2 if self.bidirectional else 1
        out = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = like.new_zeros(self.num_layers * directions, batch, out)
        if self.mode != "LSTM":
            return h
        return h, like.new_zeros(self.num_layers * directions, batch, self.hidden_size)

    def _check_hx_dims(self, hx, want: int) -> None:
        kind = "batched 3-D" if want == 3 else "unbatched 2-D"
        if self.mode == "LSTM":
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
        elif hx.dim() != want:
            raise RuntimeError(
                f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor"
            )

    def _forward_recurrence(self, backend, spec, dtypes, input, hx, first_gx=None):
        """The module's forward on ``backend``. ``first_gx`` (D tensors (T, B, G)), when
        given, is the first layer's G_x of each direction, computed by the caller
        (ConvToSequence); ``input`` then only gives the shapes and dtype."""
        is_lstm = self.mode == "LSTM"
        sorted_indices = unsorted_indices = batch_sizes = None
        is_batched = True
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if is_lstm:  # torch's LSTM does not check a packed input's arguments
                self._check_input_dtype(data)
            if hx is None:
                hx = self._zeros_state(int(batch_sizes[0]), data)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(data, hx, batch_sizes)
            x = data
        else:
            if input.dim() not in (2, 3):
                # torch's wording differs by class; the tests hold us to it.
                tail = "instead" if self.mode in ("LSTM", "GRU") else "tensor instead"
                name = "RNN" if self.mode.startswith("RNN") else self.mode
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D {tail}")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    self._check_hx_dims(hx, 2)
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if is_lstm else hx.unsqueeze(1)
            elif hx is not None:
                self._check_hx_dims(hx, 3)
            if hx is None:
                hx = self._zeros_state(input.size(batch_dim), input)
            self.check_forward_args(input, hx, None)
            x = input.transpose(0, 1) if self.batch_first else input
            if x.size(0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if is_lstm and not isinstance(hx, (tuple, list)):  # torch's _VF.lstm refuses it too
            raise TypeError("lstm() received an invalid combination of arguments: hx must be "
                            f"a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        if is_lstm and len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        h0, c0 = hx if is_lstm else (hx, None)
        _check_same_device(x, (h0,) if c0 is None else (h0, c0))
        if dtypes.error is not None:
            raise RuntimeError(dtypes.error)
        x, h0, c0 = (_as_dtype(t, spec.dtype) for t in (x, h0, c0))

        layout = None if batch_sizes is None else _PackedLayout(batch_sizes, x.device)
        with torch.autocast(x.device.type, enabled=False):
            output, h_n, c_n = self._run_layers(backend, spec, x, h0, c0, batch_sizes, layout,
                                                first_gx)
        output, h_n, c_n = _as_dtype(output, dtypes.h), _as_dtype(h_n, dtypes.h), _as_dtype(c_n, dtypes.c)
        hidden = (h_n, c_n) if is_lstm else h_n
        if batch_sizes is not None:
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return output, hidden

    def _run_layers(self, backend, spec, x, h0, c0, batch_sizes, layout, first_gx=None):
        directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            params = [self._layer_params(layer * directions + d, spec)
                      for d in range(directions)]
            specs = [dataclasses.replace(spec, reverse=d == 1) for d in range(directions)]
            given = first_gx is not None and layer == 0
            # the fused inference path has no backward and no forward-mode AD: only
            # where nothing this layer reads requires grad (spec.needs_grad says so for
            # the module; this checks the tensors themselves) and no torch.func
            # transform or dual level is active, so no derivative is ever lost to it
            from_input = not given and not spec.needs_grad and not (
                transforms_active()) and not (torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad
                    for t in (x, h0, c0, *(v for p in params for v in p.values()))))
            k0 = layer * directions
            h0_l = [h0[k0 + d] for d in range(directions)]
            c0_l = [None if c0 is None else c0[k0 + d] for d in range(directions)]
            together = (directions > 1 and hasattr(backend, "concurrent_directions")
                        and backend.concurrent_directions(spec) and not transforms_active())
            results, packed = None, False  # packed: results' Y already in packed rows
            joined = None  # (output, h_Ts, c_Ts): both directions' Y already in place
            if from_input and directions > 1 and hasattr(backend, "forward_from_input_directions"):
                # both directions' Y straight into the layer's output: nothing to concatenate
                joined = backend.forward_from_input_directions(
                    specs, x, *_columns(params, ("w_ih", "gx_bias")), h0_l, c0_l,
                    *_columns(params, ("w_hh", "w_hr", "b_hn")), batch_sizes=batch_sizes,
                    side_by_side=together)
                if joined is not None:
                    results = ()
            elif from_input:
                # packed input stays packed: its steps' rows are read and written in place
                results = [backend.forward_from_input(specs[d], x, p["w_ih"], p["gx_bias"],
                                                      h0_l[d], c0_l[d], p["w_hh"], p["w_hr"],
                                                      p["b_hn"], batch_sizes=batch_sizes)
                           for d, p in enumerate(params)]
                results = None if any(r is None for r in results) else results
                packed = results is not None
            if results is None:
                # packed input on a backend that walks packed rows: G_x, Y and the saved
                # activations stay in the packed rows, never padded (not under torch.func's
                # transforms, whose formulas pad; not for a G_x handed over padded)
                rows_in_place = layout is not None and not given and backend.packed_rows and not (
                    transforms_active())

                def projected(d):
                    """Direction d's G_x (padded, or packed rows) and what it was computed
                    from."""
                    if given:
                        return first_gx[d], None
                    p = params[d]
                    gx = backend.input_projection(x, p["w_ih"], p["gx_bias"])
                    if layout is None or rows_in_place:
                        return gx, ProjectionSource(x, p["w_ih"], p["gx_bias"])
                    return layout.to_padded(gx), ProjectionSource(x, p["w_ih"], p["gx_bias"],
                                                                  layout.index)

                if together:  # both G_x at once: the directions run at the same time
                    gxs, sources = zip(*(projected(d) for d in range(directions)))
                    results = recurrence_directions(
                        backend, specs, list(gxs), h0_l, c0_l,
                        *_columns(params, ("w_hh", "w_hr", "b_hn")), batch_sizes, list(sources))
                    packed = rows_in_place
                    del gxs
                else:  # one direction at a time: its padded G_x and Y are freed (where
                    # nothing keeps them) before the next direction's are made
                    results = []
                    for d, p in enumerate(params):
                        gx, source = projected(d)
                        y, h_t, c_t = recurrence(backend, specs[d], gx, h0_l[d], c0_l[d],
                                                 p["w_hh"], p["w_hr"], p["b_hn"], batch_sizes,
                                                 source)
                        del gx
                        results.append((y if layout is None or rows_in_place
                                        else layout.to_packed(y), h_t, c_t))
                        del y
                    packed = True
            if joined is not None:
                x = joined[0]
                h_n += joined[1]
                c_n += joined[2]
            else:
                outputs = []
                for y, h_t, c_t in results:
                    outputs.append(y if layout is None or packed else layout.to_packed(y))
                    h_n.append(h_t)
                    c_n.append(c_t)
                x = outputs[0] if directions == 1 else _cat_features(outputs)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        return x, torch.stack(h_n), None if c0 is None else torch.stack(c_n)

    def _layer_params(self, k: int, spec) -> dict:
        """Layer-direction k's weights in the compute dtype, the bias split as the
        recurrence takes it: w_ih, w_hh, w_hr (or None), gx_bias, b_hn (or None)."""
        weights = [_as_dtype(getattr(self, name), spec.dtype) for name in self._all_weights[k]]
        b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
        gx_bias, b_hn = _split_bias(spec.cell, b_ih, b_hh, self.hidden_size)
        return {"w_ih": weights[0], "w_hh": weights[1],
                "w_hr": weights[-1] if self.proj_size > 0 else None,
                "gx_bias": gx_bias, "b_hn": b_hn}


def _columns(params: list[dict], names: tuple[str, ...]) -> list[list]:
    """Per name, the list of that parameter over the directions."""
    return [[p[name] for p in params] for name in names]


class _CellMixin(_BackendMixin):
    """forward() of the cells: one step of the recurrence op (T = 1)."""

    def forward(self, input, hx=None):
        if tuned.on_call is not None:  # tune, explain or tuning on first use watch the calls
            tuned.on_call(self, input, hx)
        if backends.resolve_early(self.backend, input, 1) is not None:
            return super().forward(input, hx)
        batch = input.size(0) if input.dim() == 2 else 1
        try:
            backend, spec, dtypes = self._resolve(input, batch, 1, False, hx, watched=True)
        except backends.BackendUnavailableError:
            self._check_input_dtype(input)  # torch.nn's error first, as its matmul raises it
            raise
        if backend.whole_module:
            return super().forward(input, hx)
        is_lstm = spec.cell == "lstm"
        name = _torch_class(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        states = () if hx is None else (hx if is_lstm else (hx,))
        for idx, value in enumerate(states):
            if value.dim() not in (1, 2):
                what = f"hx[{idx}]" if is_lstm else "hidden"
                raise ValueError(
                    f"{name}: Expected {what} to be 1D or 2D, got {value.dim()}D instead"
                )
        is_batched = input.dim() == 2
        if is_lstm and hx is not None:
            # as torch's LSTMCell: unbatched, it reads hx[0] and hx[1] (an IndexError for
            # one state; more are ignored); batched, lstm_cell takes exactly a tuple of two
            if not is_batched:
                states = (states[0], states[1])
            elif not isinstance(hx, (tuple, list)):
                raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of "
                                f"Tensors, not {type(hx).__name__}")
            elif len(hx) != 2:
                raise RuntimeError("lstm_cell expects two hidden states")
        if not is_batched:
            input = input.unsqueeze(0)
            states = tuple(s.unsqueeze(0) for s in states)
        if not states:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            states = (zeros, zeros) if is_lstm else (zeros,)
        self._check_cell_args(input, states)
        if dtypes.error is not None:
            raise RuntimeError(dtypes.error)
        input = _as_dtype(input, spec.dtype)
        states = tuple(_as_dtype(s, spec.dtype) for s in states)

        w_ih, w_hh, b_ih, b_hh = (
            _as_dtype(w, spec.dtype)
            for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        )
        with torch.autocast(input.device.type, enabled=False):
            gx_bias, b_hn = _split_bias(spec.cell, b_ih, b_hh, self.hidden_size)
            gx = backend.input_projection(input, w_ih, gx_bias).unsqueeze(0)
            _, h, c = recurrence(
                backend, spec, gx, states[0], states[1] if is_lstm else None, w_hh, None, b_hn,
                source=ProjectionSource(input, w_ih, gx_bias),
            )
        h, c = _as_dtype(h, dtypes.h), _as_dtype(c, dtypes.c)
        if not is_batched:
            h = h.squeeze(0)
            c = None if c is None else c.squeeze(0)
        return (h, c) if is_lstm else h

    def _call_spec(self, input, hx=None) -> RecurrenceSpec:
        """The spec ``auto`` resolves for ``forward(input, hx)`` (what ``tune`` keys)."""
        batch = input.size(0) if input.dim() == 2 else 1
        return self._resolve(input, batch, 1, False, hx, resolve=False)[1]

    def _check_cell_args(self, input, states) -> None:
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}"
            )
        for idx, state in enumerate(states):
            if state.size(0) != input.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size "
                    f"{state.size(0)}"
                )
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{idx} has inconsistent hidden_size: got {state.size(1)}, "
                    f"expected {self.hidden_size}"
                )
        _check_same_device(input, states)
        if input.dtype != self.weight_ih.dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(
                f"mat1 and mat2 must have the same dtype, but got {_scalar_type(input.dtype)} "
                f"and {_scalar_type(self.weight_ih.dtype)}"
            )


class LSTM(_SequenceMixin, nn.LSTM):
    """torch.nn.LSTM with a selectable backend (keyword-only ``backend="auto"``)."""


class GRU(_SequenceMixin, nn.GRU):
    """torch.nn.GRU with a selectable backend (keyword-only ``backend="auto"``)."""


class RNN(_SequenceMixin, nn.RNN):
    """torch.nn.RNN (tanh or relu) with a selectable backend (keyword-only ``backend``)."""


class LSTMCell(_CellMixin, nn.LSTMCell):
    """torch.nn.LSTMCell with a selectable backend (keyword-only ``backend="auto"``)."""


class GRUCell(_CellMixin, nn.GRUCell):
    """torch.nn.GRUCell with a selectable backend (keyword-only ``backend="auto"``)."""


class RNNCell(_CellMixin, nn.RNNCell):
    """torch.nn.RNNCell (tanh or relu) with a selectable backend (keyword-only ``backend``)."""
