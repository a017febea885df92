"""Would running a bidirectional layer's two directions side by side pay on this CPU?

    python benchmarks/direction_concurrency.py

Times the cpu backend's recurrence ops for two directions one after the other with all
of torch's threads (what the module does today) against the two at once, one thread
each (two Python threads; the ops release the GIL), for the inference op
(recurrence_forward_from_input: projection + recurrence) and the training forward
(recurrence_forward saving activations). The ratio is the most a scheduler that runs
directions concurrently could gain over today's order on this machine, before its own
costs. Median of 15 after 3 warm-ups, ms.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from cnnlstm_fast.backends import compiled

SHAPES = [(64, 16, 512, 256), (128, 64, 64, 128), (128, 8, 64, 128), (25, 32, 512, 256)]


def bench(fn, n=15):
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def direction_args(cell, steps, batch, inputs, hidden, reverse, training):
    gates = {"lstm": 4, "gru": 3}[cell]
    h0 = torch.zeros(batch, hidden)
    c0 = torch.zeros(batch, hidden) if cell == "lstm" else None
    w_hh = torch.randn(gates * hidden, hidden) * 0.1
    b_hn = torch.zeros(hidden) if cell == "gru" else None
    if training:
        gx = torch.randn(steps, batch, gates * hidden)
        return (cell, gx, h0, c0, w_hh, None, b_hn, None, reverse, True)
    x = torch.randn(steps, batch, inputs)
    w_ih = torch.randn(gates * hidden, inputs) * 0.1
    return (cell, x, w_ih, torch.zeros(gates * hidden), h0, c0, w_hh, None, b_hn, reverse)


def main() -> None:
    ops = compiled.ops()
    threads = torch.get_num_threads()
    print(f"torch threads {threads}")
    for training in (False, True):
        op = ops.recurrence_forward if training else ops.recurrence_forward_from_input
        for cell in ("lstm", "gru"):
            for steps, batch, inputs, hidden in SHAPES:
                fwd = direction_args(cell, steps, batch, inputs, hidden, False, training)
                rev = direction_args(cell, steps, batch, inputs, hidden, True, training)
                torch.set_num_threads(threads)
                one_after_other = bench(lambda: (op(*fwd), op(*rev)))
                torch.set_num_threads(1)

                def side_by_side():
                    other = threading.Thread(target=op, args=rev)
                    other.start()
                    op(*fwd)
                    other.join()

                together = bench(side_by_side)
                torch.set_num_threads(threads)
                print(f"{'training' if training else 'inference'} {cell} T{steps} B{batch} "
                      f"I{inputs} H{hidden}: one after the other ({threads} threads) "
                      f"{one_after_other:.2f} ms, side by side (1 thread each) {together:.2f} ms, "
                      f"ratio {one_after_other / together:.2f}")


if __name__ == "__main__":
    main()
