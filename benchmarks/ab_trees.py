"""Whole models (the models suite's CPU shapes) swapped with backend auto, timed against
torch.nn in the same process, for two checkouts of this repository: which of two
versions of the code runs a model faster, on one machine, in one run.

Each (model, cell, mode, tree) runs in a fresh child process with that tree first on
``sys.path`` (its own built extension): build the model and its input, swap a copy,
warm both up, then time torch.nn and the swapped copy alternately (``--reps`` pairs),
and report both medians. Trees alternate within each configuration, ``--rounds`` times,
so drift hits both alike. A tree's speedup is torch.nn's median over the swapped
model's in the same process; new/old is the ratio of the two trees' median speedups.

    python benchmarks/ab_trees.py --old /path/to/old/checkout --new . [--modes inference]
        [--json PATH]

Build each tree's extension first (``python setup.py build_ext --inplace`` there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import copy, statistics, sys, time, types, torch
tree, spec, mode, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, tree)
import cnnlstm_fast as clf
assert clf.__file__.startswith(tree), (clf.__file__, tree)
from cnnlstm_fast.bench import zoo
fields = dict(kv.split("=") for kv in spec.split(","))
cfg = types.SimpleNamespace(**{"device": "cpu", "directions": 1, **{
    k: (v if k in ("model", "cell") else int(v)) for k, v in fields.items()}})
torch.manual_seed(0)
theirs = zoo.build(cfg, torch.float32)
ours = clf.swap(copy.deepcopy(theirs), backend="auto")
x = zoo.example_input(cfg, torch.float32)
train = mode == "training"

def step(model):
    model.train(train)
    if train:
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
    else:
        with torch.no_grad():
            model(x)

times = {"torch": [], "auto": []}
for _ in range(3):
    step(theirs); step(ours)
for _ in range(reps):
    for name, model in (("torch", theirs), ("auto", ours)):
        start = time.perf_counter()
        step(model)
        times[name].append(time.perf_counter() - start)
print(statistics.median(times["torch"]) * 1e3, statistics.median(times["auto"]) * 1e3)
"""


def configs(cells):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from cnnlstm_fast.bench import zoo

    for shape in zoo.SHAPES["cpu"]:
        for cell in cells:
            yield ",".join(f"{k}={v}" for k, v in {**shape, "cell": cell}.items())


def measure(tree: str, spec: str, mode: str, reps: int) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", CHILD, tree, spec, mode, str(reps)], check=True,
                         capture_output=True, text=True, env=env, cwd="/").stdout.split()
    return float(out[0]), float(out[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the baseline checkout (built)")
    parser.add_argument("--new", required=True, help="the checkout under test (built)")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--cells", default="lstm,gru")
    parser.add_argument("--reps", type=int, default=15, help="timed pairs per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per tree and row")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args(argv)
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    rows = []
    print(f"{'configuration':80s} {'mode':9s} {'old x':>6s} {'new x':>6s} {'new/old':>7s}")
    for spec in configs(args.cells.split(",")):
        for mode in args.modes.split(","):
            runs = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    runs[name].append(measure(tree, spec, mode, args.reps))
            speedup = {name: statistics.median(t / a for t, a in r) for name, r in runs.items()}
            rows.append(dict(config=spec, mode=mode, runs_ms=runs,
                             speedup_old=speedup["old"], speedup_new=speedup["new"],
                             new_over_old=speedup["new"] / speedup["old"]))
            print(f"{spec:80s} {mode:9s} {speedup['old']:6.2f} {speedup['new']:6.2f} "
                  f"{speedup['new'] / speedup['old']:7.2f}", flush=True)
    ratios = [r["new_over_old"] for r in rows]
    geomean = statistics.geometric_mean(ratios)
    print(f"new/old geomean {geomean:.3f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": "speedup over torch.nn in the same process (median over "
                               "rounds), per tree; runs_ms: (torch.nn, swapped) medians "
                               "per process", "trees": trees, "argv": sys.argv[1:],
                       "threads": os.cpu_count(), "new_over_old_geomean": geomean,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
