"""Builds the one extension, ``cnnlstm_fast._C``.

C++ sources (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) go through torch's CppExtension with
ninja. CUDA sources (``csrc/cuda/*.cu`` and the experimental kernels,
``csrc/cuda/experimental/*.cu``) include no torch headers, so nvcc compiles
them to objects on any machine that has nvcc, CPU-only torch included (its CUDA_HOME
is None and it cannot build a CUDAExtension); the objects are linked into the
extension together with the static CUDA runtime, so the .so loads without libcudart.

Environment:
  CNNLSTM_FAST_CUDA_ARCHS   compute capabilities, default "80;90" (PTX for the highest)
  CNNLSTM_FAST_NO_CUDA=1    build CPU-only even when nvcc is found
  NVCC / CUDA_HOME          where nvcc is (else ``which nvcc``, then /usr/local/cuda)
  MAX_JOBS                  parallel compile jobs (torch's ninja build honours it)

Install: ``pip install -e . --no-build-isolation`` after torch is installed.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")
DEFAULT_CUDA_ARCHS = "80;90"


def read_version() -> str:
    text = (ROOT / "cnnlstm_fast" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def cuda_archs() -> list[str]:
    value = os.environ.get("CNNLSTM_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in re.split(r"[;,\s]+", value) if a.strip()]
    for arch in archs:
        if not re.fullmatch(r"\d+[af]?", arch):
            raise ValueError(
                f"CNNLSTM_FAST_CUDA_ARCHS must list compute capabilities such as "
                f"'80;90', got {value!r}"
            )
    if not archs:
        raise ValueError(f"CNNLSTM_FAST_CUDA_ARCHS is empty, got {value!r}")
    return archs


def find_nvcc() -> str | None:
    """nvcc from NVCC, CUDA_HOME/CUDA_PATH, PATH, then /usr/local/cuda; None if absent."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_lib_dir(nvcc: str) -> str:
    """The toolkit's library directory, as nvcc itself reports it (nvcc may be a wrapper)."""
    out = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    root = Path(top.group(1).strip()) if top else Path(os.path.realpath(nvcc)).parents[1]
    for lib in (root / "lib64", root / "targets" / "x86_64-linux" / "lib", root / "lib"):
        if (lib / "libcudart_static.a").exists():
            return str(lib.resolve())
    raise RuntimeError(f"nvcc found at {nvcc} but no libcudart_static.a under {root}")


def nvcc_flags(archs: list[str]) -> list[str]:
    flags = ["-O3", "-std=c++20", "-Xcompiler", "-fPIC", f"-I{CSRC / 'include'}"]
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    highest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    flags += ["-gencode", f"arch=compute_{highest},code=compute_{highest}"]
    return flags


class BuildExtensionWithNvcc(BuildExtension):
    """torch's BuildExtension, plus nvcc compiling the CUDA sources to objects first.

    An object is rebuilt when its .cu, any header under csrc/ or the nvcc flags changed.
    """

    def build_extensions(self):
        if NVCC_CONFIG:
            objects = self._compile_cu(NVCC_CONFIG["nvcc"], NVCC_CONFIG["flags"])
            for ext in self.extensions:
                ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()

    def _compile_cu(self, nvcc: str, flags: list[str]) -> list[str]:
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = out_dir / "nvcc_flags.txt"
        command_line = " ".join([nvcc, *flags])
        flags_changed = not stamp.exists() or stamp.read_text() != command_line
        headers = [p for ext in ("h", "hpp", "cuh") for p in CSRC.rglob(f"*.{ext}")]
        newest_header = max((h.stat().st_mtime for h in headers), default=0.0)
        objects = []
        for source in cuda_sources():
            # named by the path under csrc/cuda: experimental/persistent_mma.cu has its own
            stem = "_".join(source.relative_to(CSRC / "cuda").with_suffix("").parts)
            obj = out_dir / (stem + ".o")
            stale = (
                flags_changed
                or not obj.exists()
                or obj.stat().st_mtime < max(source.stat().st_mtime, newest_header)
            )
            if stale:
                cmd = [nvcc, *flags, "-c", str(source), "-o", str(obj)]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            objects.append(str(obj))
        stamp.write_text(command_line)
        return objects


