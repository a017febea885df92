"""How steps are timed (docs/design.md#measuring): warm-up first, then on CUDA
``triton.testing.do_bench`` (CUDA events, median and p20/p80), on CPU the providers
interleaved repetition by repetition (so load from other processes hits all alike),
``time.perf_counter``, median and p20/p80. Plus the device's measured matmul peak.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def summary(times_ms: list[float]) -> dict[str, float]:
    if len(times_ms) == 1:
        return {"median_ms": times_ms[0], "p20_ms": times_ms[0], "p80_ms": times_ms[0]}
    cuts = statistics.quantiles(times_ms, n=5, method="inclusive")
    return {"median_ms": statistics.median(times_ms), "p20_ms": cuts[0], "p80_ms": cuts[3]}


def time_cpu(steps: dict[str, Callable[[], None]], reps: int, budget_s: float,
             warmup: int = 1) -> dict[str, dict]:
    """Interleaved, each repetition in a rotated provider order. After warm-up, the
    repetitions are cut to fit ``budget_s`` (at least 5, at most ``reps``)."""
    names = list(steps)
    first = {}
    for name in names:
        for _ in range(warmup):
            start = time.perf_counter()
            steps[name]()
            first[name] = time.perf_counter() - start
    reps = max(min(reps, int(budget_s / max(sum(first.values()), 1e-9))), min(reps, 5))
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {**summary(t), "reps": len(t)} for name, t in times.items()}


def time_cuda(steps: dict[str, Callable[[], None]], rep_ms: int) -> dict[str, dict]:
    """CUDA events via do_bench (its own warm-up of 25 ms), ``rep_ms`` of repetitions per
    provider; peak memory of one extra step from torch.cuda.max_memory_allocated."""
    from triton.testing import do_bench

    result = {}
    for name, step in steps.items():
        median, p20, p80 = do_bench(step, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        result[name] = {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mib": peak}
    return result


def matmul_peak_tflops(device: str, dtype: torch.dtype) -> float:
    """The best rate of a large square GEMM: the "measured peak" rows are set against.
    torch.mm, and on CPU in float32 also the cpu backend's own GEMM (cnnlstm_fast::linear),
    which is 2x torch's MKL on AMD CPUs: the peak is the better of the two."""
    size = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    if device.startswith("cuda"):
        from triton.testing import do_bench

        best_ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="min")
    else:
        candidates = [lambda: a @ b]
        if dtype == torch.float32 and _cpu_linear() is not None:
            candidates.append(lambda: _cpu_linear()(a, b, None))
        best_ms = float("inf")
        for gemm in candidates:
            gemm()
            for _ in range(3):
                start = time.perf_counter()
                gemm()
                best_ms = min(best_ms, (time.perf_counter() - start) * 1e3)
    return 2 * size**3 / (best_ms * 1e-3) / 1e12


def _cpu_linear():
    from ..backends.compiled import ops

    namespace = ops()
    return None if namespace is None else namespace.linear
