"""Benchmark suites: our layers against torch.nn and the alternatives, in one run.

    python -m cnnlstm_fast.bench [--suite quick|flashrnn|batch-sweep|hidden-sweep|seq-sweep|cnnlstm|models|conv2seq]
                                 [--config B=16,T=32,I=128,H=128] [--json PATH] [--csv PATH]
                                 [--plot DIR] [--compare OLD.json] ...

Providers (see ``providers.py``): torch.nn (the baseline, cuDNN/oneDNN), ``auto`` (our
layers as a user gets them without naming a backend; each row says what it picked),
each of our available backends, torch.compile of the ``reference`` recurrence and FlashRNN, all on
the same weights and random inputs. Timing (``timing.py``): warm-up, then CUDA events
via do_bench or interleaved CPU timers; median and p20/p80. FLOPs count the matmuls:
per LSTM layer and direction forward 8*T*B*H*(I+H) (GRU 6), forward+backward 3x;
models are counted by torch's FlopCounterMode. "% peak" is against a large torch.mm
measured in the same run. On CUDA, the rows of bare layers also carry the per-step
floor of a persistent recurrence measured on the device in the same run
(``floor.py``: ``floor_us_per_step``) and the ratio of the measured step to it
(``x_floor``).

Kernel settings hold for the run and are recorded in its environment:
``--cpu-gemm``/``--cpu-kernel`` (``cnnlstm_fast.backends.cpu``) and the GPU kernel pins
``--cuda-forward``/``--cuda-backward``/``--cuda-pdl``/``--triton-backward``
(``cnnlstm_fast.experimental.set_kernels``; an experimental value is refused unless
``CNNLSTM_FAST_EXPERIMENTAL=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

import cnnlstm_fast

from .. import env, experimental
from ..backends import cpu as cpu_backend
from . import providers as prov
from . import conv2seq, report, suites, timing
from .providers import AUTO, BASELINE, COMPILED, FLASHRNN, TUNED
from .suites import CELLS, MODES, SUITES, Config

__all__ = ["AUTO", "BASELINE", "CELLS", "COMPILED", "Config", "FLASHRNN", "MODES", "SUITES", "main", "run"]

#: Time budget per configuration for the timed CPU repetitions (all providers together).
CPU_BUDGET_S = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cnnlstm_fast.bench",
        description="Time cnnlstm_fast LSTM/GRU layers and CNN-LSTM models against torch.nn, "
                    "torch.compile and FlashRNN in one run.",
    )
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    parser.add_argument("--suite", default="quick", choices=SUITES,
                        help="named configuration set (default quick: seconds on any device)")
    parser.add_argument("--config", help="one custom shape instead of a suite: "
                        "B=16,T=32,I=128,H=128[,layers=2,directions=2]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", dest="dtypes", type=split, default=None,
                        help="comma list of float32,float16,bfloat16 (default: cuda bf16,fp16; cpu fp32)")
    parser.add_argument("--cells", type=split, default=list(CELLS), help="comma list: lstm,gru")
    parser.add_argument("--modes", type=split, default=list(MODES),
                        help="comma list: forward,forward_backward (models: a training step)")
    parser.add_argument("--providers", type=split, default=None,
                        help=f"comma list of {prov.known_providers()} (default: all but torch, "
                             "and torch.compile only on CUDA); torch.nn is always included")
    parser.add_argument("--limit", action="append", default=[], metavar="PROVIDER=STEPS",
                        help=f"skip PROVIDER above STEPS sequential steps (default {prov.LIMITS})")
    parser.add_argument("--reps", type=int, default=None,
                        help="CPU: most timed repetitions per provider (default 20, fewer to fit "
                             f"{CPU_BUDGET_S:.0f} s per config); CUDA: do_bench budget in ms (default 200)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's); 1 is steadier on a busy machine")
    parser.add_argument("--cpu-gemm", choices=cpu_backend.GEMMS, default=None,
                        help="the cpu backend's float32 GEMM for the run "
                             "(cnnlstm_fast.backends.cpu.set_gemm; recorded in the environment)")
    parser.add_argument("--cpu-kernel", choices=cpu_backend.KERNELS, default=None,
                        help="the cpu backend's time loop for the run "
                             "(cnnlstm_fast.backends.cpu.set_kernel; recorded in the environment)")
    # the GPU kernel pins (cnnlstm_fast.experimental.set_kernels): experimental values
    # need CNNLSTM_FAST_EXPERIMENTAL=1 (checked below: a run must time what it records)
    pins = experimental.SETTINGS
    parser.add_argument("--cuda-forward", choices=experimental.CUDA_FORWARD.verified
                        + experimental.CUDA_FORWARD.experimental, default=None,
                        help="pin the cuda forward kernel for the run "
                             "(cnnlstm_fast.experimental.set_kernels(cuda_forward=...); "
                             "recorded in the environment's cuda_settings)")
    parser.add_argument("--cuda-backward", choices=experimental.CUDA_BACKWARD.verified
                        + experimental.CUDA_BACKWARD.experimental, default=None,
                        help="pin the cuda backward kernel for the run (set_kernels("
                             "cuda_backward=...); recorded likewise)")
    parser.add_argument("--cuda-pdl", action="store_const", const=True, default=None,
                        help="launch the cuda per-step kernels with programmatic dependent "
                             "launch (set_kernels(cuda_pdl=True); recorded likewise)")
    parser.add_argument("--triton-backward", choices=experimental.TRITON_BACKWARD.verified
                        + experimental.TRITON_BACKWARD.experimental, default=None,
                        help="pin the triton backward for the run (set_kernels("
                             "triton_backward=...); recorded likewise)")
    parser.add_argument("--json", metavar="PATH", help="write rows, skips and environment as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    parser.add_argument("--plot", metavar="DIR", help="write speedup charts (PNG) of the sweeps here")
    parser.add_argument("--compare", metavar="OLD.json", help="print the change against an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    device_type = torch.device(args.device).type
    if device_type not in suites.DEFAULT_DTYPES:
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    args.dtypes = args.dtypes or list(suites.DEFAULT_DTYPES[device_type])
    for option, values, allowed in (("--dtype", args.dtypes, suites.DTYPES),
                                    ("--cells", args.cells, CELLS), ("--modes", args.modes, MODES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"{option} must be a comma list of {list(allowed)}, got {values}")
    args.kernels = {s.argument: getattr(args, s.argument) for s in pins
                    if getattr(args, s.argument) is not None}
    try:
        switch = experimental.enabled()
    except ValueError as error:
        parser.error(str(error))
    for setting in pins:
        value = args.kernels.get(setting.argument)
        if value in setting.experimental and not switch:
            option = "--" + setting.argument.replace("_", "-")
            parser.error(f"{option} {'' if value is True else value + ' '}selects an "
                         f"experimental kernel, which runs only with "
                         f"{experimental.SWITCH}=1 (unset here): the run would time the "
                         f"default kernel")
    for option in ("reps", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be >= 1, got {getattr(args, option)}")
    if args.reps is None:
        args.reps = 200 if device_type == "cuda" else 20
    try:
        args.shapes = ([suites.parse_config(args.config)] if args.config
                       else suites.shapes(args.suite, device_type))
    except ValueError as error:
        parser.error(str(error))
    if args.config:
        args.suite = "config"
    conv = args.suite == "conv2seq"  # its providers are the plain ops and the fused block
    known = list(conv2seq.PROVIDERS) if conv else prov.known_providers()
    requested = args.providers or (known if conv else prov.default_providers(device_type))
    unknown = [p for p in requested if p not in known]
    if unknown:
        parser.error(f"--providers must be from {known}, got {unknown}")
    args.providers = [BASELINE] + [p for p in requested if p != BASELINE]
    args.limits = dict(prov.LIMITS)
    for item in args.limit:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            parser.error(f"--limit must be PROVIDER=STEPS, got {item!r}")
        args.limits[name] = int(value)
    return args


def _rows(cfg: Config, suite: str, timings: dict, flops: int, peaks: dict,
          picked: dict[str, str | None], floor_us: float | None = None) -> list[dict]:
    base = timings.get(BASELINE, {}).get("median_ms")
    rows = []
    for provider, t in timings.items():
        tflops = flops / (t["median_ms"] * 1e-3) / 1e12
        us_per_step = t["median_ms"] * 1e3 / cfg.steps
        rows.append({
            "suite": suite, "config": cfg.name, **vars(cfg), "provider": provider,
            "picked": picked.get(provider),
            "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
            "reps": t.get("reps"),
            "speedup": None if base is None else base / t["median_ms"],
            "us_per_step": us_per_step,
            "floor_us_per_step": floor_us,
            "x_floor": None if floor_us is None else us_per_step / floor_us,
            "flops": flops, "tflops": tflops, "pct_peak": 100 * tflops / peaks[cfg.dtype],
            "peak_mib": t.get("peak_mib"),
        })
    return rows


def run_config(cfg: Config, suite: str, providers: list[str], limits: dict, reps: int,
               peaks: dict) -> tuple[list[dict], list[dict]]:
    """Times every provider on ``cfg``: (result rows, skipped providers with reasons)."""
    steps, skipped = prov.config_steps(cfg, providers, limits)
    picked = {}
    for name in list(steps):  # first call: compiles, and finds providers that cannot run it
        try:
            with prov.auto_choices() as chosen:
                steps[name]()
            if name in (AUTO, TUNED):  # every layer's choice, e.g. "cpu" or "cpu+torch"
                picked[name] = "+".join(sorted(set(chosen))) or None
        except Exception as error:  # a backend's "cannot run this input", an OOM, ...
            del steps[name]
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    skips = [{"config": cfg.name, "provider": p, "reason": r} for p, r in skipped.items()]
    if not steps:
        return [], skips
    floor_us = None
    if cfg.device.startswith("cuda"):
        from .floor import row_floor  # not at import: `python -m cnnlstm_fast.bench.floor`

        timings = timing.time_cuda(steps, reps)
        floor_us, why = row_floor(cfg, peaks[cfg.dtype])
        if why is not None and not cfg.model:
            skips.append({"config": cfg.name, "provider": "floor", "reason": why})
    else:
        timings = timing.time_cpu(steps, reps, CPU_BUDGET_S)
    flops = prov.model_flops(cfg) if suites.is_model(vars(cfg)) else cfg.flops
    return _rows(cfg, suite, timings, flops, peaks, picked, floor_us), skips


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else env.cpu_name()


def run(args: argparse.Namespace) -> dict:
    """Runs the configurations of ``args`` with a progress bar; returns the report. With
    ``--json``, the report so far is written after every configuration, marked
    ``"complete": false`` (with ``configs_done`` of ``configs_total``) until the last, so a
    run stopped by a time limit keeps what it measured."""
    from rich.progress import Progress

    peaks = {d: timing.matmul_peak_tflops(args.device, suites.DTYPES_TORCH[d]) for d in args.dtypes}
    if args.suite == "conv2seq":
        configs = conv2seq.make_configs(args.shapes, args.cells, args.dtypes, args.modes, args.device)
        run_one = lambda cfg: conv2seq.run_config(cfg, args.providers, args.reps, peaks,  # noqa: E731
                                                  CPU_BUDGET_S)
    else:
        configs = suites.make_configs(args.shapes, args.cells, args.dtypes, args.modes, args.device)
        run_one = lambda cfg: run_config(cfg, args.suite, args.providers, args.limits,  # noqa: E731
                                         args.reps, peaks)
    environment = env.collect()
    rows, skipped = [], []
    with Progress(transient=True, disable=args.no_progress) as progress:
        task = progress.add_task(f"{args.suite} on {args.device}", total=len(configs))
        for done, cfg in enumerate(configs, 1):
            progress.update(task, description=cfg.name)
            new_rows, new_skips = run_one(cfg)
            rows += new_rows
            skipped += new_skips
            progress.advance(task)
            if args.json and done < len(configs):
                report.write_json(args.json, _report(args, peaks, environment, rows, skipped,
                                                     done, len(configs)))
    return _report(args, peaks, environment, rows, skipped, len(configs), len(configs))


def _report(args: argparse.Namespace, peaks: dict, environment: dict, rows: list[dict],
            skipped: list[dict], done: int, total: int) -> dict:
    notes = report.auto_notes(rows) + report.skip_notes(skipped)
    if args.suite == "conv2seq":
        notes = conv2seq.slower_notes(rows) + notes + list(conv2seq.METHOD_NOTES)
    if done < total:
        notes.insert(0, f"incomplete: {done} of {total} configurations (the run was stopped)")
    if not args.device.startswith("cuda"):
        notes.append("peak memory is measured on CUDA only (torch.cuda.max_memory_allocated); "
                     "blank on CPU")
    if COMPILED not in args.providers and not args.device.startswith("cuda") and args.suite != "conv2seq":
        notes.append(f"{COMPILED} is not a default provider on CPU (compiling the unrolled "
                     f"recurrence takes ~40 s per shape); add it with --providers")
    return {
        "suite": args.suite,
        "device": device_name(args.device),
        "threads": torch.get_num_threads(),
        "argv": list(args.argv),
        "complete": done == total,
        "configs_done": done,
        "configs_total": total,
        "peak_tflops": peaks,
        "peak_method": "best of a square torch.mm "
                       f"({'8192 do_bench' if args.device.startswith('cuda') else '2048, 3 runs; on CPU float32 also cnnlstm_fast::linear, the cpu backend GEMM'})",
        "notes": notes,
        "environment": environment,
        "results": rows,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as settings:
        if args.cpu_gemm is not None or args.cpu_kernel is not None:
            try:
                if args.cpu_gemm is not None:
                    settings.enter_context(cpu_backend.use_gemm(args.cpu_gemm))
                if args.cpu_kernel is not None:
                    settings.enter_context(cpu_backend.use_kernel(args.cpu_kernel))
            except (ValueError, RuntimeError) as error:  # no AVX-512, no extension
                raise SystemExit(f"cnnlstm_fast.bench: {error}") from None
        settings.enter_context(experimental.use_kernels(**args.kernels))
        result = run(args)
    report.print_table(
        result["results"],
        f"{args.suite}: cnnlstm_fast {cnnlstm_fast.__version__} on {result['device']} "
        f"({result['threads']} threads), torch {torch.__version__}; peak "
        + ", ".join(f"{d} {p:.3f} TFLOP/s" for d, p in result["peak_tflops"].items()),
        result["notes"],
    )
    if args.suite == "conv2seq":
        conv2seq.print_summary(result["results"])
    if args.compare:
        old = report.json.loads(open(args.compare).read())
        report.print_compare(report.compare(old, result["results"]), old)
    if args.json:
        report.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.csv:
        report.write_csv(args.csv, result["results"])
        print(f"wrote {args.csv}")
    if args.plot:
        for path in report.plot(result["results"], args.plot):
            print(f"wrote {path}")
    return result
