"""Regenerates the documentation's tables from the committed result files.

    python benchmarks/report.py            # rewrite every generated section
    python benchmarks/report.py --check    # exit 1 if one of them is out of date

Each generated section sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``:

- README.md ``support``: the support matrix, its GPU cells from the kernel status below;
- README.md ``perf``: one headline table per device, whole models first, then layers;
- docs/performance.md ``perf``: per device the newest result files in full, older ones
  linked;
- docs/gpu.md ``kernels``: each GPU kernel's last GPU-verified commit and result file.

Inputs: ``benchmarks/results/<device>/*.json`` as ``python -m cnnlstm_fast.bench --json``
writes them, and the GPU session logs beside them (``gpu-session-<commit>.log``, holding
``benchmarks/gpu_session.sh``'s summary); numbers reach the docs only this way. Result
files of one suite on one device share a name up to an optional ``-<commit>`` suffix;
the newest of them is the one whose recorded commit comes last in git history, so this
needs the repository's history (a fresh clone has it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
GPU = ROOT / "docs" / "gpu.md"
BASELINE = "torch.nn"
#: Which of our providers a headline row shows: what a user gets (auto) where it was
#: timed, else the first compiled backend the file timed.
HEADLINE_PROVIDERS = ("auto", "cuda", "cpu", "triton")
MODES = ("forward", "forward_backward")
_SUFFIX = re.compile(r"-[0-9a-f]{7,40}$")
_SESSION_LOG = re.compile(r"gpu-session-([0-9a-f]{7,40})\.log$")
_TESTS_RC = re.compile(r"\bgpu tests rc=(\d+)")
_EXPERIMENTAL_FILE = re.compile(r"experimental-([0-9a-f]{7,40})\.json$")


# --- the result files --------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    path: Path
    report: dict

    @property
    def stem(self) -> str:
        """The suite's name on this device: the file name without a commit suffix."""
        return _SUFFIX.sub("", self.path.stem)

    @property
    def commit(self) -> str:
        return self.report["environment"]["git_commit"].removesuffix("-dirty")

    @property
    def is_models(self) -> bool:
        return self.report["suite"] == "models"

    @property
    def on_gpu(self) -> bool:
        return any(r["device"].startswith("cuda") for r in self.report["results"])


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


@functools.cache
def _history() -> list[str]:
    """Full commit hashes of HEAD's history, newest first."""
    try:
        return _git("rev-list", "--topo-order", "HEAD").split()
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError("benchmarks/report.py orders result files by git history: "
                           f"run it in a clone of the repository ({error})") from None


def age(commit: str) -> int:
    """0 for HEAD, larger for older commits; commits not in HEAD's history are oldest."""
    history = _history()
    return next((i for i, full in enumerate(history) if full.startswith(commit)), len(history))


def load(results: Path = RESULTS) -> dict[str, list[Result]]:
    """Per device folder, its result files, newest first within each suite."""
    devices = {}
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        files = [Result(p, report) for p in sorted(folder.glob("*.json"))
                 if _is_bench(report := json.loads(p.read_text()))]
        if files:
            devices[folder.name] = sorted(files, key=lambda r: (r.stem, age(r.commit), r.path.name))
    # GPUs first: the package is for them
    return dict(sorted(devices.items(), key=lambda kv: (not kv[1][0].on_gpu, kv[0])))


def _is_bench(report) -> bool:
    """A file of ``python -m cnnlstm_fast.bench --json`` (not floor.json or env.json)."""
    return isinstance(report, dict) and {"suite", "environment", "results"} <= report.keys()


def newest(files: list[Result]) -> list[Result]:
    """The newest file of each suite, models first."""
    seen, out = set(), []
    for result in files:
        if result.stem not in seen:
            seen.add(result.stem)
            out.append(result)
    return sorted(out, key=lambda r: (not r.is_models, r.stem))


def link(path: Path, start: Path) -> str:
    """``path`` relative to the folder of the document at ``start`` (for markdown links);
    absolute where it is outside the repository (result folders of tests)."""
    if not path.is_relative_to(ROOT):
        return path.as_posix()
    rel = Path(*([".."] * len(start.parent.relative_to(ROOT).parts)), path.relative_to(ROOT))
    return rel.as_posix()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def device_heading(folder: str, files: list[Result]) -> str:
    return f"`{folder}`: {files[0].report['device']}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


# --- README: the headline tables -----------------------------------------------------------

