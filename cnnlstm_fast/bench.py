"""Benchmark of our LSTM/GRU per backend against torch.nn: ``python -m cnnlstm_fast.bench``.

Providers are ``torch.nn`` (the baseline: plain torch.nn.LSTM/GRU) and every available
cnnlstm_fast backend, all with the same weights and inputs, timed in the same run.
CUDA: ``triton.testing.do_bench`` (CUDA events, median and p20/p80 after warm-up).
CPU: providers interleaved across repetitions, ``time.perf_counter``, median and
p20/p80. FLOPs count the matmuls only: LSTM forward 8*T*B*H*(I+H) per layer (GRU 6,
RNN 2), forward+backward 3x that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import cnnlstm_fast

from . import env

BASELINE = "torch.nn"
MODES = ("forward", "forward_backward")
CELLS = {"lstm": (nn.LSTM, cnnlstm_fast.LSTM, 4), "gru": (nn.GRU, cnnlstm_fast.GRU, 3)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Per device: batch, steps, input size, hidden size, dtypes. CPU is small enough for
#: the pure-PyTorch ``reference`` backend to finish in seconds.
DEFAULTS = {
    "cpu": dict(batch=16, steps=32, input_size=128, hidden_size=128, dtypes="float32"),
    "cuda": dict(batch=16, steps=1024, input_size=768, hidden_size=768, dtypes="bfloat16,float16"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    cell: str
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    layers: int
    dtype: str
    mode: str
    device: str

    @property
    def flops(self) -> int:
        """Matmul FLOPs of all layers (input projection + recurrence)."""
        gates = CELLS[self.cell][2]
        per_unit = 2 * gates * self.steps * self.batch * self.hidden_size
        total = sum(
            per_unit * ((self.input_size if layer == 0 else self.hidden_size) + self.hidden_size)
            for layer in range(self.layers)
        )
        return total * (3 if self.mode == "forward_backward" else 1)


def make_configs(args: argparse.Namespace) -> list[Config]:
    return [
        Config(cell, args.batch, args.steps, args.input_size, args.hidden_size, args.layers,
               dtype, mode, args.device)
        for cell in args.cells
        for dtype in args.dtypes
        for mode in args.modes
    ]


def make_providers(requested: list[str] | None) -> list[str]:
    """``torch.nn`` first, then the requested (default: every available) backends."""
    available = cnnlstm_fast.available_backends()
    if requested is None:
        return [BASELINE, *available]
    unknown = [p for p in requested if p != BASELINE and p not in available]
    if unknown:
        raise ValueError(
            f"providers must be {BASELINE!r} or available backends {available}, got {unknown}"
        )
    return [BASELINE] + [p for p in requested if p != BASELINE]


def build_modules(cfg: Config, providers: list[str]) -> dict[str, nn.Module]:
    """One module per provider, all with the baseline's weights."""
    torch_cls, our_cls, _ = CELLS[cfg.cell]
    kwargs = dict(num_layers=cfg.layers, device=cfg.device, dtype=DTYPES[cfg.dtype])
    baseline = torch_cls(cfg.input_size, cfg.hidden_size, **kwargs)
    modules = {}
    for provider in providers:
        if provider == BASELINE:
            modules[provider] = baseline
        else:
            module = our_cls(cfg.input_size, cfg.hidden_size, backend=provider, **kwargs)
            module.load_state_dict(baseline.state_dict())
            modules[provider] = module
    return modules


def make_step(cfg: Config, module: nn.Module) -> Callable[[], None]:
    """A closure running one forward (no_grad) or forward+backward on fixed random data."""
    dtype = DTYPES[cfg.dtype]
    x = torch.randn(cfg.steps, cfg.batch, cfg.input_size, device=cfg.device, dtype=dtype)
    if cfg.mode == "forward":

        def step():
            with torch.no_grad():
                module(x)

        return step
    x.requires_grad_(True)
    dy = torch.randn(cfg.steps, cfg.batch, cfg.hidden_size, device=cfg.device, dtype=dtype)
    inputs = [x, *module.parameters()]

    def step():
        y, _ = module(x)
        torch.autograd.grad(y, inputs, dy)

    return step


def _summary(times_ms: list[float]) -> dict[str, float]:
    if len(times_ms) == 1:
        return {"median_ms": times_ms[0], "p20_ms": times_ms[0], "p80_ms": times_ms[0]}
    cuts = statistics.quantiles(times_ms, n=5, method="inclusive")
    return {"median_ms": statistics.median(times_ms), "p20_ms": cuts[0], "p80_ms": cuts[3]}


