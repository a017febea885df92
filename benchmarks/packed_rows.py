"""Packed input in training on the cpu backend: G_x, Y and the saved activations kept in
the PackedSequence's rows (``CpuBackend.packed_rows``, the default) against padding them
to (T, B, .) and packing back per layer and direction (the previous path, still what
the other backends do), in one process on the same binary, interleaved.

The model is the models suite's ``textrnn`` (token ids -> Embedding -> packed 2-layer
BiLSTM/BiGRU, lengths drawn from 8..T) at its CPU shape and a larger one; a training step
is forward, a squared-mean loss and backward, backend cpu for every layer.

    python benchmarks/packed_rows.py [--reps 12]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

import cnnlstm_fast as clf
from cnnlstm_fast.backends.cpu import CpuBackend
from cnnlstm_fast.bench import zoo

SHAPES = (dict(batch=32, steps=64, input_size=128, hidden_size=128),
          dict(batch=64, steps=128, input_size=128, hidden_size=256))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=12, help="timed steps per setting")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    for cell in ("lstm", "gru"):
        for shape in SHAPES:
            cfg = types.SimpleNamespace(model="textrnn", layers=2, directions=2, cell=cell,
                                        device="cpu", **shape)
            torch.manual_seed(0)
            model = clf.swap(zoo.build(cfg, torch.float32), backend="cpu")
            x = zoo.example_input(cfg, torch.float32)

            def step():
                model.zero_grad(set_to_none=True)
                model(x).square().mean().backward()

            times = {True: [], False: []}
            try:
                for flag in (True, False, True, False):  # warm-up, caches filled
                    CpuBackend.packed_rows = flag
                    step()
                for _ in range(args.reps):
                    for flag in (True, False):
                        CpuBackend.packed_rows = flag
                        start = time.perf_counter()
                        step()
                        times[flag].append(time.perf_counter() - start)
            finally:
                CpuBackend.packed_rows = True
            rows, padded = (statistics.median(times[f]) * 1e3 for f in (True, False))
            dims = " ".join(f"{k}={v}" for k, v in shape.items())
            print(f"textrnn-{cell} {dims}: packed rows {rows:.1f} ms, padded per layer "
                  f"{padded:.1f} ms, {padded / rows:.2f}x", flush=True)


if __name__ == "__main__":
    main()
