"""Does ``auto`` keep its promise on this machine: never slower than torch.nn?

Draws layer configurations at random (seeded; shapes no suite names: cell, batch,
steps, input and hidden sizes, layers, directions, packed input with random lengths,
inference or a training step), builds each as a torch.nn layer and as ours with the same
weights under backend ``auto``, and times the two alternately in this process (``--reps``
pairs, medians). Each line says which backend(s) ``auto`` took for the layer's calls
(from the ``cnnlstm_fast.backends`` log) and ours/torch.nn as a speedup; the summary
lists the rows where ``auto`` took something other than torch.nn and measured below
``--flag`` (default 0.95x): a rule of ``cnnlstm_fast/backends/rules.json`` that does not
hold here, or noise; rerun those rows (``--only``) before believing either.

    python benchmarks/auto_audit.py [--configs 40] [--seed 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time

import torch

import cnnlstm_fast as clf
from cnnlstm_fast import env


def draw(rng: random.Random) -> dict:
    cell = rng.choice(["lstm", "gru"])
    return {
        "cell": cell,
        "batch": rng.choice([1, 2, 3, 5, 8, 13, 16, 24, 32, 48, 64, 100, 128]),
        "steps": rng.choice([8, 12, 20, 33, 50, 64, 100, 128, 200]),
        "input_size": rng.choice([1, 9, 40, 64, 100, 128, 256, 300, 512]),
        "hidden_size": rng.choice([32, 50, 64, 100, 128, 200, 256, 384, 512]),
        "layers": rng.choice([1, 1, 2, 3]),
        "directions": rng.choice([1, 2]),
        "packed": rng.random() < 0.25,
        "batch_first": rng.random() < 0.5,
        "mode": rng.choice(["inference", "training"]),
    }


def name(cfg: dict) -> str:
    return (f"{cfg['cell']} B{cfg['batch']} T{cfg['steps']} I{cfg['input_size']} "
            f"H{cfg['hidden_size']} L{cfg['layers']} D{cfg['directions']}"
            f"{' packed' if cfg['packed'] else ''}{' bf' if cfg['batch_first'] else ''} "
            f"{cfg['mode']}")


class _Choices(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.backends: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        backend = getattr(record, "backend", None)
        if backend is not None and backend not in self.backends:
            self.backends.append(backend)


def build(cfg: dict, seed: int):
    torch.manual_seed(seed)
    kinds = {"lstm": (torch.nn.LSTM, clf.LSTM), "gru": (torch.nn.GRU, clf.GRU)}[cfg["cell"]]
    kwargs = dict(num_layers=cfg["layers"], bidirectional=cfg["directions"] == 2,
                  batch_first=cfg["batch_first"])
    theirs = kinds[0](cfg["input_size"], cfg["hidden_size"], **kwargs)
    ours = kinds[1](cfg["input_size"], cfg["hidden_size"], **kwargs)
    ours.load_state_dict(theirs.state_dict())
    shape = ((cfg["batch"], cfg["steps"]) if cfg["batch_first"] else (cfg["steps"], cfg["batch"]))
    x = torch.randn(*shape, cfg["input_size"])
    if cfg["packed"]:
        lengths = torch.randint(1, cfg["steps"] + 1, (cfg["batch"],))
        lengths[0] = cfg["steps"]
        x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=cfg["batch_first"],
                                                    enforce_sorted=False)
    return theirs, ours, x


def step(module, x, training: bool):
    if not training:
        with torch.inference_mode():
            module(x)
        return
    out, _ = module(x)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    data.sum().backward()


def measure(cfg: dict, seed: int, reps: int) -> dict:
    theirs, ours, x = build(cfg, seed)
    training = cfg["mode"] == "training"
    choices = _Choices()
    logger = logging.getLogger("cnnlstm_fast.backends")
    level = logger.level
    logger.addHandler(choices)
    logger.setLevel(logging.DEBUG)
    try:
        step(ours, x, training)
    finally:  # a logger left at DEBUG would format a record at every timed call
        logger.removeHandler(choices)
        logger.setLevel(level)
    for _ in range(2):
        step(theirs, x, training)
        step(ours, x, training)
    # enough calls per sample for ~20 ms, so the timer's resolution does not matter
    start = time.perf_counter()
    step(theirs, x, training)
    calls = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
    times = {"torch.nn": [], "auto": []}
    for _ in range(reps):
        for label, module in (("torch.nn", theirs), ("auto", ours)):
            start = time.perf_counter()
            for _ in range(calls):
                step(module, x, training)
            times[label].append((time.perf_counter() - start) / calls)
    torch_ms = statistics.median(times["torch.nn"]) * 1e3
    auto_ms = statistics.median(times["auto"]) * 1e3
    return {**cfg, "name": name(cfg), "picked": "+".join(choices.backends) or "torch",
            "torch_ms": torch_ms, "auto_ms": auto_ms, "speedup": torch_ms / auto_ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=9, help="alternating pairs per config")
    parser.add_argument("--flag", type=float, default=0.95)
    parser.add_argument("--only", type=int, nargs="*", help="config indices to run")
    parser.add_argument("--json", help="write the rows and the environment here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    configs = [draw(rng) for _ in range(args.configs)]
    rows = []
    for index, cfg in enumerate(configs):
        if args.only and index not in args.only:
            continue
        row = {"index": index, **measure(cfg, args.seed * 1000 + index, args.reps)}
        rows.append(row)
        print(f"{index:3d} {row['name']:58s} {row['picked']:10s} torch.nn {row['torch_ms']:8.2f} ms"
              f"  auto {row['auto_ms']:8.2f} ms  {row['speedup']:.2f}x", flush=True)
    flagged = [r for r in rows if r["picked"] != "torch" and r["speedup"] < args.flag]
    mine = [r["speedup"] for r in rows if r["picked"] != "torch"]
    print(f"auto took ours in {len(mine)} of {len(rows)} configs"
          + (f": {min(mine):.2f}x to {max(mine):.2f}x, median {statistics.median(mine):.2f}x"
             if mine else ""))
    for r in flagged:
        print(f"below {args.flag}x with {r['picked']}: {r['index']} {r['name']} {r['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "environment": env.collect(), "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
