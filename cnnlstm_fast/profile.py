"""Where the time of a recurrent layer or model goes: ``python -m cnnlstm_fast.profile``.

Runs torch.profiler over a few iterations after warm-up and prints a kernel-level
table (on CUDA the GPU kernels, on CPU the operators): self time and share of the
total, launches per time step, achieved FLOP rate (torch.profiler's per-op FLOP
count) against the measured matmul peak. The whole run's achieved FLOP rate and
bandwidth (minimal bytes: the inputs and weights, read once) are set against the
measured peaks. Writes a Chrome trace (chrome://tracing, https://ui.perfetto.dev).
Every cnnlstm_fast module's forward is a ``cnnlstm_fast.<Class> <name>`` range in the
profile and, on CUDA, an NVTX range, so it shows in Nsight Systems.

    from cnnlstm_fast.profile import profile_model, profile_layer
    result = profile_model(model, (x,), backward=True, steps=x.shape[1], trace="trace.json")
    print(result.format())
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from . import nn as our_nn
from .bench import timing
from .bench.suites import DTYPES_TORCH, Config

OUR_PREFIX = "cnnlstm_fast"


@contextlib.contextmanager
def annotate(model: nn.Module):
    """Profiler range (and NVTX range on CUDA) around every cnnlstm_fast module's forward."""
    ours = tuple(getattr(our_nn, name) for name in our_nn.__all__)
    nvtx = torch.cuda.nvtx if torch.cuda.is_available() else None
    handles, open_ranges = [], []
    for name, module in model.named_modules():
        if not isinstance(module, ours):
            continue
        label = f"{OUR_PREFIX}.{type(module).__name__} {name or '(root)'}"

        def pre(_module, _args, label=label):
            scope = record_function(label)
            scope.__enter__()
            open_ranges.append(scope)
            if nvtx is not None:
                nvtx.range_push(label)

        def post(_module, _args, _out):
            if nvtx is not None:
                nvtx.range_pop()
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def bandwidth_peak_gbps(device: str, mib: int = 256) -> float:
    """The best rate of a large tensor copy (read + write), in GB/s."""
    src = torch.empty(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


@dataclasses.dataclass
class ProfileResult:
    rows: list[dict]            # per kernel/op: name, calls, self_ms, share, per_step, gflops, pct_peak
    ranges: list[dict]          # our module ranges: name, calls, total_ms
    iteration_ms: float         # wall time of one profiled iteration
    flops: int | None           # of one iteration, if known
    bytes: int                  # minimal bytes of one iteration: inputs and weights once
    peak_tflops: float
    peak_gbps: float
    device: str
    trace: str | None

    def format(self) -> str:
        lines = [f"{'name':<58} {'calls':>6} {'self ms':>9} {'share':>6} {'/step':>7} "
                 f"{'GFLOP/s':>8} {'%peak':>6}"]
        for r in self.rows:
            rate = "-" if r["gflops"] is None else f"{r['gflops']:.1f}"
            pct = "-" if r["gflops"] is None else f"{r['pct_peak']:.1f}"
            per_step = "-" if r["per_step"] is None else f"{r['per_step']:.2f}"
            lines.append(f"{r['name'][:58]:<58} {r['calls']:>6} {r['self_ms']:>9.3f} "
                         f"{100 * r['share']:>5.1f}% {per_step:>7} {rate:>8} {pct:>6}")
        lines.append("our ranges (total time per iteration):")
        for r in self.ranges:
            lines.append(f"  {r['name']:<56} {r['calls']:>6} {r['total_ms']:>9.3f} ms")
        achieved = f"{self.bytes / (self.iteration_ms * 1e-3) / 1e9:.2f} GB/s of minimal traffic " \
                   f"({100 * self.bytes / (self.iteration_ms * 1e-3) / 1e9 / self.peak_gbps:.1f}% of " \
                   f"measured copy peak {self.peak_gbps:.1f} GB/s)"
        lines.append(f"iteration {self.iteration_ms:.3f} ms on {self.device}: {achieved}")
        if self.flops is not None:
            tflops = self.flops / (self.iteration_ms * 1e-3) / 1e12
            lines.append(f"  {tflops:.4f} TFLOP/s ({100 * tflops / self.peak_tflops:.1f}% of measured "
                         f"matmul peak {self.peak_tflops:.3f} TFLOP/s)")
        if self.trace:
            lines.append(f"Chrome trace: {self.trace}")
        return "\n".join(lines)


def profile_model(model: nn.Module, inputs: tuple, *, backward: bool = False,
                  steps: int | None = None, flops: int | None = None, warmup: int = 2,
                  iters: int = 3, trace: str | None = None, row_limit: int = 25) -> ProfileResult:
    """Profiles ``model(*inputs)`` (and a backward of the output's sum if ``backward``).
    ``steps`` (time steps per call) gives launches per step; ``flops`` one iteration's
    FLOPs, if known, for the achieved rate of the whole iteration."""
    device = str(next(model.parameters()).device)
    cuda = device.startswith("cuda")

    def iteration():
        with torch.set_grad_enabled(backward):
            out = model(*inputs)
            out = out[0] if isinstance(out, tuple) else out
            if backward:
                out.float().sum().backward()

    with annotate(model):
        for _ in range(warmup):
            iteration()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, with_flops=True, record_shapes=True) as prof:
            for _ in range(iters):
                iteration()
            if cuda:
                torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        timed = [(e, e.self_device_time_total) for e in events
                 if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        timed = [(e, e.self_cpu_time_total) for e in events
                 if e.self_cpu_time_total > 0 and not e.key.startswith(OUR_PREFIX + ".")]
    total_us = sum(t for _, t in timed)
    peak = timing.matmul_peak_tflops(device, next(model.parameters()).dtype)
    rows = []
    for e, t in sorted(timed, key=lambda item: -item[1])[:row_limit]:
        gflops = e.flops / (t * 1e-6) / 1e9 if e.flops else None
        rows.append({
            "name": e.key, "calls": e.count, "self_ms": t / 1e3 / iters, "share": t / total_us,
            "per_step": e.count / (iters * steps) if steps else None, "gflops": gflops,
            "pct_peak": None if gflops is None else 100 * gflops / (peak * 1e3),
        })
    ranges = [{"name": e.key, "calls": e.count // iters, "total_ms": e.cpu_time_total / 1e3 / iters}
              for e in events if e.key.startswith(OUR_PREFIX + ".")]
    tensors = list(inputs) + list(model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    if trace:
        prof.export_chrome_trace(trace)
    iteration_ms = total_us / 1e3 / iters  # sum of self times: the busy time of the device
    return ProfileResult(rows, ranges, iteration_ms, flops, nbytes, peak,
                         bandwidth_peak_gbps(device), device, trace)


def profile_layer(cell: str = "lstm", batch: int = 16, steps: int = 32, input_size: int = 128,
                  hidden_size: int = 128, layers: int = 1, directions: int = 1,
                  dtype: str = "float32", device: str = "cpu", backend: str = "auto",
                  mode: str = "forward", **kwargs) -> ProfileResult:
    """Profiles one cnnlstm_fast LSTM/GRU layer on random input (time-major)."""
    from . import GRU, LSTM

    cls = {"lstm": LSTM, "gru": GRU}[cell]
    module = cls(input_size, hidden_size, num_layers=layers, bidirectional=directions == 2,
                 device=device, dtype=DTYPES_TORCH[dtype], backend=backend)
    x = torch.randn(steps, batch, input_size, device=device, dtype=DTYPES_TORCH[dtype],
                    requires_grad=mode == "forward_backward")
    cfg = Config(cell, batch, steps, input_size, hidden_size, layers, directions, dtype, mode, device)
    return profile_model(module, (x,), backward=mode == "forward_backward", steps=steps,
                         flops=cfg.flops, **kwargs)


def main(argv: list[str] | None = None) -> ProfileResult:
    parser = argparse.ArgumentParser(prog="python -m cnnlstm_fast.profile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm", choices=["lstm", "gru"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--directions", type=int, default=1, choices=[1, 2])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES_TORCH))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--mode", default="forward", choices=["forward", "forward_backward"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="kernels/ops shown")
    parser.add_argument("--trace", default="cnnlstm_fast_trace.json", help="Chrome trace path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = profile_layer(args.cell, args.batch, args.steps, args.input_size, args.hidden_size,
                           args.layers, args.directions, args.dtype, args.device, args.backend,
                           args.mode, iters=args.iters, trace=args.trace, row_limit=args.rows)
    print(result.format())
    return result


if __name__ == "__main__":
    main()
