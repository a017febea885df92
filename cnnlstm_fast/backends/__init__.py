"""Backend registry, process default and ``auto`` resolution.

Resolution of a module's backend, first match wins (before it, meta-device inputs,
torch.jit.trace and ONNX export run torch.nn's forward, whatever was named:
:func:`resolve_early`):
1. the module's own ``backend=`` if it is not ``"auto"``;
2. the process default (``set_backend``/``use_backend``, initialised from the
   environment variable ``CNNLSTM_FAST_BACKEND``) if it is not ``"auto"``;
3. ``auto``: the backend the tuning record holds for the call's signature, measured
   fastest on this machine by :func:`cnnlstm_fast.tune` (``tuned.py``; not under
   ``torch.use_deterministic_algorithms(True)``), where it is available and supports the
   input; else torch.nn for calls of fewer steps than :data:`AUTO_MIN_STEPS` gives the
   device (the cells among them), else the first backend of :data:`AUTO_PREFERENCE` for
   the input's device that is available and supports the input. ``torch`` ends every
   list.

A backend reached through 1 or 2 is used as named: if it cannot run the input, an
error says what it supports. Only ``auto`` falls back, silently; each choice is logged
at DEBUG on the ``cnnlstm_fast.backends`` logger (the record's ``requested`` and
``backend`` attributes hold the two names, ``why`` the reason), outside torch.compile's
tracing; :func:`cnnlstm_fast.explain` shows them per layer of a model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

import torch

from .. import _ext
from .base import CELLS, GATES, Backend, RecurrenceSpec
from . import cpu as _cpu_module
from . import rules
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .torch_nn import TorchBackend
from .triton import TritonBackend
from . import tuned

__all__ = [
    "AUTO_PREFERENCE",
    "Backend",
    "BackendUnavailableError",
    "CELLS",
    "GATES",
    "RecurrenceSpec",
    "available_backends",
    "backend_report",
    "get_backend",
    "get_default",
    "log_choice",
    "register",
    "registered_backends",
    "resolve",
    "resolve_early",
    "set_backend",
    "use_backend",
]

ENV_VAR = "CNNLSTM_FAST_BACKEND"

_log = logging.getLogger(__name__)


@torch.compiler.assume_constant_result
def _cpu_gemm_is_avx512() -> bool:
    """Whether the cpu backend's float32 GEMMs run our AVX-512 kernel (the CPU has it and
    :func:`cnnlstm_fast.backends.cpu.set_gemm` allows it): the measurements behind
    ``auto`` differ with it. Cached by ``cpu.gemm_in_use`` until the next ``set_gemm``.
    Under torch.compile it runs eagerly at trace time (it loads the extension, which
    Dynamo cannot trace) and its answer is a constant of the graph."""
    return _ext.load() is not None and _cpu_module.gemm_in_use() == "avx512"


#: fma512_ratio (``_C.cpu_gemm_info()``) from which a CPU counts as running 512-bit FMAs at
#: full rate: ~2 measured where it does, ~1 on the double-pumped AMD Zen 4.
_FULL_RATE_RATIO = 1.5


@torch.compiler.assume_constant_result
def _cpu_avx512_full_rate() -> bool:
    """Whether this CPU's cores run 512-bit float32 FMAs at full rate, twice the floats a
    cycle of 256-bit ones (AMD Zen 5, Intel server cores with two FMA-512 ports), as on
    the machines where ``auto``'s ``gemm: avx512`` LSTM rows were measured; on a core that
    splits them in two (AMD Zen 4) our GEMM gains nothing on torch's and oneDNN's LSTM
    keeps its lead. Timed once per process by the extension (~0.3 ms, first asked by a
    rule that needs it); False without it or without AVX-512."""
    module = _ext.load()
    return module is not None and module.cpu_gemm_info()["fma512_ratio"] >= _FULL_RATE_RATIO


#: glibc's own ceiling for its dynamic mmap threshold: a threshold set at least this high
#: keeps every block torch.nn's LSTM frees at these sizes for reuse. glibc before 2.35
#: ignores a threshold above it (``do_set_mmap_threshold`` refused values over
#: HEAP_MAX_SIZE / 2); 2.36 applied 1 GiB in our measurements.
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20
_KEEPING_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()
    except (AttributeError, ValueError, OSError, TypeError):
        return ()


def _parse_size(text: str) -> int | None:
    """An unsigned number as glibc's tunables read it (strtoul, base 0)."""
    text = text.strip()
    try:
        if text.lower().startswith("0x"):
            return int(text, 16)
        return int(text, 8) if len(text) > 1 and text.startswith("0") else int(text)
    except ValueError:
        return None