def cuda_sources() -> list[Path]:
    """The .cu files nvcc compiles: the default kernels and the experimental ones, which
    every CUDA build compiles and only CNNLSTM_FAST_EXPERIMENTAL=1 runs (docs/gpu.md)."""
    return sorted(CSRC.glob("cuda/*.cu")) + sorted(CSRC.glob("cuda/experimental/*.cu"))


def make_extension():
    sources = sorted(glob.glob(str(CSRC / "*.cpp")) + glob.glob(str(CSRC / "cpu" / "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]
    # The shared libstdc++ (the one torch uses), named before g++'s implicit -lstdc++: on
    # the GPU machine the Python build's g++ (/opt/gcc) resolves -lstdc++ to a static
    # archive, and with -Bsymbolic-functions _C then ran its own copy of the C++ library,
    # whose ostream crashed on the first integer in an error message.
    link_args = ["-l:libstdc++.so.6", "-fopenmp"]
    nvcc = None
    if os.environ.get("CNNLSTM_FAST_NO_CUDA", "0") not in ("1", "true", "yes"):
        nvcc = find_nvcc()
    nvcc_config = {}
    if nvcc and cuda_sources():
        archs = cuda_archs()
        # A comma list, stringised in C++: no quotes or ';' to survive the shell.
        cxx_flags += ["-DCNNLSTM_FAST_WITH_CUDA", f"-DCNNLSTM_FAST_CUDA_ARCHS={','.join(archs)}"]
        # The static CUDA runtime, its symbols kept local to _C.
        link_args += [str(Path(cuda_lib_dir(nvcc)) / "libcudart_static.a"),
                      "-Wl,--exclude-libs,libcudart_static.a", "-ldl", "-lrt", "-lpthread"]
        nvcc_config = {"nvcc": nvcc, "flags": nvcc_flags(archs)}
        print(f"cnnlstm_fast: CUDA objects with {nvcc}, archs {archs}", flush=True)
    else:
        print("cnnlstm_fast: building CPU-only (no nvcc or CNNLSTM_FAST_NO_CUDA=1)", flush=True)
    extension = CppExtension(
        name="cnnlstm_fast._C",
        sources=sources,
        include_dirs=[str(ROOT / CSRC / "include")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_args,
    )
    return extension, nvcc_config


EXTENSION, NVCC_CONFIG = make_extension()

setup(
    name="cnnlstm_fast",
    version=read_version(),
    description="Drop-in fast LSTM/GRU/RNN layers for PyTorch with selectable backends",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cnnlstm_fast", "cnnlstm_fast.*"]),
    # auto's table of rules, read at import (cnnlstm_fast/backends/rules.py)
    package_data={"cnnlstm_fast.backends": ["rules.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        'triton; platform_system=="Linux" and platform_machine=="x86_64"',
    ],
    extras_require={
        # onnx, onnxscript, onnxruntime: the ONNX export tests (tests/test_compile.py);
        # hypothesis: the property-based parity test (tests/test_parity_fuzz.py)
        "test": ["pytest", "pytest-benchmark", "numpy", "onnx", "onnxscript", "onnxruntime",
                 "hypothesis"],
        "bench": ["rich", "matplotlib", "pytest-benchmark"],
        # sktime: the search example's datasets ship inside its wheel (nothing downloaded)
        "examples": ["scikit-learn", "matplotlib", "rich", "optuna", "sktime"],
    },
    entry_points={"console_scripts": ["cnnlstm-fast-bench = cnnlstm_fast.bench:main"]},
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtensionWithNvcc.with_options(use_ninja=True)},
    zip_safe=False,
)
