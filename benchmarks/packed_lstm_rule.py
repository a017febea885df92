"""Packed (unequal-length) LSTM on CPU: the cpu backend against torch.nn, interleaved.

    python benchmarks/packed_lstm_rule.py

torch.nn runs oneDNN's LSTM only for unpacked input or equal lengths; a packed batch of
unequal lengths takes ATen's own step loop, as every GRU does, so the LSTM rule measured
against oneDNN does not describe it. Lengths uniform in [T/4, T]; a 1-layer
bidirectional LSTM (I = H), batch 1-128, hidden 64-1024 (not both large); inference and
a training step (forward + backward). Batch 1 has one length: oneDNN runs it.
Median of 7 after 2 warm-ups, the two providers alternating; ms and the ratio.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import cnnlstm_fast as clf


def main() -> None:
    torch.manual_seed(0)
    steps = 64
    for hidden in (64, 256, 1024):
        for batch in (1, 2, 8, 64, 128):
            if hidden * batch > 64 * 1024:  # seconds a step: left out
                continue
            theirs = torch.nn.LSTM(hidden, hidden, bidirectional=True)
            ours = clf.LSTM(hidden, hidden, bidirectional=True, backend="cpu")
            ours.load_state_dict(theirs.state_dict())
            lengths = torch.randint(steps // 4, steps + 1, (batch,))
            lengths[0] = steps
            x = torch.randn(steps, batch, hidden)
            for training in (False, True):
                def step(module):
                    inp = pack_padded_sequence(x.requires_grad_(training), lengths,
                                               enforce_sorted=False)
                    with torch.set_grad_enabled(training):
                        out = module(inp)[0].data
                        if training:
                            out.sum().backward()
                times = {"torch.nn": [], "cpu": []}
                for _ in range(2):
                    step(theirs), step(ours)
                for _ in range(7):
                    for name, module in (("torch.nn", theirs), ("cpu", ours)):
                        start = time.perf_counter()
                        step(module)
                        times[name].append((time.perf_counter() - start) * 1e3)
                t, o = statistics.median(times["torch.nn"]), statistics.median(times["cpu"])
                print(f"B{batch} H{hidden} T{steps} {'training' if training else 'inference'}: "
                      f"torch.nn {t:.2f} ms, cpu {o:.2f} ms, {t / o:.2f}x", flush=True)


if __name__ == "__main__":
    main()
