"""The ``cpu`` backend: the recurrence in C++ (``csrc/cpu/recurrence.cpp``).

The whole time loop of one layer and direction runs in C++ as the torch.library ops
``cnnlstm_fast::recurrence_forward`` / ``recurrence_backward`` (CPU dispatch key): per
step one BLAS GEMM on the active rows and one fused, vectorised, multi-threaded
pointwise pass (``csrc/include/cnnlstm_fast/gate_math.h``). It computes and saves
exactly what the ``reference`` backend does (shared op plumbing: ``compiled.py``).

Its input projection and that projection's gradient GEMMs run through
``cnnlstm_fast::linear`` (``csrc/cpu/linear.cpp``): our AVX-512 GEMM for float32 where
the CPU has AVX-512 (torch's MKL measured 2-4x slower at these shapes on a 2-core
Zen 5, the rate of its AVX2 code), ``F.linear`` elsewhere. :func:`set_gemm` (``auto``,
``avx512``, ``blas``; or the context manager :func:`use_gemm`) picks the GEMM of the
projection, the recurrence and the conv-to-sequence op alike, for the whole process.

Float32 layers without projection may run their time loop as one parallel region for the
whole sequence (the persistent path, ``csrc/cpu/recurrence.cpp``). :func:`set_kernel`
(or :func:`use_kernel`) picks: ``auto`` (where it measured faster), ``persistent``
(wherever it can run) or ``per_step``; the backend passes the choice to the ops as their
``kernel_name`` argument.

Its large buffers (saved activations, dG, the projection, packed weights, scratch; 128 KB
and more) come from a
cache of blocks that earlier calls freed (``csrc/cpu/alloc.h``): fresh memory of that
size is faulted in a page at a time on every training step otherwise, which cost a
third of an LSTM's forward+backward on a 2-core VM. ``CNNLSTM_FAST_CPU_CACHE_MB`` (read
when the extension loads) or :func:`set_cache_limit` bounds what it keeps (default 1024
MB; 0 turns it off); :func:`empty_cache` gives it back and :func:`cache_info` reports it.

The C++ reads no environment variable: the GEMM and the cache bound are process settings
held in the extension and set from here, the kernel an argument of each op call.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Callable, Iterator

import torch

from .. import _ext
from .base import RecurrenceSpec
from .compiled import _SAVES_EXTRA, CompiledOpsBackend

_DTYPES = (torch.float32, torch.float64)

#: The values of :func:`set_gemm`, the default first.
GEMMS = ("auto", "avx512", "blas")
#: The values of :func:`set_kernel`, the default first.
KERNELS = ("auto", "per_step", "persistent")
#: The values of :func:`set_directions`, the default first.
DIRECTIONS = ("one_after_the_other", "side_by_side")

_settings_lock = threading.Lock()
_kernel = "auto"
_directions = "one_after_the_other"
_variants: dict[str, "CpuBackend"] = {}
_gemm_in_use: str | None = None  # what cpu_gemm_info() says, cached until set_gemm


class CpuBackend(CompiledOpsBackend):
    name = "cpu"
    supports = (
        "CPU tensors in float32 or float64: LSTM (with or without proj_size), GRU, "
        "RNN tanh/relu, packed sequences, both directions"
    )

    def unsupported_reason(self, spec: RecurrenceSpec) -> str | None:
        if spec.device.type != "cpu":
            return f"device {spec.device} is not a CPU device"
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} is not float32 or float64"
        return None

    def unavailable_reason(self) -> str | None:
        why = super().unavailable_reason()
        return why if why is not None else _ext.settings_error()

    def kernel_arguments(self, backward: bool) -> dict:
        return {"kernel_name": _kernel}

    #: csrc/cpu/recurrence.cpp walks each step's rows of packed input where they lie.
    packed_rows = True

    def forward_from_input(self, spec, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn,
                           batch_sizes=None):
        # G_x a chunk of steps at a time into one reused buffer, never (T, B, gates*H)
        # whole: fresh memory that size cost more in page faults than its GEMM. A
        # batch-first input's transposed view, a conv output permuted to (T, B, C) and
        # packed rows are read where they lie, never copied.
        y, h_t, c_t = torch.ops.cnnlstm_fast.recurrence_forward_from_input(
            spec.cell, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn, spec.reverse,
            kernel_name=_kernel, batch_sizes=batch_sizes,
        )
        return y, h_t, c_t if spec.cell == "lstm" else None

    #: The directions order this instance runs (None: :func:`set_directions`'s); set on
    #: the variant ``cpu:<order>`` (:meth:`variant`).
    directions: str | None = None

    def concurrent_directions(self, spec: RecurrenceSpec) -> bool:
        """Whether the directions of a bidirectional layer run side by side, each on its
        share of the threads (``csrc/cpu/directions.cpp``; with one thread they run one
        after the other there): this variant's order, else :func:`set_directions`."""
        return (self.directions or _directions) == "side_by_side"

    def variants(self, spec: RecurrenceSpec) -> list[str]:
        """``side_by_side`` for a bidirectional layer with two threads or more: the
        directions order that measured slower on a 2-core VM but may pay with more cores
        (:func:`set_directions`), which ``tune`` then measures on the user's machine."""
        if (self.directions is None and len(spec.layer) >= 4 and spec.layer[3] == 2
                and torch.get_num_threads() >= 2):
            return [order for order in DIRECTIONS if order != _directions]
        return []

    def variant(self, name: str) -> "CpuBackend":
        """``cpu:one_after_the_other`` or ``cpu:side_by_side``: the cpu backend with that
        directions order whatever :func:`set_directions` says."""
        if name not in DIRECTIONS:
            raise ValueError(f"backend 'cpu' variant must be one of "
                             f"{', '.join(map(repr, DIRECTIONS))}, got {name!r}")
        known = _variants.get(name)
        if known is None:
            known = _variants[name] = type(self)()
            known.name, known.directions = f"{self.name}:{name}", name
        return known

    def forward_from_input_directions(self, specs, x, w_ih, gx_bias, h0, c0, w_hh, w_hr,
                                      b_hn, batch_sizes=None, side_by_side=None):
        """forward_from_input for the directions of a layer at once (lists, one entry per
        direction), each direction's Y written into its column block of the layer's
        output: ``(Y, [h_T], [c_T | None])``. ``side_by_side`` (default
        :meth:`concurrent_directions`) runs the directions at the same time, else one
        after the other."""
        if side_by_side is None:
            side_by_side = self.concurrent_directions(specs[0])
        y, hs, cs = torch.ops.cnnlstm_fast.recurrence_forward_from_input_directions(
            specs[0].cell, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn,
            [s.reverse for s in specs], kernel_name=_kernel, batch_sizes=batch_sizes,
            side_by_side=side_by_side)
        return y, list(hs), list(cs) if specs[0].cell == "lstm" else [None] * len(specs)

    def forward_directions(self, specs, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved):
        """forward for the directions of a layer at once (lists, one entry per direction):
        a list of ``(Y, h_T, c_T | None, saved)``."""
        cell = specs[0].cell
        out = torch.ops.cnnlstm_fast.recurrence_forward_directions(
            cell, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, [s.reverse for s in specs],
            need_saved, kernel_name=_kernel)
        results = []
        for d, (y, h_t, c_t, act, h_prev, extra) in enumerate(zip(*out)):
            saved = ()
            if need_saved:
                saved = (act, h_prev, extra if cell in _SAVES_EXTRA else None, w_hh[d], w_hr[d])
            results.append((y, h_t, c_t if cell == "lstm" else None, saved))
        return results

    def backward_directions(self, specs, saved, batch_sizes, d_y, d_hT, d_cT):
        """backward for the directions of a layer at once: a list of backward's tuples."""
        cell = specs[0].cell
        act, h_prev, extra, w_hh, w_hr = (list(column) for column in zip(*saved))
        out = torch.ops.cnnlstm_fast.recurrence_backward_directions(
            cell, act, h_prev, extra, w_hh, w_hr, batch_sizes, [s.reverse for s in specs],
            d_y, d_hT, d_cT, kernel_name=_kernel)
        return [
            (d_gx, dh0, dc0 if cell == "lstm" else None, d_w_hh,
             d_w_hr if w_hr[d] is not None else None, d_b_hn if cell == "gru" else None)
            for d, (d_gx, dh0, dc0, d_w_hh, d_w_hr, d_b_hn) in enumerate(zip(*out))
        ]

    def input_projection(self, x, weight, bias):
        # Under torch.func's transforms and forward-mode AD F.linear: the autograd
        # formula registered for our op (torch.library.register_autograd on a C++ op)
        # supports neither. (Dynamo cannot trace the query; torch.compile's graphs keep
        # our op.)
        if not torch.compiler.is_compiling() and (
                torch._C._functorch.peek_interpreter_stack() is not None
                or torch.autograd.forward_ad._current_level >= 0):
            return torch.nn.functional.linear(x, weight, bias)
        if x.dim() == 3 and not x.is_contiguous() and x.dtype == torch.float32:
            # a view the rows of which are not one stride apart (a batch_first input, a
            # conv's (B, C, T) output transposed): read in place by the conv-to-sequence
            # projection, never copied (linear would reshape it into a copy)
            from ..ops import conv2seq

            return conv2seq.projection(x.permute(1, 2, 0), None, None, None, None, weight,
                                       bias, 1)[0]
        # torch.ops directly, as in forward(): ops() has registered the autograd formula.
        return torch.ops.cnnlstm_fast.linear(x, weight, bias)


