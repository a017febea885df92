"""Build and runtime report: ``python -m cnnlstm_fast.env [--json]``.

Everything is asked of the thing itself at run time (the extension's build_info, the
CUDA runtime, torch, the backend registry); nothing is assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import __version__, _ext, backends, experimental
from .backends import tuned


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Set where a copy of the tree runs whose own .git is not the source's (the GPU
#: machines get the working tree with a .git from an earlier snapshot): the commit to
#: report, e.g. ``CNNLSTM_FAST_SOURCE_COMMIT=$(git rev-parse HEAD)`` taken at the source.
SOURCE_COMMIT_VAR = "CNNLSTM_FAST_SOURCE_COMMIT"


def _git_commit() -> str | None:
    """The source tree's commit (with '-dirty' if modified), or None outside a checkout;
    ``$CNNLSTM_FAST_SOURCE_COMMIT`` when set.

    Result files under benchmarks/results/ do not count as modifications: a run of
    several suites rewrites them one after the other."""
    if os.environ.get(SOURCE_COMMIT_VAR):
        return os.environ[SOURCE_COMMIT_VAR]
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)benchmarks/results"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _triton() -> dict:
    try:
        import triton
    except Exception as error:  # ImportError, or a broken install raising anything
        return {"version": None, "error": f"{type(error).__name__}: {error}"}
    return {"version": triton.__version__, "error": None}


def _extension() -> dict:
    module = _ext.load()
    if module is None:
        return {"built": False, "error": _ext.load_error()}
    return {
        "built": True,
        "error": None,
        "build": module.build_info(),
        "cuda_runtime": module.cuda_runtime_info(),
        "cpu_gemm": _cpu_gemm(module),
    }


#: The environment variables that change the cpu backend's speed or torch.nn's (its
#: buffer cache; glibc's malloc thresholds and preloaded allocators, which decide
#: torch.nn's page faults; torch's transparent huge pages).
CPU_SETTINGS = ("CNNLSTM_FAST_CPU_CACHE_MB", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_",
                "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")
#: The cpu backend's process settings (not environment variables), recorded under these
#: names where they are not the default: cnnlstm_fast.backends.cpu.set_gemm / set_kernel.
CPU_PROCESS_SETTINGS = ("cpu.set_gemm", "cpu.set_kernel")


def _cpu_settings() -> dict:
    settings: dict = {name: os.environ.get(name) for name in CPU_SETTINGS}
    from .backends import cpu

    gemm = cpu.get_gemm() if _ext.load() is not None else "auto"
    kernel = cpu.get_kernel()
    settings["cpu.set_gemm"] = None if gemm == "auto" else gemm
    settings["cpu.set_kernel"] = None if kernel == "auto" else kernel
    return settings


#: The keys of ``cuda_settings``, the GPU backends' kernel selection
#: (cnnlstm_fast/experimental.py): the switch CNNLSTM_FAST_EXPERIMENTAL, as the
#: environment has it, and the pins of ``experimental.set_kernels`` (cuda's forward,
#: backward and PDL, triton's backward), where not the default, under the names of the
#: environment variables they were before they became settings (so that
#: benchmarks/report.py reads older result files and newer ones alike).
CUDA_SETTINGS = (experimental.SWITCH, *(s.record_key for s in experimental.SETTINGS))


def _cpu_gemm(module) -> dict:
    return {**module.cpu_gemm_info(), "error": _ext.settings_error()}


def _torch_cuda() -> dict:
    info = {
        "torch_cuda_version": torch.version.cuda,
        "available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "devices": [],
    }
    for index in range(info["device_count"]):
        props = torch.cuda.get_device_properties(index)
        info["devices"].append(
            {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    return info


def _tuning() -> dict:
    """The tuning record ``auto`` consults (docs/tuning.md): where, how many signatures,
    and whether tuning on first use is on."""
    from .tune import ENV_VAR, get_tuning  # (cnnlstm_fast.tune is the function)

    return {"record": str(tuned.cache_path()), "signatures": len(tuned.entries()),
            "on_first_use": get_tuning(), ENV_VAR: os.environ.get(ENV_VAR)}


def _default_backend() -> str:
    """The process default, or why it has none: a bad CNNLSTM_FAST_BACKEND is reported,
    not raised (every module with backend="auto" raises it at its first call)."""
    try:
        return backends.get_default()
    except ValueError as exc:
        return f"error: {exc}"


def collect() -> dict:
    """The report as a JSON-serialisable dict."""
    extension = _extension()
    torch_base = torch.__version__.split("+")[0]
    built_against = extension.get("build", {}).get("torch_version")
    warnings = []
    if built_against is not None and built_against != torch_base:
        warnings.append(
            f"cnnlstm_fast._C was built against torch {built_against} but torch "
            f"{torch.__version__} is running: rebuild with "
            "`pip install -e . --no-build-isolation`"
        )
    return {
        "cnnlstm_fast": __version__,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "triton": _triton(),
        "extension": extension,
        "torch_cuda": _torch_cuda(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "CNNLSTM_FAST_BACKEND": os.environ.get(backends.ENV_VAR),
        # What changes the cpu backend's speed (its GEMM, buffer cache, persistent path;
        # glibc's malloc thresholds, which decide torch.nn's page faults) and which GPU
        # kernels ran: recorded with every benchmark so runs can be compared.
        "cpu_settings": _cpu_settings(),
        "cuda_settings": experimental.recorded_settings(),
        "backends": backends.backend_report(),
        "available_backends": backends.available_backends(),
        "default_backend": _default_backend(),
        "tuning": _tuning(),
        "warnings": warnings,
    }


def _cuda_version(code: int) -> str:
    """13000 -> '13.0' (the encoding of CUDART_VERSION and cudaRuntimeGetVersion)."""
    return f"{code // 1000}.{code % 1000 // 10}"


def _query(entry: dict, as_version: bool = False) -> str:
    if entry["error"] is not None:
        return f"error: {entry['error']}"
    if as_version:
        return _cuda_version(entry["value"]) if entry["value"] else "0 (no driver installed)"
    return str(entry["value"])


def format_report(info: dict) -> str:
    lines = []

    def row(key: str, value) -> None:
        lines.append(f"  {key:<28} {value}")

    lines.append("cnnlstm_fast")
    row("version", info["cnnlstm_fast"])
    row("git commit", info["git_commit"] or "not a git checkout")
    row("python", info["python"])
    row("platform", info["platform"])
    row("cpu", f"{info['cpu']} ({info['cpu_count']} logical, torch uses {info['torch_threads']})")
    row("torch", info["torch"])
    triton = info["triton"]
    row("triton", triton["version"] or f"not importable: {triton['error']}")
    row("TRITON_INTERPRET", info["TRITON_INTERPRET"] or "unset")

    lines.append("extension cnnlstm_fast._C")
    ext = info["extension"]
    if not ext["built"]:
        row("built", f"no: {ext['error']}")
    else:
        build = ext["build"]
        row("built", "yes")
        row("built against torch", build["torch_version"])
        row("compiler", f"{build['compiler']}, C++ {build['cxx_standard']}")
        row("OpenMP", f"yes ({build['openmp_version']})" if build["openmp"] else "no")
        gemm = ext["cpu_gemm"]
        row("cpu float32 GEMM", (
            f"{gemm['in_use']} (AVX-512 {'present' if gemm['avx512_supported'] else 'absent'}; "
            f"cnnlstm_fast.backends.cpu.set_gemm: {gemm.get('setting', 'auto')})"))
        if gemm.get("fma512_ratio"):
            ratio = gemm["fma512_ratio"]
            row("512-bit FMA rate", f"{ratio:.2f}x the floats of 256-bit ("
                f"{'full width' if ratio >= 1.5 else 'half rate: double-pumped or one port'})")
        if gemm["error"]:
            row("cpu settings error", gemm["error"])
        set_ = {k: v for k, v in info["cpu_settings"].items() if v is not None}
        row("cpu settings", ", ".join(f"{k}={v}" for k, v in set_.items()) or "defaults")
        if build["cuda"]:
            row("CUDA compiled", "yes")
            row("CUDA toolkit", _cuda_version(build["cuda_toolkit_version"]))
            row("CUDA archs", ", ".join(f"sm_{a}" for a in build["cuda_archs"]))
            runtime = ext["cuda_runtime"]
            row("CUDA runtime (static)", _query(runtime["runtime_version"], as_version=True))
            row("CUDA driver", _query(runtime["driver_version"], as_version=True))
            row("CUDA devices (runtime)", _query(runtime["device_count"]))
        else:
            row("CUDA compiled", f"no: {ext['cuda_runtime']['reason']}")

    lines.append("torch.cuda")
    cuda = info["torch_cuda"]
    row("torch built with CUDA", cuda["torch_cuda_version"] or "no (CPU-only torch)")
    row("available", cuda["available"])
    row("device count", cuda["device_count"])
    for index, device in enumerate(cuda["devices"]):
        row(
            f"device {index}",
            f"{device['name']} (sm_{device['capability'].replace('.', '')}, "
            f"{device['memory_gib']} GiB, {device['multiprocessors']} SMs)",
        )

    lines.append("backends")
    for name, why in info["backends"].items():
        row(name, "available" if why is None else f"unavailable: {why}")
    row("available, best first", ", ".join(info["available_backends"]))
    default = info["default_backend"]
    source = f"from CNNLSTM_FAST_BACKEND={info['CNNLSTM_FAST_BACKEND']}" if info[
        "CNNLSTM_FAST_BACKEND"] else "CNNLSTM_FAST_BACKEND unset"
    row("default", f"{default} ({source})")
    tuning = info["tuning"]
    row("tuning record", f"{tuning['signatures']} signature(s) in {tuning['record']}")
    row("tuning on first use", "on" if tuning["on_first_use"] else "off")

    for warning in info["warnings"]:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cnnlstm_fast.env",
        description="Report how cnnlstm_fast was built and what it finds on this machine.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))


if __name__ == "__main__":
    main()
