"""The ``cpu`` backend against torch.nn (oneDNN) on this machine's CPU.

    python benchmarks/bench_cpu.py [--threads 2] [--reps 15] [--dtype float32]

Same weights in both modules; the two are timed in interleaved repetitions (so load
from other processes hits both alike) and the median is reported, with GFLOP/s
against the measured fp32 GEMM peak (one large torch.mm). Forward FLOPs of one layer:
gates * 2 * T * B * H * (I + H) (LSTM 8, GRU 6, RNN 2); forward+backward about 3x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cnnlstm_fast as clf

CONFIGS = [
    # (cell, B, T, I, H)
    ("LSTM", 64, 128, 128, 256),
    ("GRU", 64, 128, 128, 256),
    ("LSTM", 1, 1000, 32, 128),
    ("GRU", 1, 1000, 32, 128),
]
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def gemm_peak_gflops(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def make_step(module, x, backward: bool):
    if not backward:
        def step():
            with torch.no_grad():
                module(x)
        return step

    def step():
        out, _ = module(x)
        out.sum().backward()
    return step


def bench(cell, batch, steps, inp, hidden, dtype, reps, backward):
    torch.manual_seed(0)
    base = getattr(torch.nn, cell)(inp, hidden, dtype=dtype)
    ours = getattr(clf, cell)(inp, hidden, dtype=dtype, backend="cpu")
    ours.load_state_dict(base.state_dict())
    x = torch.randn(steps, batch, inp, dtype=dtype, requires_grad=backward)
    fns = {"torch": make_step(base, x, backward), "cpu": make_step(ours, x, backward)}
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    peak = gemm_peak_gflops(dtype)
    print(f"threads={args.threads} dtype={args.dtype} reps={args.reps} (median, interleaved)")
    print(f"GEMM peak (2048^3 torch.mm): {peak:.1f} GFLOP/s")
    header = f"{'cell':5} {'B':>4} {'T':>5} {'I':>4} {'H':>4} {'mode':8} "
    header += f"{'torch ms':>9} {'cpu ms':>9} {'speedup':>8} {'us/step':>8} {'GFLOP/s':>8} {'%peak':>6}"
    print(header)
    for cell, batch, steps, inp, hidden in CONFIGS:
        for backward in (False, True):
            t = bench(cell, batch, steps, inp, hidden, dtype, args.reps, backward)
            flops = 2 * GATES[cell] * steps * batch * hidden * (inp + hidden) * (3 if backward else 1)
            rate = flops / t["cpu"] / 1e9
            print(
                f"{cell:5} {batch:4} {steps:5} {inp:4} {hidden:4} {'fwd+bwd' if backward else 'fwd':8} "
                f"{t['torch'] * 1e3:9.2f} {t['cpu'] * 1e3:9.2f} {t['torch'] / t['cpu']:7.2f}x "
                f"{t['cpu'] / steps * 1e6:8.1f} {rate:8.1f} {100 * rate / peak:5.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