def _module():
    module = _ext.load()
    if module is None:
        raise RuntimeError(f"cnnlstm_fast._C is not built: {_ext.load_error()}")
    return module


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                         f"got {value!r}")
    return value


def set_gemm(name: str) -> None:
    """Sets the float32 GEMM of the cpu backend's ops for the whole process: ``"auto"``
    (the default: our AVX-512 kernel where the CPU has AVX-512F, torch's BLAS elsewhere),
    ``"avx512"`` (ours; a ValueError where the CPU or the build cannot run it) or
    ``"blas"``. ``auto``'s rules follow the GEMM in use (their measurements differ with
    it). A call running on another thread meanwhile may run some of its GEMMs with the
    old setting and some with the new one: set it between calls."""
    global _gemm_in_use
    _choice("gemm", name, GEMMS)
    with _settings_lock:
        _module().cpu_set_gemm(name)
        _gemm_in_use = None


def get_gemm() -> str:
    """The GEMM setting (:func:`set_gemm`): ``"auto"``, ``"avx512"`` or ``"blas"``."""
    return _module().cpu_gemm_info()["setting"]


def gemm_in_use() -> str:
    """The GEMM the float32 ops run now: ``"avx512"`` or ``"blas"``. Cached between calls
    of :func:`set_gemm` (asking the extension costs microseconds, which every call that
    ``auto`` resolves would pay); a setting made past :func:`set_gemm`, through
    ``cnnlstm_fast._C.cpu_set_gemm``, is not seen here."""
    global _gemm_in_use
    known = _gemm_in_use
    if known is None:
        known = _gemm_in_use = _module().cpu_gemm_info()["in_use"]
    return known


