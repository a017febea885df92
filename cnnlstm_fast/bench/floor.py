"""The per-step floor of a persistent recurrence on this CUDA device: an estimate, measured.

A persistent kernel that keeps W_hh on chip and exchanges h through L2 with one grid
barrier per step (the cuda and triton backends' design, and cuDNN's persistent kernel)
pays at least, per step, for the exchange and for the product. Estimated as:

- ``exchange_us``: what ``cnnlstm_fast::step_floor`` (``csrc/cuda/floor.cu``) takes per
  step: one block of 512 threads per SM reads the whole h of the step (batch x hidden in
  the layer's dtype) from L2 with 16-byte loads, writes its slice of the next h and
  meets the others at the tensor-core kernel's grid barrier, over ``steps`` steps. One
  implementation of the exchange, lean but not a proven lower bound (the float32
  CUDA-core kernel meets at cooperative groups' grid.sync instead);
- ``matmul_us``: the step's recurrent product (2 x batch x hidden x gates*hidden FLOPs)
  at the device's measured tensor-core (or fp32) matmul peak, as if the arithmetic of
  all SMs overlapped perfectly.

``us = exchange_us + matmul_us`` per layer, direction and step; a backward step needs at
least the same (its d_h = dG_h W_hh is the same product, and dh is exchanged the same
way), so forward+backward counts twice. Layers and directions add up, as our kernels
run them one after another (an implementation that ran both directions at once could
go below the sum).

``cluster_us`` (sm_90, where h fits in shared memory twice) is the other design's
exchange: one thread-block cluster of 16 blocks, each keeping h in its shared memory,
pushing its slice into every block's copy through distributed shared memory and meeting
at the cluster's hardware barrier (as the ``mma-cluster`` kernel does,
``experimental.set_kernels(cuda_forward="mma-cluster")``);
None where it cannot run. It is not part of ``us``: 16 SMs hold W_hh only for small
layers (the mma-cluster kernel's limits), and their product takes 132/16 times longer. Recorded too: ``barrier_us``, the
barrier alone, and ``exchange_nofence_us``, the exchange with the barrier without its
``__threadfence`` (``csrc/cuda/barrier.cuh``: by PTX's memory model the release at the
arrival makes it redundant; this measures what dropping it would gain). The bench adds ``floor_us_per_step`` and ``x_floor`` (measured / floor) to
its CUDA rows of bare layers.

    python -m cnnlstm_fast.bench.floor --json floor.json   # a table over batch, hidden, dtype
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from ..backends.base import GATES


#: Blocks of the cluster variant: sm_90's largest (non-portable) cluster.
CLUSTER_BLOCKS = 16


@dataclass(frozen=True)
class Floor:
    batch: int
    hidden: int
    gates: int
    dtype: str
    blocks: int
    steps: int
    barrier_us: float
    exchange_us: float
    matmul_us: float
    exchange_nofence_us: float
    cluster_us: float | None = None

    @property
    def us(self) -> float:
        """The floor of one step of one layer and direction (forward)."""
        return self.exchange_us + self.matmul_us


def unavailable_reason(device: str) -> str | None:
    """Why the floor cannot be measured on ``device``, or None."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "the floor is measured on a CUDA device only"
    from ..backends.compiled import ops

    if ops() is None or not hasattr(torch.ops.cnnlstm_fast, "step_floor"):
        return "the extension was built without nvcc (no cnnlstm_fast::step_floor)"
    return None


def _time_us_per_step(run, steps: int) -> float:
    from triton.testing import do_bench

    return do_bench(run, warmup=10, rep=50, return_mode="median") * 1e3 / steps


