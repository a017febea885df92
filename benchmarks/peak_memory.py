"""Peak memory of the whole-model suite's models on CPU: torch.nn layers against swapped.

Each (model, cell, mode, provider) runs in a fresh process: build the model and its
input, read the resident-set high-water mark (``ru_maxrss``), run four steps (forward,
or forward + backward + SGD step), and report how far the high-water mark rose (the
peak memory the steps need beyond the model and its input). ``torch`` keeps the
model's torch.nn layers; ``auto`` swaps them (``cnnlstm_fast.swap``, backend auto).
The cpu backend keeps freed large buffers in its block cache (alloc.h), which counts
as resident here, as it does for the user.

    python benchmarks/peak_memory.py [--repeats N] [--json PATH]

Prints one row per configuration: the median rise of each provider in MiB over
``--repeats`` fresh processes (the providers alternating), and the process peaks. One
process per provider moved by up to ~30 MiB between identical runs on the rows whose CNN
dominates (glibc's arenas and trim thresholds), hence the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from cnnlstm_fast import env

CHILD = r"""
import resource, sys, types, torch
import cnnlstm_fast as clf
from cnnlstm_fast.bench import zoo
spec, provider, mode = sys.argv[1], sys.argv[2], sys.argv[3]
fields = dict(kv.split("=") for kv in spec.split(","))
cfg = types.SimpleNamespace(**{"device": "cpu", "directions": 1, **{
    k: (v if k in ("model", "cell") else int(v)) for k, v in fields.items()}})
torch.manual_seed(0)
model = zoo.build(cfg, torch.float32)
if provider == "auto":
    clf.swap(model, backend="auto")
x = zoo.example_input(cfg, torch.float32)
train = mode == "training"
model.train(train)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)

def step():
    if train:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        out.float().square().mean().backward()
        opt.step()
    else:
        with torch.no_grad():
            model(x)

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(4):
    step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

# The tensors' peak: one more step under torch.profiler's memory profiling, which sees
# every allocation of c10's CPU allocator and of the cpu backend's block cache
# (csrc/cpu/alloc.cpp reports its blocks); the highest running sum of the allocations
# and frees is how far the step's live tensor memory rose above its start.
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
live = peak = 0
cpu = torch.autograd.DeviceType.CPU
for when, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                           if e.name() == "[memory]" and e.device_type() == cpu):
    live += nbytes
    peak = max(peak, live)
print((after - before) / 1024.0, after / 1024.0, peak / 2**20)
"""


def configs():
    from cnnlstm_fast.bench import zoo

    for shape in zoo.SHAPES["cpu"]:
        for cell in ("lstm", "gru"):
            fields = {k: v for k, v in shape.items()}
            fields["cell"] = cell
            yield ",".join(f"{k}={v}" for k, v in fields.items())


def measure(spec: str, provider: str, mode: str) -> tuple[float, float, float]:
    """(ru_maxrss rise MiB, process peak MiB, tensor peak MiB) of one fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, spec, provider, mode], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per provider and row (the median is reported)")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'configuration':72s} {'mode':9s} {'torch MiB':>9s} {'auto MiB':>9s} "
          f"{'total t/a':>15s} {'tensors t/a MiB':>17s}")
    for spec in configs():
        for mode in ("inference", "training"):
            runs = {"torch": [], "auto": []}
            for _ in range(args.repeats):
                for provider, got in runs.items():
                    got.append(measure(spec, provider, mode))
            (rise_t, total_t, live_t), (rise_a, total_a, live_a) = (
                tuple(statistics.median(run[i] for run in got) for i in range(3))
                for got in runs.values())
            rows.append(dict(config=spec, mode=mode, torch_rise_mib=rise_t, auto_rise_mib=rise_a,
                             torch_peak_mib=total_t, auto_peak_mib=total_a,
                             torch_tensor_peak_mib=live_t, auto_tensor_peak_mib=live_a,
                             torch_rises=[run[0] for run in runs["torch"]],
                             auto_rises=[run[0] for run in runs["auto"]],
                             torch_tensor_peaks=[run[2] for run in runs["torch"]],
                             auto_tensor_peaks=[run[2] for run in runs["auto"]]))
            print(f"{spec:72s} {mode:9s} {rise_t:9.1f} {rise_a:9.1f} "
                  f"{total_t:7.0f}/{total_a:<7.0f} {live_t:8.1f}/{live_a:<8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": "per provider, medians over "
                               f"{args.repeats} fresh processes each (every run listed): "
                               "the ru_maxrss rise over 4 steps from the built model and "
                               "input, the process peak, and the tensors' peak of a fifth "
                               "step (the highest running sum of torch.profiler's memory "
                               "events above the step's start: c10's CPU allocations and "
                               "the cpu backend's cached blocks as handed out, not what "
                               "its cache keeps)",
                       "environment": env.collect(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