def _provider(rows: list[dict]) -> str | None:
    present = {r["provider"] for r in rows if r.get("speedup") is not None}
    return next((p for p in HEADLINE_PROVIDERS if p in present), None)


def _range(values: list[int], letter: str) -> str:
    low, high = min(values), max(values)
    return f"{letter}{low}" if low == high else f"{letter}{low}-{high}"


def _summary(rows: list[dict]) -> str:
    if not rows:
        return "-"
    ratios = sorted(r["speedup"] for r in rows)
    if len(ratios) == 1:
        return _ratio(ratios[0])
    median = statistics.median(ratios)
    return f"{_ratio(ratios[0])} to {_ratio(ratios[-1])}, median {_ratio(median)}"


_KIND = {"": "{cell} layers", "cell": "{cell}Cell loops"}
_CELL_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN (relu)"}


def _model_rows(result: Result) -> list[str]:
    """One row per model and shape: inference and training step side by side."""
    rows = result.report["results"]
    provider = _provider(rows)
    by_key = {(r["config"], r["provider"]): r for r in rows}
    lines = []
    models = dict.fromkeys(r["config"].rsplit(" ", 1)[0] for r in rows)  # config minus mode
    for model in models:
        cells = []
        for mode in MODES:
            row = by_key.get((f"{model} {mode}", provider))
            if row is None or row["speedup"] is None:
                cells.append("-")
            else:
                picked = f" ({row['picked']})" if row.get("picked") else ""
                cells.append(_ratio(row["speedup"]) + picked)
        name, shape = model.split(" ", 1)
        lines.append(f"| model {name} | {shape} | {provider} | {cells[0]} | {cells[1]} |")
    return lines


def _layer_rows(results: list[Result]) -> list[str]:
    """One row per kind (layers, cell loops), cell, dtype and provider: the range of the
    speedups over the shapes of the newest files, per mode."""
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        rows = result.report["results"]
        provider = _provider(rows)
        for row in rows:
            if row["provider"] == provider and row["speedup"] is not None:
                key = (row.get("model", ""), row["cell"], row["dtype"], provider)
                groups.setdefault(key, []).append(row)
    lines = []
    for (kind, cell, dtype, provider), rows in groups.items():
        what = _KIND.get(kind, kind + " {cell}").format(cell=_CELL_NAMES.get(cell, cell))
        configs = len({r["config"].rsplit(" ", 1)[0] for r in rows})
        shape = " ".join(_range([r[k] for r in rows], letter) for k, letter in
                         (("batch", "B"), ("steps", "T"), ("hidden_size", "H"), ("layers", "L"),
                          ("directions", "D"))
                         if letter in "BTH" or any(r[k] != 1 for r in rows))
        by_mode = [[r for r in rows if r["mode"] == mode] for mode in MODES]
        lines.append(f"| {what} ({configs} shapes) | {shape} {dtype} | {provider} | "
                     f"{_summary(by_mode[0])} | {_summary(by_mode[1])} |")
    return lines


def render_headline(devices: dict[str, list[Result]], doc: Path = README) -> str:
    lines = ["_Generated by `python benchmarks/report.py` from the newest result file of each "
             "suite under `benchmarks/results/`; not edited by hand. Speedup against torch.nn "
             "timed in the same run (median time; above 1x is faster). `auto` is what you get "
             "without naming a backend (in brackets: the backend it picked); a `cpu` or "
             "`cuda` row pins that backend everywhere, including where `auto` would keep "
             "torch.nn. Layer rows give the range and median over the shapes measured._", ""]
    for folder, files in devices.items():
        current = newest(files)
        heading = device_heading(folder, files)
        threads = sorted({r.report["threads"] for r in current})
        lines += [f"#### {heading}",
                  "",
                  f"{_range(threads, '')} thread(s); torch "
                  f"{', '.join(sorted({r.report['environment']['torch'] for r in current}))}; "
                  f"every file: [docs/performance.md]({link(PERFORMANCE, doc)}#{slug(heading)})",
                  "",
                  "| workload | shape | ours | inference | training step |",
                  "|---|---|---|---:|---:|"]
        for result in current:
            if result.is_models:
                lines += _model_rows(result)
        lines += _layer_rows([r for r in current if not r.is_models])
        lines.append("")
    return "\n".join(lines)


# --- docs/performance.md ---------------------------------------------------------------------

