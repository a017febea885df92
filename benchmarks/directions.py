"""Bidirectional layers with their directions side by side against one after the other.

    python benchmarks/directions.py [--quick] [--json PATH]

Times whole bidirectional LSTM/GRU modules (the cpu backend) with the two directions of
each layer run side by side, each on its share of the threads (csrc/cpu/directions.cpp;
``cnnlstm_fast.backends.cpu.set_directions("side_by_side")``), against the same module
with the directions one after the other on all threads (the default), and torch.nn, in inference (no_grad) and training (forward + backward),
interleaved repetition by repetition (cnnlstm_fast.bench.timing.time_cpu), in one
process. ``side_by_side_speedup`` = one-after-the-other / side-by-side median; above 1
the new order is faster. The tuning record is not consulted (backend pinned to cpu).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import cnnlstm_fast as clf
from cnnlstm_fast import env
from cnnlstm_fast.backends import cpu as cpu_backend
from cnnlstm_fast.bench.timing import time_cpu

# (cell, layers, steps, batch, input, hidden)
CONFIGS = [(cell, layers, steps, batch, inputs, hidden)
           for cell in ("lstm", "gru")
           for layers, steps, inputs, hidden in ((1, 128, 64, 128), (2, 100, 256, 256))
           for batch in (1, 8, 16, 32, 64)]
QUICK = [("lstm", 1, 16, 8, 16, 32), ("gru", 2, 12, 4, 8, 16)]


def _step(model, x, training):
    if training:
        def run():
            model.zero_grad(set_to_none=True)
            y, _ = model(x)
            y.sum().backward()
    else:
        def run():
            with torch.no_grad():
                model(x)
    return run


def _ordered(order, fn):
    def run():
        with cpu_backend.use_directions(order):
            fn()
    return run


def measure(configs, reps: int, budget_s: float) -> list[dict]:
    rows = []
    for cell, layers, steps, batch, inputs, hidden in configs:
        torch.manual_seed(0)
        cls = {"lstm": "LSTM", "gru": "GRU"}[cell]
        theirs = getattr(torch.nn, cls)(inputs, hidden, num_layers=layers, bidirectional=True)
        ours = getattr(clf, cls)(inputs, hidden, num_layers=layers, bidirectional=True,
                                 backend="cpu")
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(steps, batch, inputs)
        for training in (False, True):
            times = time_cpu({
                "torch.nn": _step(theirs, x, training),
                "one_after_the_other": _ordered("one_after_the_other", _step(ours, x, training)),
                "side_by_side": _ordered("side_by_side", _step(ours, x, training)),
            }, reps=reps, budget_s=budget_s, warmup=2)
            med = {name: t["median_ms"] for name, t in times.items()}
            row = {"cell": cell, "layers": layers, "steps": steps, "batch": batch,
                   "input": inputs, "hidden": hidden,
                   "mode": "training" if training else "inference", "times": times,
                   "side_by_side_speedup": med["one_after_the_other"] / med["side_by_side"],
                   "vs_torch_nn": med["torch.nn"] / med["side_by_side"]}
            rows.append(row)
            print(f"{cell} L{layers} T{steps} B{batch} I{inputs} H{hidden} {row['mode']:9s} "
                  f"torch.nn {med['torch.nn']:8.2f} ms  one after the other "
                  f"{med['one_after_the_other']:8.2f} ms  side by side {med['side_by_side']:8.2f}"
                  f" ms  side-by-side gain {row['side_by_side_speedup']:.2f}x  vs torch.nn "
                  f"{row['vs_torch_nn']:.2f}x", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two tiny shapes (a smoke test)")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per row, at most")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    rows = measure(QUICK if args.quick else CONFIGS, 3 if args.quick else args.reps,
                   0.5 if args.quick else args.budget)
    speedups = [r["side_by_side_speedup"] for r in rows]
    geomean = torch.tensor(speedups).log().mean().exp().item()
    print(f"side-by-side gain: geomean {geomean:.3f}x, min {min(speedups):.2f}x, "
          f"max {max(speedups):.2f}x over {len(rows)} rows")
    report = {"benchmark": "directions", "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(),
              "environment": env.collect(), "geomean_side_by_side_speedup": geomean,
              "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