@contextlib.contextmanager
def _using(get: Callable[[], str], set_: Callable[[str], None], value: str) -> Iterator[None]:
    """The block runs with ``set_(value)``; the setting ``get()`` gave is back after it."""
    before = get()
    set_(value)
    try:
        yield
    finally:
        set_(before)


def use_gemm(name: str) -> contextlib.AbstractContextManager[None]:
    """``with use_gemm("blas"): ...`` runs the block with that GEMM (:func:`set_gemm`) and
    restores the previous setting after it. Process-wide, not per thread."""
    return _using(get_gemm, set_gemm, name)


def set_kernel(name: str) -> None:
    """Sets which time loop the cpu backend's recurrence runs, for the whole process (the
    ops' ``kernel_name`` argument): ``"auto"`` (the default: the persistent path where it
    measured faster), ``"persistent"`` (one parallel region for the sequence wherever it
    can run: float32 with the AVX-512 GEMM, no projection, at least two threads with
    hidden units to own; the per-step loop elsewhere) or ``"per_step"`` (never the
    persistent path). Both loops compute every element in the same order: results are
    bit for bit the same. Read at each forward and backward call."""
    global _kernel
    _kernel = _choice("kernel", name, KERNELS)


def get_kernel() -> str:
    """The kernel setting (:func:`set_kernel`)."""
    return _kernel