def _table(report: dict) -> list[str]:
    rows = report["results"]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != BASELINE]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by_key = {(r["config"], r["provider"]): r for r in rows}
    # GPU runs since the floor exists: the per-step floor, and each row's ratio to it
    floors = any(r.get("floor_us_per_step") is not None for r in rows)
    head = "| configuration | torch.nn ms | " + ("floor us/step | " if floors else "")
    lines = [head + " | ".join(providers) + " |",
             "|---|---:|" + ("---:|" if floors else "") + "---:|" * len(providers)]
    for config in configs:
        base = by_key.get((config, BASELINE))
        cells = []
        for provider in providers:
            row = by_key.get((config, provider))
            if row is None or row["speedup"] is None:
                cells.append("skipped")
            else:  # auto's cell names the backend it picked
                picked = f" ({row['picked']})" if row.get("picked") else ""
                over = (f"; {row['us_per_step']:.1f} us/step, {row['x_floor']:.1f}x floor"
                        if row.get("x_floor") is not None else "")
                cells.append(f"{row['speedup']:.2f}x{picked}{over}")
        base_ms = "-" if base is None else f"{base['median_ms']:.3f}"
        if base is not None and base.get("x_floor") is not None:
            base_ms += f" ({base['x_floor']:.1f}x floor)"
        if floors:
            floor = next((by_key[(config, p)].get("floor_us_per_step") for p in [BASELINE, *providers]
                          if (config, p) in by_key), None)
            base_ms += " | " + ("-" if floor is None else f"{floor:.2f}")
        lines.append(f"| {config} | {base_ms} | " + " | ".join(cells) + " |")
    return lines


def _settings(env: dict) -> str:
    """The switches a run set (unset ones are the defaults)."""
    pinned = {k: v for group in ("cpu_settings", "cuda_settings")
              for k, v in (env.get(group) or {}).items() if v is not None}
    return "; settings " + ", ".join(f"`{k}={v}`" for k, v in pinned.items()) if pinned else ""


def render_performance(devices: dict[str, list[Result]], doc: Path = PERFORMANCE) -> str:
    lines = ["_Generated by `python benchmarks/report.py` from the raw result files under "
             "`benchmarks/results/`; not edited by hand. Cells: speedup against torch.nn in "
             "the same run (median time; above 1x is faster). Each file records the commit "
             "that ran, the environment and every row's p20/p80, TFLOP/s and % of the "
             "measured matmul peak._", ""]
    for folder, files in devices.items():
        current = newest(files)
        lines += [f"## {device_heading(folder, files)}", ""]
        where = files[0].path.parent
        notes = where / "README.md"
        if notes.exists():
            lines += [f"What these runs show, and how they were made: "
                      f"[{folder}/README.md]({link(notes, doc)}).", ""]
        for result in current:
            report, env = result.report, result.report["environment"]
            peaks = ", ".join(f"{d} {p:.3f}" for d, p in report["peak_tflops"].items())
            lines += [
                f"### [`{result.path.name}`]({link(result.path, doc)}): suite {report['suite']}",
                "",
                f"{report['device']}, {report['threads']} thread(s); torch {env['torch']}, "
                f"triton {env['triton']['version']}, cnnlstm_fast {env['cnnlstm_fast']}"
                f"{_settings(env)}; measured matmul peak (TFLOP/s): {peaks}.",
                "",
                *_table(report),
                "",
                *(f"- {note}" for note in report["notes"]),
                "",
            ]
        older = [r for r in files if r not in current]
        loaded = {r.path for r in files}
        others = sorted(p for p in where.iterdir()
                        if p.is_file() and p not in loaded and p.name != "README.md")
        if older or others:
            lines += [f"### Older runs and other files on `{folder}`", ""]
            lines += [f"- [`{r.path.name}`]({link(r.path, doc)}): suite {r.report['suite']}, "
                      f"older than `{next(c.path.name for c in current if c.stem == r.stem)}`"
                      for r in older]
            lines += [f"- [`{p.name}`]({link(p, doc)})" for p in others]
            lines.append("")
    return "\n".join(lines)