@torch.compiler.assume_constant_result
def _malloc_keeps_freed_memory() -> bool:
    """Whether this process's malloc keeps large freed blocks for reuse instead of
    unmapping them, so torch.nn's LSTM training does not fault in fresh memory at every
    step: glibc with its mmap threshold set to 32 MiB or more (measured) through
    GLIBC_TUNABLES ``glibc.malloc.mmap_threshold`` or MALLOC_MMAP_THRESHOLD_ (above 32 MiB
    only from glibc 2.35), or jemalloc, tcmalloc or mimalloc in LD_PRELOAD (assumed
    alike; not measured). It reads the environment as the process sees it now; glibc
    read it at start, and a ``mallopt`` call by the application is not seen."""
    return _malloc_keeps(os.environ)


def _malloc_keeps(environ, version: tuple[int, ...] | None = None) -> bool:
    """:func:`_malloc_keeps_freed_memory` for an environment and a glibc version given
    (``()``: unknown; None: this process's, asked only where it matters): also what a
    result file's recorded settings meant (tests/test_rules_table.py)."""
    threshold = environ.get("MALLOC_MMAP_THRESHOLD_")
    for item in (environ.get("GLIBC_TUNABLES") or "").split(":"):
        name, _, value = item.partition("=")
        if name.strip() == "glibc.malloc.mmap_threshold":
            threshold = value
    if threshold is not None:
        size = _parse_size(threshold)
        if size is not None and size >= _GLIBC_MMAP_THRESHOLD_MAX:
            if version is None:
                version = _glibc_version()
            if size == _GLIBC_MMAP_THRESHOLD_MAX or not version or version >= (2, 35):
                return True
    preload = environ.get("LD_PRELOAD") or ""
    return any(name in preload for name in _KEEPING_ALLOCATORS)


#: Per device type, the fewest steps a call must have for ``auto`` to try anything but
#: torch.nn; below, a call's fixed cost decides, and the cells (one step a call) stay
#: with torch.nn. From the table of rules (``rules.json``, ``min_steps``: CPU 8, measured
#: on a 2-core Xeon with AVX-512, where the cells measured 0.19x-0.71x; CUDA 256, the
#: range measured on the H100). Other device types have no rules: torch.nn.
AUTO_MIN_STEPS: dict[str, int] = dict(rules.MIN_STEPS)
tuned._min_steps = AUTO_MIN_STEPS

_CPU_ROWS = rules.rows_for("cpu", "cpu")
_CUDA_ROWS = rules.rows_for("cuda", "cuda")


def _cpu_beats_torch(spec: RecurrenceSpec) -> bool:
    """Where the ``cpu`` backend measured faster than torch.nn on CPU: a row of the table
    of rules (``rules.json``, device ``cpu``; docs/backends.md#how-auto-decides) takes the
    call, never below :data:`AUTO_MIN_STEPS` steps. float32 with our AVX-512 GEMM follows
    the rows measured on a 2-core AMD EPYC (``gemm: avx512``), float64 and BLAS GEMMs the
    rows measured on a 2-core Xeon before that GEMM existed (``gemm: blas``); some LSTM
    training rows hold only with glibc's default malloc (:func:`_malloc_keeps_freed_memory`),
    some LSTM rows only on cores with full-rate 512-bit FMAs (:func:`_cpu_avx512_full_rate`)."""
    return rules.takes(_CPU_ROWS, spec, _cpu_gemm_is_avx512, _cpu_avx512_full_rate,
                       _malloc_keeps_freed_memory) \
        is not None


