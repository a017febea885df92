"""The ``cpu`` backend: the recurrence in C++ (``csrc/cpu/recurrence.cpp``).

The whole time loop of one layer and direction runs in C++ as the torch.library ops
``cnnlstm_fast::recurrence_forward`` / ``recurrence_backward`` (CPU dispatch key): per
step one BLAS GEMM on the active rows and one fused, vectorised, multi-threaded
pointwise pass (``csrc/include/cnnlstm_fast/gate_math.h``). It computes and saves
exactly what the ``reference`` backend does (shared op plumbing: ``compiled.py``).

Its input projection and that projection's gradient GEMMs run through
``cnnlstm_fast::linear`` (``csrc/cpu/linear.cpp``): our AVX-512 GEMM for float32 where
the CPU has AVX-512 (torch's MKL measured 2-4x slower at these shapes on a 2-core
Zen 5, the rate of its AVX2 code), ``F.linear`` elsewhere. ``CNNLSTM_FAST_CPU_GEMM``
(``auto``, ``avx512``, ``blas``) picks the GEMM of the projection and the recurrence alike.

Its large buffers (saved activations, dG, the projection, packed weights, scratch; 128 KB
and more) come from a
cache of blocks that earlier calls freed (``csrc/cpu/alloc.h``): fresh memory of that
size is faulted in a page at a time on every training step otherwise, which cost a
third of an LSTM's forward+backward on a 2-core VM. ``CNNLSTM_FAST_CPU_CACHE_MB``
bounds what it keeps (default 1024; 0 turns it off); :func:`empty_cache` gives it back
and :func:`cache_info` reports it.
"""

from __future__ import annotations

import torch

from .. import _ext
from .base import RecurrenceSpec
from .compiled import _SAVES_EXTRA, CompiledOpsBackend

_DTYPES = (torch.float32, torch.float64)

#: Whether bidirectional layers run their directions side by side (see
#: CpuBackend.concurrent_directions); a module-level switch for measuring both ways
#: (benchmarks/directions.py), not a user setting.
_CONCURRENT_DIRECTIONS = True


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

    def forward_from_input(self, spec, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn):
        if not x.is_contiguous():
            # a strided view (a conv's output transposed): the op would copy it; the
            # projection reads it in place instead (input_projection), then the recurrence
            return None
        # G_x a chunk of steps at a time into one reused buffer, never (T, B, gates*H)
        # whole: fresh memory that size cost more in page faults than its GEMM.
        y, h_t, c_t = torch.ops.cnnlstm_fast.recurrence_forward_from_input(
            spec.cell, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn, spec.reverse
        )
        return y, h_t, c_t if spec.cell == "lstm" else None

    def concurrent_directions(self, spec: RecurrenceSpec) -> bool:
        """Whether the directions of a bidirectional layer run side by side, each on its
        share of the threads (``csrc/cpu/directions.cpp``; with one thread they run one
        after the other there)."""
        return _CONCURRENT_DIRECTIONS

    def forward_from_input_directions(self, specs, x, w_ih, gx_bias, h0, c0, w_hh, w_hr,
                                      b_hn):
        """forward_from_input for the directions of a layer at once (lists, one entry per
        direction): a list of ``(Y, h_T, c_T | None)``, or None where the one-direction
        path would not run either."""
        if not x.is_contiguous():
            return None
        ys, hs, cs = torch.ops.cnnlstm_fast.recurrence_forward_from_input_directions(
            specs[0].cell, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn,
            [s.reverse for s in specs])
        lstm = specs[0].cell == "lstm"
        return [(y, h, c if lstm else None) for y, h, c in zip(ys, hs, cs)]

    def forward_directions(self, specs, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved):
        """forward for the directions of a layer at once (lists, one entry per direction):
        a list of ``(Y, h_T, c_T | None, saved)``."""
        cell = specs[0].cell
        out = torch.ops.cnnlstm_fast.recurrence_forward_directions(
            cell, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, [s.reverse for s in specs],
            need_saved)
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
            d_y, d_hT, d_cT)
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


def cache_info() -> dict:
    """The cpu backend's buffer cache: ``limit_bytes`` (CNNLSTM_FAST_CPU_CACHE_MB),
    ``cached_bytes`` and ``cached_blocks`` (free, kept for reuse), ``in_use_bytes``
    (held by live tensors), ``hits`` and ``misses`` since the process started."""
    return dict(_module().cpu_cache_info())


def empty_cache() -> None:
    """Unmaps every free block the cpu backend's buffer cache holds (as
    ``torch.cuda.empty_cache`` does for CUDA); tensors in use keep theirs."""
    _module().cpu_empty_cache()