# --- docs/gpu.md: the kernel status ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernel:
    """A GPU kernel (or the default set of one backend): how a result row shows that it
    ran (its backend's provider, the mode that runs it, the settings that select it as
    result files record them in ``cuda_settings``: none for a default kernel;
    CNNLSTM_FAST_EXPERIMENTAL=1, alone or with a pin, for an experimental one) and the
    sources whose change after a verification makes that verification stale. ``key``:
    for an experimental kernel, its key in cnnlstm_fast/experimental.py and in a
    session's experimental verification."""

    key: str
    name: str
    provider: str
    modes: tuple[str, ...]
    settings: tuple[tuple[str, str], ...]
    sources: tuple[str, ...]

    @property
    def experimental(self) -> bool:
        return bool(self.settings)

    def ran_in(self, result: Result) -> bool:
        settings = result.report["environment"].get("cuda_settings") or {}
        own = "CNNLSTM_FAST_TRITON" if self.provider == "triton" else "CNNLSTM_FAST_CUDA"
        wanted = dict(self.settings)
        if any(settings.get(k) != v for k, v in wanted.items()):
            return False
        # no other setting of this backend pinned, and the switch only where wanted
        if any(v not in (None, "auto") and k not in wanted for k, v in settings.items()
               if k.startswith(own)):
            return False
        if settings.get(_SWITCH) == "1" and _SWITCH not in wanted:
            return False
        return any(r["provider"] == self.provider and r["mode"] in self.modes
                   and r["speedup"] is not None for r in result.report["results"])


_SWITCH = "CNNLSTM_FAST_EXPERIMENTAL"
_ON = ((_SWITCH, "1"),)
#: The pins result files record in ``cuda_settings`` (under the names of the environment
#: variables they were), by the argument of ``cnnlstm_fast.experimental.set_kernels``
#: that sets them now; CNNLSTM_FAST_CUDA_PDL is recorded as "1" for ``cuda_pdl=True``.
PIN_ARGUMENTS = {"CNNLSTM_FAST_CUDA_KERNEL": "cuda_forward",
                 "CNNLSTM_FAST_CUDA_BACKWARD": "cuda_backward",
                 "CNNLSTM_FAST_CUDA_PDL": "cuda_pdl",
                 "CNNLSTM_FAST_TRITON_BACKWARD": "triton_backward"}
_BOOLEAN_PINS = {"CNNLSTM_FAST_CUDA_PDL"}


def selected_by(settings: tuple[tuple[str, str], ...]) -> str:
    """How a kernel is selected now, for the status table: "default", or the switch as
    the environment variable it is and each pin as the ``set_kernels`` call that sets it."""
    if not settings:
        return "default"
    parts = []
    for key, value in settings:
        if key in PIN_ARGUMENTS:
            shown = (value == "1") if key in _BOOLEAN_PINS else value
            parts.append(f"`set_kernels({PIN_ARGUMENTS[key]}={shown!r})`")
        else:
            parts.append(f"`{key}={value}`")
    return " ".join(parts)

# the default kernels' sources (the experimental ones' files changing leaves them as they are)
_CUDA = ("csrc/cuda", ":(exclude)csrc/cuda/experimental", "csrc/recurrence_cuda.cpp",
         "csrc/include")
_CUDA_EXPERIMENTAL = ("csrc/cuda", "csrc/recurrence_cuda.cpp", "csrc/include")
_TRITON = ("cnnlstm_fast/kernels/triton", "cnnlstm_fast/backends/triton.py")
_BOTH = ("forward", "forward_backward")
_TRAINING = ("forward_backward",)
KERNELS = (
    Kernel("cuda-forward", "cuda forward: persistent (tensor cores for fp16/bf16, else CUDA "
           "cores), per step where that does not fit", "cuda", _BOTH, (), _CUDA),
    Kernel("cuda-backward", "cuda backward: per step, split-K d_h", "cuda", _TRAINING, (), _CUDA),
    Kernel("cuda-mma-pass-start-loads", "cuda forward: tensor-core kernel loading each pass's "
           "G_x, c and h at the pass start", "cuda", _BOTH, _ON, _CUDA_EXPERIMENTAL),
    Kernel("cuda-device-row-counts", "cuda: packed row counts written on the device",
           "cuda", _BOTH, _ON, _CUDA_EXPERIMENTAL),
    Kernel("cuda-mma-pipelined", "cuda forward: pipelined tensor-core", "cuda", _BOTH,
           _ON + (("CNNLSTM_FAST_CUDA_KERNEL", "mma-pipelined"),), _CUDA_EXPERIMENTAL),
    Kernel("cuda-mma-cluster", "cuda forward: one thread-block cluster (sm_90)", "cuda", _BOTH,
           _ON + (("CNNLSTM_FAST_CUDA_KERNEL", "mma-cluster"),), _CUDA_EXPERIMENTAL),
    Kernel("cuda-streamed", "cuda forward: streamed (W_hh from L2)", "cuda", _BOTH,
           _ON + (("CNNLSTM_FAST_CUDA_KERNEL", "streamed"),), _CUDA_EXPERIMENTAL),
    Kernel("cuda-persistent-backward", "cuda backward: persistent", "cuda", _TRAINING,
           _ON + (("CNNLSTM_FAST_CUDA_BACKWARD", "persistent"),), _CUDA_EXPERIMENTAL),
    Kernel("cuda-pdl", "cuda per-step kernels with programmatic dependent launch", "cuda",
           _BOTH, _ON + (("CNNLSTM_FAST_CUDA_PDL", "1"),), _CUDA_EXPERIMENTAL),
    Kernel("triton-forward", "triton forward: persistent, per step where that does not fit",
           "triton", _BOTH, (), _TRITON),
    Kernel("triton-backward", "triton backward: per step", "triton", _TRAINING, (), _TRITON),
    Kernel("triton-cooperative-launch", "triton: persistent kernels as cooperative launches",
           "triton", _BOTH, _ON, _TRITON),
    Kernel("triton-persistent-backward", "triton backward: persistent", "triton", _TRAINING,
           _ON + (("CNNLSTM_FAST_TRITON_BACKWARD", "persistent"),), _TRITON),
)


