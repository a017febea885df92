"""The build/runtime report tells the truth: build_info, cuda_runtime_info, env report."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cnnlstm_fast import _ext, backends, env

_C = _ext.load()
needs_ext = pytest.mark.skipif(_C is None, reason=f"extension not built: {_ext.load_error()}")
needs_cuda_build = pytest.mark.skipif(
    _C is None or not _C.build_info()["cuda"], reason="extension built without CUDA"
)


def test_load_is_cached_and_consistent():
    assert _ext.load() is _C
    assert (_ext.load_error() is None) == (_C is not None)


@needs_ext
def test_build_info_fields():
    info = _C.build_info()
    assert info["compiler"].split()[0] in ("GCC", "Clang"), info["compiler"]
    assert info["cxx_standard"] >= 201703
    assert info["openmp"] is True, "setup.py compiles with -fopenmp"
    assert info["openmp_version"] >= 200805
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if not info["cuda"]:
        assert info["cuda_archs"] == [] and info["cuda_toolkit_version"] is None


@needs_cuda_build
def test_build_info_cuda_archs_match_build_environment():
    info = _C.build_info()
    expected = os.environ.get("CNNLSTM_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    assert info["cuda_archs"] == [a.strip().replace(".", "") for a in expected if a.strip()]
    assert info["cuda_toolkit_version"] >= 11000


@needs_cuda_build
def test_cuda_runtime_info_matches_torch():
    info = _C.cuda_runtime_info()
    assert info["compiled"] is True
    runtime = info["runtime_version"]
    assert runtime["error"] is None
    assert runtime["value"] == _C.build_info()["cuda_toolkit_version"], "cudart is static"
    count = info["device_count"]
    if torch.cuda.is_available():
        assert count["error"] is None and count["value"] == torch.cuda.device_count()
    else:
        # No usable GPU: the runtime must say why (no driver, no device), or count zero.
        assert count["value"] == 0
        assert count["error"] is None or count["error"].startswith("cudaError")


@pytest.mark.skipif(_C is None or _C.build_info()["cuda"], reason="only for CPU-only builds")
def test_cuda_runtime_info_without_cuda_says_so():
    info = _C.cuda_runtime_info()
    assert info["compiled"] is False and "without CUDA" in info["reason"]


def test_collect_matches_registry():
    info = env.collect()
    assert info["backends"] == backends.backend_report()
    assert info["available_backends"] == backends.available_backends()
    assert info["default_backend"] == backends.get_default()
    assert info["extension"]["built"] == (_C is not None)
    assert info["torch_cuda"]["available"] == torch.cuda.is_available()
    assert info["warnings"] == [], info["warnings"]


def test_env_module_json_in_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "cnnlstm_fast.env", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    info = json.loads(out)
    assert info["backends"]["reference"] is None
    assert info["backends"]["torch"] is None
    assert {"reference", "torch"} <= set(info["available_backends"])
    assert info["torch"] == torch.__version__


def test_env_module_text_report_in_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "cnnlstm_fast.env"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    assert torch.__version__ in out
    for name in backends.registered_backends():
        assert name in out
    if _C is None:
        assert "built                        no" in out


def test_extension_carries_no_copy_of_the_cpp_standard_library():
    """_C must use the process's libstdc++ (the one torch uses). A static copy linked in
    by accident (a toolkit directory holding libstdc++.a on the link path) made
    ``std::ostream << long`` in a TORCH_CHECK message crash the interpreter on the GPU
    machine. Checked on the symbol table of the built extension."""
    ext = _ext.load()
    if ext is None:
        pytest.skip(f"extension not built: {_ext.load_error()}")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed")
    symbols = subprocess.run([nm, "-C", "--defined-only", ext.__file__], capture_output=True,
                             text=True, check=True).stdout
    assert "cnnlstm_fast" in symbols, "no symbol table (stripped?): nothing to check"
    copies = [line for line in symbols.splitlines()
              if "std::locale::locale()" in line or "basic_ostream<char, std::char_traits<char> >::_M_insert<long>" in line]
    assert not copies, f"_C defines C++ standard library symbols: {copies[:5]}"


def test_source_commit_variable_overrides_the_checkout(monkeypatch):
    """A copied tree (the GPU machines) reports the commit it was copied from."""
    monkeypatch.setenv(env.SOURCE_COMMIT_VAR, "0123abcd")
    assert env.collect()["git_commit"] == "0123abcd"


def test_report_shows_a_bad_default_backend_instead_of_failing():
    env = {**os.environ, "CNNLSTM_FAST_BACKEND": "nope"}
    done = subprocess.run([sys.executable, "-m", "cnnlstm_fast.env", "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    default = json.loads(done.stdout)["default_backend"]
    assert default.startswith("error: CNNLSTM_FAST_BACKEND must be") and "'nope'" in default


def test_first_calls_from_several_threads_register_the_ops_once():
    """Four threads making the process's first calls at once: the fakes and the autograd
    formula are registered once (a second registration warns that it overrides)."""
    code = (
        "import threading, warnings, torch, cnnlstm_fast as clf\n"
        "warnings.simplefilter('error')\n"
        "m = clf.GRU(16, 32, backend='cpu'); x = torch.randn(12, 3, 16); b = threading.Barrier(4)\n"
        "errors = []\n"
        "def work():\n"
        "    b.wait()\n"
        "    try:\n"
        "        m(x)[0].sum().backward()\n"
        "    except Exception as exc:\n"
        "        errors.append(repr(exc))\n"
        "ts = [threading.Thread(target=work) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert not errors, errors\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Overriding" not in done.stderr