def use_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """``with use_kernel("per_step"): ...`` runs the block with that kernel setting
    (:func:`set_kernel`) and restores the previous one after it. Process-wide."""
    return _using(get_kernel, set_kernel, name)


def set_directions(order: str) -> None:
    """Sets how the cpu backend runs the two directions of a bidirectional layer, for the
    whole process: ``"one_after_the_other"`` (the default), each with all of torch's
    threads, or ``"side_by_side"``, each on its share of the threads at the same time
    (``csrc/cpu/directions.cpp``; forward and backward). Results are bit for bit the
    same where our AVX-512 GEMM runs (float32); BLAS (float64, CPUs without AVX-512) may
    round differently on a direction's fewer threads, as it does between thread counts
    anyway. Side by side is not the default because it measured slower where we could
    measure it: 0.76x (geomean; 0.52x-1.16x) on a 2-core VM
    (``benchmarks/results/cpu-amd-epyc/directions.json``), whose two vCPUs slow each
    other down (two single-thread GEMM streams at once ran 1.17-1.38x slower each) and
    where one direction's persistent path already gains 1.6x from the second vCPU. It is
    expected to pay with more cores than one direction can use (a direction's persistent
    path splits the hidden units into 32-unit slices, one per thread); measure with
    ``benchmarks/directions.py`` on your machine. Read at each call."""
    global _directions
    _directions = _choice("order", order, DIRECTIONS)


def get_directions() -> str:
    """The directions setting (:func:`set_directions`)."""
    return _directions


def use_directions(order: str) -> contextlib.AbstractContextManager[None]:
    """``with use_directions("side_by_side"): ...`` runs the block with that order
    (:func:`set_directions`) and restores the previous one after it. Process-wide."""
    return _using(get_directions, set_directions, order)


def set_cache_limit(mb: int) -> None:
    """Bounds the buffer cache to ``mb`` MiB (a whole number >= 0; 0 turns it off),
    giving back cached blocks beyond the new bound at once. The default is
    ``CNNLSTM_FAST_CPU_CACHE_MB`` as the process had it when the extension loaded, else
    1024."""
    if isinstance(mb, bool) or not isinstance(mb, numbers.Integral) or mb < 0:
        raise ValueError(f"mb must be a whole number of MiB >= 0, got {mb!r}")
    _module().cpu_set_cache_limit(int(mb) << 20)


def cache_info() -> dict:
    """The cpu backend's buffer cache: ``limit_bytes`` (:func:`set_cache_limit`),
    ``cached_bytes`` and ``cached_blocks`` (free, kept for reuse), ``in_use_bytes``
    (held by live tensors), ``hits`` and ``misses`` since the process started."""
    return dict(_module().cpu_cache_info())


def empty_cache() -> None:
    """Unmaps every free block the cpu backend's buffer cache holds (as
    ``torch.cuda.empty_cache`` does for CUDA); tensors in use keep theirs."""
    _module().cpu_empty_cache()