@dataclasses.dataclass(frozen=True)
class Status:
    kernel: Kernel
    device: str = ""
    commit: str = ""
    file: Path | None = None
    changed_since: bool = False

    @property
    def verified(self) -> bool:
        return self.file is not None


def _passed_sessions(folder: Path) -> set[str]:
    """Commits whose GPU session log reports every GPU test passed (``gpu tests rc=0``)."""
    passed = set()
    for path in folder.iterdir():
        match = _SESSION_LOG.search(path.name)
        if match:
            codes = _TESTS_RC.findall(path.read_text(errors="replace"))
            if codes and all(code == "0" for code in codes):
                passed.add(match.group(1))
    return passed


def _passed_experimental(folder: Path, key: str) -> set[str]:
    """Commits whose experimental verification (benchmarks/gpu_session.sh's
    experimental-verification.json, committed as ``experimental-<commit>.json``) ran to
    the end and passed the kernel ``key``."""
    passed = set()
    for path in folder.iterdir():
        match = _EXPERIMENTAL_FILE.search(path.name)
        if match:
            report = json.loads(path.read_text())
            if report.get("complete") and report["kernels"].get(key, {}).get("result") == "pass":
                passed.add(match.group(1))
    return passed


def _changed(commit: str, sources: tuple[str, ...]) -> bool:
    return bool(_git("diff", "--name-only", commit, "HEAD", "--", *sources).strip())


def kernel_status(devices: dict[str, list[Result]]) -> list[Status]:
    """Per kernel, the newest GPU session that passed its GPU tests (a default kernel:
    the session's; an experimental one: its own, in the session's experimental
    verification) and timed the kernel."""
    statuses = []
    for kernel in KERNELS:
        found = []  # (age, folder, file name, result) of the result files of passed sessions
        for folder, files in devices.items():
            where = files[0].path.parent
            passed = (_passed_experimental(where, kernel.key) if kernel.experimental
                      else _passed_sessions(where))
            found += [(age(r.commit), folder, r.path.name, r) for r in files
                      if r.on_gpu and kernel.ran_in(r) and any(
                          r.commit.startswith(c) or c.startswith(r.commit) for c in passed)]
        if not found:
            statuses.append(Status(kernel))
            continue
        result = sorted(found)[0][-1]
        statuses.append(Status(kernel, result.report["device"], result.commit[:7], result.path,
                               _changed(result.commit, kernel.sources)))
    return statuses


def render_kernels(statuses: list[Status], doc: Path = GPU) -> str:
    lines = ["_Generated by `python benchmarks/report.py` from the GPU session logs and result "
             "files under `benchmarks/results/`; not edited by hand. Verified: the newest GPU "
             "session whose GPU tests passed and whose result files time the kernel (rows of "
             "its backend, with its settings where it is experimental); for a default kernel "
             "the session's tests (its log's `gpu tests rc=0`), for an experimental one its "
             "own tests under the switch (`experimental-<commit>.json`). Changed since: a "
             "commit after that one touched the kernel's sources (for a default kernel, "
             "those outside `csrc/cuda/experimental/`)._", "",
             "| kernel | selected by | last GPU-verified commit | result file | changed since |",
             "|---|---|---|---|---|"]
    for s in statuses:
        setting = selected_by(s.kernel.settings)
        if s.verified:
            lines.append(f"| {s.kernel.name} | {setting} | `{s.commit}` ({s.device}) | "
                         f"[`{s.file.name}`]({link(s.file, doc)}) | "
                         f"{'yes: not verified as it is now' if s.changed_since else 'no'} |")
        else:
            lines.append(f"| {s.kernel.name} | {setting} | not yet run on a GPU | - | - |")
    lines.append("")
    return "\n".join(lines)


