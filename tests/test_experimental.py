"""cnnlstm_fast.experimental: the default path runs only GPU-verified kernels; the
per-kernel settings reach an experimental kernel only with CNNLSTM_FAST_EXPERIMENTAL=1.
On CPU: the selection the cuda backend passes to the ops, the triton backward's mode
and launch options, and the ops' schema that carries the selection."""

from __future__ import annotations

import warnings

import pytest
import torch

from cnnlstm_fast import experimental
from cnnlstm_fast.backends import get_backend
from cnnlstm_fast.experimental import CudaKernels, cuda_kernels

SETTINGS = ("CNNLSTM_FAST_EXPERIMENTAL", "CNNLSTM_FAST_CUDA_KERNEL", "CNNLSTM_FAST_CUDA_BACKWARD",
            "CNNLSTM_FAST_CUDA_PDL", "CNNLSTM_FAST_TRITON_BACKWARD")

EXPERIMENTAL_PINS = {
    "CNNLSTM_FAST_CUDA_KERNEL": ["mma-pipelined", "mma-cluster", "streamed"],
    "CNNLSTM_FAST_CUDA_BACKWARD": ["persistent"],
    "CNNLSTM_FAST_CUDA_PDL": ["1"],
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(experimental, "_warned", set())


def _pin(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.warns(UserWarning, match=f"{variable}={value} selects an experimental kernel"):
        return cuda_kernels()


def test_default_path_is_the_verified_kernels():
    assert cuda_kernels() == CudaKernels("auto", "auto", False, False)
    assert cuda_kernels().op_arguments(backward=False) == dict(kernel_name="auto", pdl=False,
                                                                experimental=False)


@pytest.mark.parametrize("variable, value", [(k, v) for k, vs in EXPERIMENTAL_PINS.items()
                                             for v in vs])
def test_per_kernel_switches_are_ignored_without_the_switch(variable, value, monkeypatch):
    assert _pin(monkeypatch, variable, value) == CudaKernels("auto", "auto", False, False)
    monkeypatch.setenv("CNNLSTM_FAST_EXPERIMENTAL", "0")
    with warnings.catch_warnings():  # warned once per value
        warnings.simplefilter("error")
        assert cuda_kernels() == CudaKernels("auto", "auto", False, False)


@pytest.mark.parametrize("variable, value", [(k, v) for k, vs in EXPERIMENTAL_PINS.items()
                                             for v in vs])
def test_per_kernel_switches_take_effect_with_the_switch(variable, value, monkeypatch):
    monkeypatch.setenv("CNNLSTM_FAST_EXPERIMENTAL", "1")
    monkeypatch.setenv(variable, value)
    got = cuda_kernels()
    assert got.experimental
    assert {"CNNLSTM_FAST_CUDA_KERNEL": got.forward, "CNNLSTM_FAST_CUDA_BACKWARD": got.backward,
            "CNNLSTM_FAST_CUDA_PDL": "1" if got.pdl else "0"}[variable] == value


def test_the_switch_alone_selects_the_default_kernels_newer_versions(monkeypatch):
    """What the ops get under the switch: the default kernels' names, experimental=True
    (csrc/recurrence_cuda.cpp then runs their unverified versions)."""
    monkeypatch.setenv("CNNLSTM_FAST_EXPERIMENTAL", "1")
    assert cuda_kernels() == CudaKernels("auto", "auto", False, True)
    assert cuda_kernels().op_arguments(backward=True) == dict(kernel_name="auto", pdl=False,
                                                               experimental=True)


@pytest.mark.parametrize("kernel", ["step", "persistent", "mma"])
def test_verified_pins_act_without_the_switch(kernel, monkeypatch):
    monkeypatch.setenv("CNNLSTM_FAST_CUDA_KERNEL", kernel)
    monkeypatch.setenv("CNNLSTM_FAST_CUDA_BACKWARD", "step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_kernels() == CudaKernels(kernel, "step", False, False)


@pytest.mark.parametrize("variable, value, message", [
    ("CNNLSTM_FAST_EXPERIMENTAL", "yes", "CNNLSTM_FAST_EXPERIMENTAL must be 0 or 1, got 'yes'"),
    ("CNNLSTM_FAST_CUDA_KERNEL", "fast", "CNNLSTM_FAST_CUDA_KERNEL must be one of auto, step, "
     "persistent, mma, mma-pipelined, mma-cluster, streamed, got 'fast'"),
    ("CNNLSTM_FAST_CUDA_PDL", "yes", "CNNLSTM_FAST_CUDA_PDL must be one of 0, 1, got 'yes'"),
])
def test_unknown_values_are_errors_with_or_without_the_switch(variable, value, message,
                                                               monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        cuda_kernels()
    if variable != "CNNLSTM_FAST_EXPERIMENTAL":
        monkeypatch.setenv("CNNLSTM_FAST_EXPERIMENTAL", "1")
        with pytest.raises(ValueError, match=message):
            cuda_kernels()


def test_the_cuda_backend_passes_the_selection_to_the_ops(monkeypatch):
    backend = get_backend("cuda")
    monkeypatch.setenv("CNNLSTM_FAST_CUDA_KERNEL", "streamed")
    with pytest.warns(UserWarning):
        assert backend.kernel_arguments(backward=False) == dict(kernel_name="auto", pdl=False,
                                                                experimental=False)
    monkeypatch.setenv("CNNLSTM_FAST_EXPERIMENTAL", "1")
    monkeypatch.setenv("CNNLSTM_FAST_CUDA_BACKWARD", "persistent")
    assert backend.kernel_arguments(backward=False)["kernel_name"] == "streamed"
    assert backend.kernel_arguments(backward=True) == dict(kernel_name="persistent", pdl=False,
                                                           experimental=True)
    # the cpu backend passes its own time loop setting (cnnlstm_fast.backends.cpu.set_kernel)
    assert get_backend("cpu").kernel_arguments(backward=False) == {"kernel_name": "auto"}


def test_triton_backward_mode_needs_the_switch_for_the_persistent_backward(monkeypatch):
    pytest.importorskip("triton")
    from cnnlstm_fast.kernels.triton import launch

    assert launch.backward_mode() == "step"
    for mode in ("auto", "persistent"):
        monkeypatch.setenv("CNNLSTM_FAST_TRITON_BACKWARD", mode)
        with pytest.warns(UserWarning, match="ignored without CNNLSTM_FAST_EXPERIMENTAL=1"):
            assert launch.backward_mode() == "step"
        monkeypatch.setenv("CNNLSTM_FAST_EXPERIMENTAL", "1")
        assert launch.backward_mode() == mode
        monkeypatch.delenv("CNNLSTM_FAST_EXPERIMENTAL")
    assert launch.persistent_launch_options() == {}


def test_op_schemas_carry_the_selection_with_the_verified_defaults():
    from cnnlstm_fast.backends.compiled import ops

    if ops() is None:
        pytest.skip("extension not built")
    for op in (torch.ops.cnnlstm_fast.recurrence_forward,
               torch.ops.cnnlstm_fast.recurrence_backward):
        arguments = {a.name: a for a in op.default._schema.arguments}
        assert arguments["kernel_name"].default_value == "auto"
        assert arguments["pdl"].default_value is False
        assert arguments["experimental"].default_value is False


def test_every_experimental_kernel_is_listed_once():
    keys = [k.key for k in experimental.KERNELS]
    assert len(keys) == len(set(keys))
    pins = {k.selected_by for k in experimental.KERNELS if k.selected_by}
    for variable, values in EXPERIMENTAL_PINS.items():
        for value in values:
            assert f"{variable}={value}" in pins
    assert "CNNLSTM_FAST_TRITON_BACKWARD=persistent" in pins


def test_the_gpu_sessions_report_attributes_each_test_to_its_kernels(tmp_path):
    """``--experimental-report`` (tests/conftest.py), as benchmarks/gpu_session.sh runs
    it under the switch: a marked test counts for the kernels it names, an unmarked one
    for the default kernels' newer versions; a failure fails only its kernels."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_kernels.py").write_text(
        "import pytest\n"
        "@pytest.mark.experimental('cuda-streamed')\n"
        "def test_streamed():\n    pass\n"
        "@pytest.mark.experimental('cuda-pdl')\n"
        "def test_pdl():\n    assert False\n"
        "def test_default_path():\n    pass\n")
    out = tmp_path / "report.json"
    env = {**os.environ, "CNNLSTM_FAST_EXPERIMENTAL": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    str(tmp_path), "--experimental-report", str(out)],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["switch"] and report["complete"] and report["exitstatus"] == 1
    kernels = report["kernels"]
    assert kernels["cuda-streamed"]["result"] == "pass"
    assert kernels["cuda-pdl"]["result"] == "fail"
    assert kernels["cuda-pdl"]["failures"] == ["test_kernels.py::test_pdl"]
    assert kernels["cuda-mma-pass-start-loads"]["result"] == "pass"  # test_default_path
    assert kernels["cuda-mma-cluster"]["result"] == "not run"


def test_the_selection_passes_through_inductor(monkeypatch):
    """The cuda backend calls the ops with the selection as keywords; inductor lowers
    the op as a fallback kernel and must take them (an argument named `kernel` clashed
    with its own parameter). The CPU op takes the same schema (its kernel_name names the
    cpu time loop, so the cuda selection's is replaced by one of those here)."""
    from cnnlstm_fast.backends.compiled import ops

    if ops() is None:
        pytest.skip("extension not built")
    monkeypatch.setenv("CNNLSTM_FAST_EXPERIMENTAL", "1")
    monkeypatch.setenv("CNNLSTM_FAST_CUDA_KERNEL", "streamed")

    def run(gx, h0, c0, w_hh):
        return torch.ops.cnnlstm_fast.recurrence_forward(
            "lstm", gx, h0, c0, w_hh, None, None, None, False, True,
            **{**cuda_kernels().op_arguments(backward=False), "kernel_name": "per_step"})[0]

    args = (torch.randn(5, 2, 16), torch.zeros(2, 4), torch.zeros(2, 4), torch.randn(16, 4))
    torch.testing.assert_close(torch.compile(run, fullgraph=True)(*args), run(*args))
