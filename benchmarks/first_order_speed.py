"""First-order speed of two source trees of this package, interleaved on one machine.

    python benchmarks/first_order_speed.py OLD_TREE NEW_TREE [--rounds 3]

Each tree is a checkout (e.g. ``git worktree add /tmp/old <commit>``) with the built
extension copied in (``cnnlstm_fast/_C*.so``). Every round runs one process per tree,
alternately, each timing (median of 30 after 3 warm-ups, in ms) a training step
(forward + backward) and an inference call of: a 2-layer bidirectional LSTM (T=100,
B=16, 64->128), a GRU (same shape), a small LSTM (T=20, B=4, 16->32) and 20 steps of an
LSTMCell loop with its backward, all on the cpu backend. What a change to the Python
around the kernels (argument handling, the autograd op) costs shows in the small ones.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import statistics, time, torch
import cnnlstm_fast as clf
torch.manual_seed(0)
def t(fn, n=30):
    for _ in range(3): fn()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); fn(); ts.append(time.perf_counter() - s)
    return statistics.median(ts) * 1e3
res = {}
for name, mod, shape in [
        ("lstm2bi", clf.LSTM(64, 128, num_layers=2, bidirectional=True, backend="cpu"), (100, 16, 64)),
        ("gru1", clf.GRU(64, 128, backend="cpu"), (100, 16, 64)),
        ("lstm_small", clf.LSTM(16, 32, backend="cpu"), (20, 4, 16))]:
    x = torch.randn(*shape, requires_grad=True)
    def train():
        mod(x)[0].sum().backward()
    def infer():
        with torch.no_grad():
            mod(x)
    res[name + "_train"], res[name + "_infer"] = t(train), t(infer)
cell, xc = clf.LSTMCell(32, 64, backend="cpu"), torch.randn(8, 32)
def cell_loop():
    h = c = torch.zeros(8, 64)
    for _ in range(20):
        h, c = cell(xc, (h, c))
    h.sum().backward()
res["cell20_train"] = t(cell_loop)
print(" ".join(f"{k}={v:.3f}" for k, v in res.items()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for label, tree in (("old", args.old), ("new", args.new)):
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip()
            print(label, out, flush=True)


if __name__ == "__main__":
    main()