def _runner(batch: int, hidden: int, dtype: torch.dtype, dev: torch.device, steps: int):
    """run(blocks, exchange, fence=True, cluster=False): one launch of the floor kernel on
    fresh buffers of this shape (h from zeros, the barrier counter zeroed)."""
    stride = -(-batch * hidden // 8) * 8
    h = torch.zeros(2, stride, device=dev, dtype=dtype)
    counter = torch.zeros(1, device=dev, dtype=torch.int32)

    def run(blocks: int, exchange: bool, fence: bool = True, cluster: bool = False):
        counter.zero_()
        torch.ops.cnnlstm_fast.step_floor(h, counter, steps, batch, hidden, blocks, exchange,
                                          fence, cluster)

    return run


@functools.lru_cache(maxsize=None)
def _cluster_us(batch: int, hidden: int, dtype: torch.dtype, device: str,
                steps: int) -> float | None:
    """The cluster variant's exchange at this shape (it does not depend on the grid the
    other timings use, so it is timed once), or None where it cannot run."""
    dev = torch.device(device)
    if torch.cuda.get_device_capability(dev)[0] < 9:
        return None
    run = _runner(batch, hidden, dtype, dev, steps)
    try:
        run(CLUSTER_BLOCKS, True, cluster=True)
    except RuntimeError:  # h does not fit twice in shared memory, or no such cluster
        return None
    return _time_us_per_step(lambda: run(CLUSTER_BLOCKS, True, cluster=True), steps)


@functools.lru_cache(maxsize=None)
def measure(batch: int, hidden: int, gates: int, dtype: torch.dtype, device: str,
            peak_tflops: float, steps: int = 1024, blocks: int | None = None) -> Floor:
    """The floor of one step at this shape (cached per process). ``blocks``: the grid
    (default one block per SM, at most what can be co-resident)."""
    why = unavailable_reason(device)
    if why is not None:
        raise RuntimeError(why)
    ops = torch.ops.cnnlstm_fast
    dev = torch.device(device)
    most = ops.step_floor_max_blocks(torch.empty(0, device=dev, dtype=dtype))
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    grid = min(blocks or sms, most)
    run = _runner(batch, hidden, dtype, dev, steps)
    barrier = _time_us_per_step(lambda: run(grid, False), steps)
    exchange = _time_us_per_step(lambda: run(grid, True), steps)
    nofence = _time_us_per_step(lambda: run(grid, True, fence=False), steps)
    cluster = _cluster_us(batch, hidden, dtype, device, steps)
    matmul = 2 * batch * hidden * gates * hidden / (peak_tflops * 1e12) * 1e6
    return Floor(batch, hidden, gates, str(dtype).removeprefix("torch."), grid, steps,
                 barrier, exchange, matmul, nofence, cluster)


def row_floor(cfg, peak_tflops: float) -> tuple[float | None, str | None]:
    """(floor in us per step of the bench config ``cfg``, None) or (None, why not): the
    step floor times layers x directions, twice for forward+backward. Bare layers on
    CUDA only (a model's or a cell loop's time is not a recurrence's)."""
    if cfg.model:
        return None, "models and cell loops have no recurrence floor"
    why = unavailable_reason(cfg.device)
    if why is not None:
        return None, why
    dtype = getattr(torch, cfg.dtype)
    try:
        floor = measure(cfg.batch, cfg.hidden_size, GATES[cfg.cell], dtype, cfg.device,
                        peak_tflops)
    except Exception as e:  # an extra column: the suite's timings stand without it
        return None, f"measuring the floor failed: {type(e).__name__}: {e}"
    passes = 2 if cfg.mode == "forward_backward" else 1
    return floor.us * cfg.layers * cfg.directions * passes, None


def main(argv: list[str] | None = None) -> int:
    from .timing import matmul_peak_tflops

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512, 768, 1024, 2048])
    parser.add_argument("--dtype", nargs="+", default=["float16", "float32"])
    parser.add_argument("--cell", default="lstm", choices=sorted(GATES))
    parser.add_argument("--blocks", type=int, nargs="+", default=[0],
                        help="grid sizes to measure (0: one block per SM)")
    parser.add_argument("--steps", type=int, default=1024)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    why = unavailable_reason(args.device)
    if why is not None:
        print(f"no floor: {why}", file=sys.stderr)
        return 2
    from .. import env

    rows = []
    print(f"per-step floor on {torch.cuda.get_device_name(args.device)} ({args.cell}, "
          f"{args.steps} steps; us per step)")
    columns = ("dtype", "B", "H", "blocks", "barrier", "exchange", "no fence", "matmul", "floor",
               "cluster")
    print(" ".join(f"{c:>9}" for c in columns), flush=True)
    shapes = [(d, b, h, k) for d in args.dtype for b in args.batch for h in args.hidden
              for k in args.blocks]

    def write(complete: bool) -> None:  # after every row: a run cut short keeps its rows
        report = {"device": torch.cuda.get_device_name(args.device),
                  "argv": list(sys.argv[1:] if argv is None else argv), "complete": complete,
                  "environment": environment, "results": rows}
        partial = f"{args.json}.partial"
        with open(partial, "w") as out:
            out.write(json.dumps(report, indent=2) + "\n")
        os.replace(partial, args.json)  # never a half-written file

    environment = env.collect() if args.json else None
    peaks = {}
    for dtype_name, batch, hidden, blocks in shapes:
        dtype = getattr(torch, dtype_name)
        if dtype_name not in peaks:
            peaks[dtype_name] = matmul_peak_tflops(args.device, dtype)
        f = measure(batch, hidden, GATES[args.cell], dtype, args.device, peaks[dtype_name],
                    args.steps, blocks or None)
        rows.append({**asdict(f), "us": f.us, "peak_tflops": peaks[dtype_name]})
        cells = (dtype_name, batch, hidden, f.blocks, f"{f.barrier_us:.2f}",
                 f"{f.exchange_us:.2f}", f"{f.exchange_nofence_us:.2f}", f"{f.matmul_us:.3f}",
                 f"{f.us:.2f}", "-" if f.cluster_us is None else f"{f.cluster_us:.2f}")
        print(" ".join(f"{c:>9}" for c in cells), flush=True)
        if args.json:
            write(len(rows) == len(shapes))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