def _cuda_beats_torch(spec: RecurrenceSpec) -> bool:
    """Where the ``cuda`` backend measured faster than torch.nn (cuDNN) on an H100: a row
    of the table of rules (``rules.json``, device ``cuda``) takes the call. Inference
    only, bfloat16 LSTM and GRU and some float16 shapes, at >= 256 steps; see the rows'
    notes for the measurements."""
    return rules.takes(_CUDA_ROWS, spec, _cpu_gemm_is_avx512, _cpu_avx512_full_rate,
                       _malloc_keeps_freed_memory) \
        is not None


#: Per device type, the backends ``auto`` tries in order, each with the rule that says
#: where it is faster than torch.nn (None: everywhere it is supported). Backed by the
#: committed benchmark results; ``torch`` ends every list.
AUTO_PREFERENCE: dict[str, tuple[tuple[str, Callable[[RecurrenceSpec], bool] | None], ...]] = {
    "cpu": (("cpu", _cpu_beats_torch), ("torch", None)),
    "cuda": (("cuda", _cuda_beats_torch), ("torch", None)),
}

#: How ``available_backends()`` ranks: the compiled kernels, then torch.nn, then the
#: pure-PyTorch specification.
_RANK = ("cuda", "triton", "cpu", "torch", "reference")

_REGISTRY: dict[str, Backend] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly named backend cannot run the given input on this machine."""


def register(backend: Backend) -> Backend:
    """Adds ``backend`` to the registry under ``backend.name`` (replacing any)."""
    global _registrations
    _REGISTRY[backend.name] = backend
    _registrations += 1
    return backend


_registrations = 0


def generation() -> tuple:
    """What, besides a call's own facts, ``resolve`` reads that may change while a
    process runs: the registry (a count of registrations), the process default, the
    tuning record held (the object itself: every load, reset or new entry makes a new
    one), the cpu GEMM in use and whether deterministic algorithms are on (then the
    record is not consulted). A module keeps its last call's resolution while this and
    the call's facts are the same (``cnnlstm_fast/nn/rnn.py``, ``_call_key``). Not in
    it: the malloc settings the training rows read from the environment (read at a
    module's first call of a signature, as glibc reads them once at start) and the
    CPU's FMA rate (timed once per process)."""
    choices = tuned._choices if tuned._choices is not None else tuned.load()
    gemm = _cpu_module._gemm_in_use
    if gemm is None and _ext.load() is not None:
        gemm = _cpu_module.gemm_in_use()
    return (_registrations, _default, _ChoicesIdentity(choices), gemm,
            torch.are_deterministic_algorithms_enabled())


class _ChoicesIdentity:
    """Equal only to one holding the very same record object (a dict compares by
    contents, and an id may be reused once the old record is freed: this holds it)."""

    __slots__ = ("choices",)

    def __init__(self, choices) -> None:
        self.choices = choices

    def __eq__(self, other) -> bool:
        return isinstance(other, _ChoicesIdentity) and other.choices is self.choices

    __hash__ = None


def logging_choices() -> bool:
    """Whether choices are logged (at DEBUG): then every call resolves, and logs."""
    return _log.isEnabledFor(logging.DEBUG)


def registered_backends() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The registered backend ``name``, or a variant of one, ``"<backend>:<variant>"``
    (``Backend.variant``; e.g. ``"cpu:side_by_side"``, what ``tune`` may record)."""
    base, _, variant = name.partition(":")
    try:
        backend = _REGISTRY[base]
    except KeyError:
        raise ValueError(
            f"backend must be 'auto' or one of {registered_backends()}, got {name!r}"
        ) from None
    return backend.variant(variant) if variant else backend


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend should be of type str, got: {type(name).__name__}")
    if name != "auto":
        get_backend(name)
    return name


@torch.compiler.assume_constant_result
def _unavailable(name: str) -> str | None:
    """``unavailable_reason()`` of a registered backend. Under torch.compile it runs
    eagerly at trace time and its answer is a constant of the graph (it imports
    modules and loads the extension, which Dynamo cannot trace)."""
    return get_backend(name).unavailable_reason()


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, best first."""
    order = [n for n in _RANK if n in _REGISTRY] + [n for n in _REGISTRY if n not in _RANK]
    return [n for n in order if _unavailable(n) is None]


def backend_report() -> dict[str, str | None]:
    """Maps every registered backend to None (available) or why it is not."""
    return {name: _unavailable(name) for name in _REGISTRY}


_default: str | None = None  # read from the environment on first use


def _process_default() -> str:
    global _default
    if _default is None:
        value = os.environ.get(ENV_VAR) or "auto"
        try:
            _default = _check_name(value)
        except ValueError:
            raise ValueError(
                f"{ENV_VAR} must be 'auto' or one of {registered_backends()}, got {value!r}"
            ) from None
    return _default


def set_backend(name: str) -> None:
    """Sets the process default that modules built with ``backend="auto"`` use."""
    global _default
    _default = _check_name(name)


def get_default() -> str:
    """The process default backend name ("auto" unless set)."""
    return _process_default()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily sets the process default backend (see :func:`set_backend`)."""
    global _default
    previous = _process_default()
    _default = _check_name(name)
    try:
        yield
    finally:
        _default = previous


def resolve(requested: str, spec: RecurrenceSpec) -> Backend:
    """The backend that runs ``spec`` for a module that asked for ``requested``."""
    backend, why = _resolve(requested, spec)
    if spec.batch == 0 and not backend.whole_module:
        # An empty batch has nothing to compute: the reference gives the empty outputs
        # and the zero weight gradients torch.nn gives, and no kernel is asked for a
        # zero-size launch.
        backend, why = _REGISTRY["reference"], "an empty batch: nothing to compute"
    log_choice(requested, backend, spec, why)
    return backend


def resolve_early(requested: str, data: torch.Tensor, steps: int) -> Backend | None:
    """The backend, where it is torch.nn's forward and known without a spec (the cheap
    path of the cells' one-step calls), else None. In this order: ``torch`` named; then,
    whatever was named, shapes only (the meta device), torch.jit.trace and ONNX export,
    which then record torch.nn's operator (aten::lstm, ONNX's LSTM), runnable without
    our extension; then ``auto`` with fewer steps than any other backend's rule takes on
    ``data``'s device (:data:`AUTO_MIN_STEPS`), unless the tuning record took another
    backend for such calls on that device type (then its lookup decides).

    Every call of a module runs this, so it does as little as it can: on a short call
    torch.nn's own work is a few microseconds, and each Python step here adds a share of
    that (``python -m cnnlstm_fast.bench --suite short-seq`` times it against torch.nn;
    benchmarks/results/cpu-xeon-amx/README.md)."""
    name = requested if requested != "auto" else (_default or _process_default())
    if name == "torch":
        why: object = "named"
    elif data.is_meta:
        why = "the meta device (shapes only)"
    # ONNX's exporters trace (the TorchScript one with torch.jit's tracer, the other with
    # torch.export); is_in_onnx_export costs a few microseconds, so it is asked only then.
    # Before the step count: under torch.jit's tracer that is a tensor, and comparing it
    # would warn.
    elif torch.jit.is_tracing() or (torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export()):
        why = "tracing or ONNX export"
    elif name == "auto" and steps < AUTO_MIN_STEPS.get(_device_type(data), sys.maxsize) and not (
            tuned.short_calls if tuned.short_calls is not None else _tuned_short_calls()):
        why = _ShortCall(steps, data)
    else:
        return None
    backend = _REGISTRY["torch"]
    log_choice(requested, backend, why)
    return backend


@torch.compiler.assume_constant_result
def _tuned_short_calls() -> bool:
    """``tuned.short_calls``, the record read first. Under torch.compile it runs eagerly
    at trace time (Dynamo cannot trace the file's reading) and its answer is a constant
    of the graph."""
    tuned.load()
    return bool(tuned.short_calls)


def _device_type(data: torch.Tensor) -> str:
    """``data.device.type``, without building a device object for CPU and CUDA tensors."""
    return "cuda" if data.is_cuda else "cpu" if data.is_cpu else data.device.type


class _ShortCall:
    """Why ``auto`` took torch.nn for a short call; formatted only when logged."""

    __slots__ = ("steps", "data")

    def __init__(self, steps: int, data: torch.Tensor):
        self.steps, self.data = steps, data

    def __str__(self) -> str:
        device = self.data.device.type
        return f"auto: {self.steps} step(s) on {device}, fewer than any other backend's rule takes"


def log_choice(requested: str, backend: Backend, what: RecurrenceSpec | object,
               why: object = None) -> None:
    """Logs a resolution at DEBUG (the module docstring), for ``what`` (a spec, or why
    where there is none) and ``why`` (as :func:`_resolve` gives it)."""
    # Dynamo cannot trace a logging call (fullgraph=True would fail): not while compiling
    if torch.compiler.is_compiling() or not _log.isEnabledFor(logging.DEBUG):
        return
    spec = what if isinstance(what, RecurrenceSpec) else None
    if spec is not None:
        what = (f"{spec.cell} hidden {spec.hidden_size}, batch {spec.batch}, {spec.steps} steps, "
                f"{spec.dtype} on {spec.device}, {'training' if spec.needs_grad else 'inference'}"
                f"{', packed' if spec.variable_lengths else ''}")
        why = _why_text(why, spec, backend)
    else:
        what = why = str(what)
    _log.debug("backend %r -> %r: %s", requested, backend.name, what,
               extra={"requested": requested, "backend": backend.name, "why": why, "spec": spec})


def _why_text(why: object, spec: RecurrenceSpec, backend: Backend) -> str:
    """The reason :func:`_resolve` gave, as text: a string as it is; ``auto``'s rule that
    took the backend; for torch.nn as the last fallback, why each other candidate did not."""
    if why is None or isinstance(why, str):
        return why or ""
    if callable(why):
        return f"auto's rule {why.__name__}: measured faster than torch.nn here"
    declined = []
    for candidate, faster in AUTO_PREFERENCE.get(spec.device.type, ()):
        if candidate == backend.name or candidate not in _REGISTRY:
            continue
        reason = (_unavailable(candidate) or _REGISTRY[candidate].unsupported_reason(spec)
                  or (f"its rule {faster.__name__} does not take this input" if faster else None))
        declined.append(f"{candidate}: {reason}")
    return "auto's rules: torch.nn" + (f" ({'; '.join(declined)})" if declined else "")


#: The reason :func:`_resolve` gives where ``auto`` falls back to torch.nn.
_FALLBACK = object()


def _resolve(requested: str, spec: RecurrenceSpec, record: bool = True) -> tuple[Backend, object]:
    """(backend, why): why is a string, the rule that took the backend, or
    :data:`_FALLBACK`; formatted by :func:`_why_text` only when logged. Without
    ``record``, ``auto``'s rules alone (what ``tune`` compares its measurements with)."""
    if requested != "auto":
        return _named(requested, spec), "named by the module"
    name = _process_default()
    if name != "auto":
        return _named(name, spec), "the process default (set_backend, CNNLSTM_FAST_BACKEND)"
    tuned_choice = tuned.lookup(spec) if record else None
    if tuned_choice is not None:
        try:
            backend = get_backend(tuned_choice[0])
        except ValueError:  # a variant this version does not have: the rules decide
            backend = None
        if (backend is not None and _unavailable(backend.name) is None
                and backend.unsupported_reason(spec) is None):
            return backend, tuned_choice[1]
    for candidate, faster in AUTO_PREFERENCE.get(spec.device.type, ()):
        backend = _REGISTRY.get(candidate)
        if (
            backend is not None
            and _unavailable(candidate) is None
            and backend.unsupported_reason(spec) is None
            and (faster is None or faster(spec))
        ):
            return backend, _FALLBACK if faster is None else faster
    return _REGISTRY["torch"], _FALLBACK


def _named(name: str, spec: RecurrenceSpec) -> Backend:
    """A backend named by the module or the process default, which must run ``spec``."""
    backend = get_backend(name)
    why = _unavailable(name)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    why = backend.unsupported_reason(spec)
    if why is not None:
        raise BackendUnavailableError(
            f"backend {name!r} cannot run this input ({why}); "
            f"it supports {backend.supports}"
        )
    return backend


register(TorchBackend())
register(ReferenceBackend())
register(CpuBackend())
register(CudaBackend())
register(TritonBackend())