# --- README: the support matrix ----------------------------------------------------------------

def _gpu_cell(status: Status, doc: Path) -> str:
    if not status.verified:
        return "experimental: not yet run on a GPU"
    where = f"verified on [{status.device.removeprefix('NVIDIA ')}]({link(status.file, doc)})"
    if status.changed_since:
        return f"{where}, [changed since]({link(GPU, doc)}#kernel-status)"
    return where


def render_support(statuses: list[Status], doc: Path = README) -> str:
    by_key = {s.kernel.key: s for s in statuses}
    cuda_fwd, cuda_bwd = by_key["cuda-forward"], by_key["cuda-backward"]
    triton_fwd, triton_bwd = by_key["triton-forward"], by_key["triton-backward"]
    cpu = "tested on CPU in CI"
    cell_loop = "experimental: the layers' kernels at one step, no GPU test of a cell"
    backends = link(ROOT / "docs" / "backends.md", doc)
    rows = [
        ("LSTM, GRU layers", "CPU", "float32, float64", "`cpu`",
         f"where it measured faster ([rules]({backends}#cpu))", cpu, cpu),
        ("RNN layers; all cells", "CPU", "float32, float64", "`cpu`",
         "no: pin `backend=\"cpu\"`", cpu, cpu),
        ("all", "CPU", "float16, bfloat16", "`reference` only", "no: torch.nn", cpu, cpu),
        ("LSTM, GRU layers", "CUDA", "float16, bfloat16", "`cuda`",
         f"inference where it measured faster ([rules]({backends}#cuda)); training no",
         _gpu_cell(cuda_fwd, doc), _gpu_cell(cuda_bwd, doc)),
        ("LSTM, GRU layers", "CUDA", "float32", "`cuda`", "no: pin `backend=\"cuda\"`",
         _gpu_cell(cuda_fwd, doc), _gpu_cell(cuda_bwd, doc)),
        ("RNN layers", "CUDA", "float32, float16, bfloat16", "`cuda`",
         "no: pin `backend=\"cuda\"`", _gpu_cell(cuda_fwd, doc), _gpu_cell(cuda_bwd, doc)),
        ("all cells", "CUDA", "float32, float16, bfloat16", "`cuda`", "no: pin `backend=\"cuda\"`",
         cell_loop, cell_loop),
        ("all layers", "CUDA", "float32, float16, bfloat16", "`triton`",
         "no: pin `backend=\"triton\"`", _gpu_cell(triton_fwd, doc), _gpu_cell(triton_bwd, doc)),
    ]
    lines = ["_Generated by `python benchmarks/report.py` (the GPU cells from the "
             f"[kernel status]({link(GPU, doc)}#kernel-status)); not edited by hand._", "",
             "| cells | device | dtype | backend | `auto` runs it | inference | training |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    return "\n".join(lines)


# --- sections ----------------------------------------------------------------------------------

def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def update(text: str, name: str, body: str) -> str:
    begin, end = markers(name)
    start, stop = text.index(begin), text.index(end)
    return text[:start] + begin + "\n\n" + body + "\n" + text[stop:]


def render_all(results: Path = RESULTS) -> dict[Path, dict[str, str]]:
    """Per document, its generated sections' bodies by marker name."""
    devices = load(results)
    statuses = kernel_status(devices)
    return {
        README: {"support": render_support(statuses), "perf": render_headline(devices)},
        PERFORMANCE: {"perf": render_performance(devices)},
        GPU: {"kernels": render_kernels(statuses)},
    }


def regenerate(results: Path = RESULTS) -> dict[Path, tuple[str, str]]:
    """Per document, (text now, text as generated)."""
    out = {}
    for path, sections in render_all(results).items():
        text = path.read_text()
        new = text
        for name, body in sections.items():
            new = update(new, name, body)
        out[path] = (text, new)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, (text, new) in regenerate().items():
        if new == text:
            continue
        stale.append(path.relative_to(ROOT).as_posix())
        if not args.check:
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}: run python benchmarks/report.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
