"""Times cnnlstm_fast::conv2seq_projection_backward alone (dX and dW of the first layer's
input projection read from the conv output's (B, C, T) layout) at the conv2seq suite's
shapes: median of 9 after one warm-up, ms.

    python benchmarks/conv2seq_backward_op.py

Run it at two commits (rebuilding the extension between) to compare implementations.
"""

from __future__ import annotations

import statistics
import time

import torch

from cnnlstm_fast.backends.compiled import ops

# (B, C, T, G, D): DeepConvLSTM B64 and B8, CRNN (H' reduced) C256 W100 and C512 W26,
# DeepSpeech2-like; G the gate width, D the directions
SHAPES = [(64, 64, 128, 512, 1), (8, 64, 128, 512, 1), (32, 256, 100, 1024, 2),
          (32, 512, 26, 1024, 2), (16, 1312, 400, 1536, 2)]


def main() -> None:
    ops()
    op = torch.ops.cnnlstm_fast.conv2seq_projection_backward
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}")
    for batch, channels, steps, gates, directions in SHAPES:
        seq = torch.randn(batch, channels, steps)
        w = torch.randn(directions * gates, channels)
        grads = [torch.randn(steps, batch, gates) for _ in range(directions)]
        op(grads, seq, w, True, True, None)
        times = []
        for _ in range(9):
            start = time.perf_counter()
            op(grads, seq, w, True, True, None)
            times.append(time.perf_counter() - start)
        print(f"B{batch} C{channels} T{steps} G{gates} D{directions}: "
              f"{statistics.median(times) * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