def time_cpu(steps: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict:
    """Interleaved: each repetition runs every provider once, in rotating order."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summary(t) for name, t in times.items()}


def time_cuda(steps: dict[str, Callable[[], None]], reps: int) -> dict:
    """CUDA events via triton.testing.do_bench; ``reps`` is its time budget in ms per provider."""
    from triton.testing import do_bench

    result = {}
    for name, step in steps.items():
        median, p20, p80 = do_bench(step, warmup=25, rep=reps, quantiles=[0.5, 0.2, 0.8])
        result[name] = {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    return result


def run_config(cfg: Config, providers: list[str], reps: int) -> list[dict]:
    """Times every provider on ``cfg``; one result row per provider."""
    modules = build_modules(cfg, providers)
    steps = {name: make_step(cfg, module) for name, module in modules.items()}
    timer = time_cuda if cfg.device.startswith("cuda") else time_cpu
    timings = timer(steps, reps)
    baseline_ms = timings[BASELINE]["median_ms"]
    rows = []
    for name in providers:
        t = timings[name]
        rows.append(
            {
                **dataclasses.asdict(cfg),
                "provider": name,
                **t,
                "speedup": baseline_ms / t["median_ms"],
                "us_per_step": t["median_ms"] * 1e3 / cfg.steps,
                "gflops": cfg.flops / (t["median_ms"] * 1e-3) / 1e9,
            }
        )
    return rows


COLUMNS = (
    ("cell", "cell", "{}"), ("B", "batch", "{}"), ("T", "steps", "{}"),
    ("I", "input_size", "{}"), ("H", "hidden_size", "{}"), ("dtype", "dtype", "{}"),
    ("mode", "mode", "{}"), ("provider", "provider", "{}"), ("median ms", "median_ms", "{:.3f}"),
    ("p20", "p20_ms", "{:.3f}"), ("p80", "p80_ms", "{:.3f}"), ("speedup", "speedup", "{:.2f}x"),
    ("us/step", "us_per_step", "{:.1f}"), ("GFLOP/s", "gflops", "{:.1f}"),
)


def print_table(rows: list[dict], title: str) -> None:
    cells = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]
        print(title)
        print("  ".join(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths)))
        for c in cells:
            print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
        return
    table = Table(title=title)
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for c in cells:
        table.add_row(*c)
    console = Console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze into 80 columns
        console = Console(width=200)
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cnnlstm_fast.bench",
        description="Time cnnlstm_fast LSTM/GRU per backend against torch.nn in one run.",
    )
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", dest="dtypes", type=split, default=None,
                        help="comma list of float32,float16,bfloat16 (default per device)")
    parser.add_argument("--cells", type=split, default=list(CELLS), help="comma list: lstm,gru")
    parser.add_argument("--modes", type=split, default=list(MODES),
                        help="comma list: forward,forward_backward")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--providers", type=split, default=None,
                        help=f"comma list of {BASELINE} and backends (default: all available)")
    parser.add_argument("--reps", type=int, default=None,
                        help="CPU: timed repetitions per provider (default 20); "
                             "CUDA: do_bench time budget in ms (default 200)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--json", metavar="PATH", help="write results and environment here")
    args = parser.parse_args(argv)

    device_type = torch.device(args.device).type
    if device_type not in DEFAULTS:
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    for key, value in DEFAULTS[device_type].items():
        if getattr(args, key) is None:
            setattr(args, key, split(value) if key == "dtypes" else value)
    if args.reps is None:
        args.reps = 200 if device_type == "cuda" else 20
    for option, values, allowed in (("--dtype", args.dtypes, DTYPES), ("--cells", args.cells, CELLS),
                                    ("--modes", args.modes, MODES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"{option} must be a comma list of {list(allowed)}, got {values}")
    for option in ("batch", "steps", "input_size", "hidden_size", "layers", "reps", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    try:
        args.providers = make_providers(args.providers)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for cfg in make_configs(args):
        rows += run_config(cfg, args.providers, args.reps)
    device_name = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda") else env.cpu_name()
    )
    print_table(rows, f"cnnlstm_fast {cnnlstm_fast.__version__} on {device_name}, "
                      f"torch {torch.__version__}")
    if args.json:
        report = {
            "device": device_name,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "environment": env.collect(),
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
