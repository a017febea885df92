"""cnnlstm_fast.experimental: the default path runs only GPU-verified kernels; the
kernel pins (set_kernels) reach an experimental kernel only with
CNNLSTM_FAST_EXPERIMENTAL=1. On CPU: the pins as process settings, the selection the
cuda backend passes to the ops, the triton backward's mode and launch options, what
result files record, and the ops' schema that carries the selection."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from cnnlstm_fast import experimental
from cnnlstm_fast.backends import get_backend
from cnnlstm_fast.experimental import (CudaKernels, cuda_kernels, get_kernels, set_kernels,
                                       use_kernels)

DEFAULTS = {"cuda_forward": "auto", "cuda_backward": "auto", "cuda_pdl": False,
            "triton_backward": "step"}

EXPERIMENTAL_PINS = {
    "cuda_forward": ["mma-pipelined", "mma-cluster", "streamed"],
    "cuda_backward": ["persistent"],
    "cuda_pdl": [True],
}

#: The environment variables the pins were before they became settings (issue 24).
OLD_VARIABLES = ("CNNLSTM_FAST_CUDA_KERNEL", "CNNLSTM_FAST_CUDA_BACKWARD", "CNNLSTM_FAST_CUDA_PDL",
                 "CNNLSTM_FAST_TRITON_BACKWARD")


@pytest.fixture(autouse=True)
def _clean_settings(monkeypatch):
    monkeypatch.delenv(experimental.SWITCH, raising=False)
    for name in OLD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(experimental, "_warned", set())
    before = get_kernels()
    set_kernels(**DEFAULTS)
    yield
    set_kernels(**before)


def _pin(argument, value):
    set_kernels(**{argument: value})
    message = re.escape(f"set_kernels({argument}={value!r}) selects an experimental kernel")
    with pytest.warns(UserWarning, match=message):
        return cuda_kernels()


def test_default_path_is_the_verified_kernels():
    assert get_kernels() == DEFAULTS
    assert cuda_kernels() == CudaKernels("auto", "auto", False, False)
    assert cuda_kernels().op_arguments(backward=False) == dict(kernel_name="auto", pdl=False,
                                                                experimental=False)


@pytest.mark.parametrize("argument, value", [(k, v) for k, vs in EXPERIMENTAL_PINS.items()
                                             for v in vs])
def test_experimental_pins_are_ignored_without_the_switch(argument, value, monkeypatch):
    assert _pin(argument, value) == CudaKernels("auto", "auto", False, False)
    assert get_kernels()[argument] == value  # what was set, though it does not run
    monkeypatch.setenv(experimental.SWITCH, "0")
    with warnings.catch_warnings():  # warned once per value
        warnings.simplefilter("error")
        assert cuda_kernels() == CudaKernels("auto", "auto", False, False)


@pytest.mark.parametrize("argument, value", [(k, v) for k, vs in EXPERIMENTAL_PINS.items()
                                             for v in vs])
def test_experimental_pins_take_effect_with_the_switch(argument, value, monkeypatch):
    monkeypatch.setenv(experimental.SWITCH, "1")
    set_kernels(**{argument: value})
    got = cuda_kernels()
    assert got.experimental
    assert {"cuda_forward": got.forward, "cuda_backward": got.backward,
            "cuda_pdl": got.pdl}[argument] == value


def test_the_switch_alone_selects_the_default_kernels_newer_versions(monkeypatch):
    """What the ops get under the switch: the default kernels' names, experimental=True
    (csrc/recurrence_cuda.cpp then runs their unverified versions)."""
    monkeypatch.setenv(experimental.SWITCH, "1")
    assert cuda_kernels() == CudaKernels("auto", "auto", False, True)
    assert cuda_kernels().op_arguments(backward=True) == dict(kernel_name="auto", pdl=False,
                                                               experimental=True)


@pytest.mark.parametrize("kernel", ["step", "persistent", "mma"])
def test_verified_pins_act_without_the_switch(kernel):
    set_kernels(cuda_forward=kernel, cuda_backward="step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_kernels() == CudaKernels(kernel, "step", False, False)


@pytest.mark.parametrize("pins, message", [
    (dict(cuda_forward="fast"), "cuda_forward must be one of 'auto', 'step', 'persistent', "
     "'mma', 'mma-pipelined', 'mma-cluster', 'streamed', got 'fast'"),
    (dict(cuda_backward="Persistent"), "cuda_backward must be one of 'auto', 'step', "
     "'persistent', got 'Persistent'"),
    (dict(cuda_pdl="yes"), "cuda_pdl must be one of False, True, got 'yes'"),
    (dict(cuda_pdl=1), "cuda_pdl must be one of False, True, got 1"),  # a bool, not an int
    (dict(triton_backward=True), "triton_backward must be one of 'step', 'auto', "
     "'persistent', got True"),
    # one bad value and no pin changes, the good one included
    (dict(cuda_forward="step", triton_backward="fast"), "triton_backward must be one of "
     "'step', 'auto', 'persistent', got 'fast'"),
])
@pytest.mark.parametrize("switch", ["0", "1"])
def test_unknown_values_are_errors_with_or_without_the_switch(pins, message, switch,
                                                               monkeypatch):
    monkeypatch.setenv(experimental.SWITCH, switch)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        set_kernels(**pins)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        with use_kernels(**pins):
            pytest.fail("use_kernels ran its block with a bad pin")
    assert get_kernels() == DEFAULTS


def test_a_bad_switch_is_an_error_at_the_call(monkeypatch):
    monkeypatch.setenv(experimental.SWITCH, "yes")
    with pytest.raises(ValueError, match="CNNLSTM_FAST_EXPERIMENTAL must be 0 or 1, got 'yes'"):
        cuda_kernels()


def test_set_kernels_takes_only_its_keywords():
    with pytest.raises(TypeError):
        set_kernels(cuda_kernel="step")  # the old variable's name is not a pin
    with pytest.raises(TypeError):
        set_kernels("step")  # keywords only
    set_kernels()  # nothing given: nothing changes
    assert get_kernels() == DEFAULTS


def test_use_kernels_restores_every_pin_after_the_block():
    set_kernels(cuda_backward="step")
    with use_kernels(cuda_forward="persistent", triton_backward="persistent"):
        assert get_kernels() == {**DEFAULTS, "cuda_forward": "persistent",
                                 "cuda_backward": "step", "triton_backward": "persistent"}
        set_kernels(cuda_pdl=True)  # set inside the block: restored too
        with use_kernels(cuda_forward="mma"):
            assert get_kernels() == {**DEFAULTS, "cuda_forward": "mma", "cuda_backward": "step",
                                     "cuda_pdl": True, "triton_backward": "persistent"}
        assert get_kernels()["cuda_forward"] == "persistent"
    assert get_kernels() == {**DEFAULTS, "cuda_backward": "step"}
    with pytest.raises(RuntimeError, match="inside"):
        with use_kernels(cuda_forward="step"):
            raise RuntimeError("inside")
    assert get_kernels() == {**DEFAULTS, "cuda_backward": "step"}


def test_get_kernels_is_a_copy():
    pins = get_kernels()
    pins["cuda_forward"] = "step"
    assert get_kernels() == DEFAULTS


def test_the_old_environment_variables_select_nothing(monkeypatch):
    """The pins are settings now (issue 24): the variables they were are not read."""
    for name, value in zip(OLD_VARIABLES, ("step", "step", "1", "persistent")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(experimental.SWITCH, "1")
    assert get_kernels() == DEFAULTS
    assert cuda_kernels() == CudaKernels("auto", "auto", False, True)
    assert experimental.choice(experimental.TRITON_BACKWARD) == "step"


def test_the_cuda_backend_passes_the_selection_to_the_ops(monkeypatch):
    backend = get_backend("cuda")
    set_kernels(cuda_forward="streamed")
    with pytest.warns(UserWarning):
        assert backend.kernel_arguments(backward=False) == dict(kernel_name="auto", pdl=False,
                                                                experimental=False)
    monkeypatch.setenv(experimental.SWITCH, "1")
    set_kernels(cuda_backward="persistent")
    assert backend.kernel_arguments(backward=False)["kernel_name"] == "streamed"
    assert backend.kernel_arguments(backward=True) == dict(kernel_name="persistent", pdl=False,
                                                           experimental=True)
    # the cpu backend passes its own time loop setting, none of the cuda pins
    from cnnlstm_fast.backends import cpu

    assert get_backend("cpu").kernel_arguments(backward=False) == {"kernel_name": cpu.get_kernel()}


def test_triton_backward_mode_needs_the_switch_for_the_persistent_backward(monkeypatch):
    pytest.importorskip("triton")
    from cnnlstm_fast.kernels.triton import launch

    assert launch.backward_mode() == "step"
    for mode in ("auto", "persistent"):
        set_kernels(triton_backward=mode)
        with pytest.warns(UserWarning, match="ignored without CNNLSTM_FAST_EXPERIMENTAL=1"):
            assert launch.backward_mode() == "step"
        monkeypatch.setenv(experimental.SWITCH, "1")
        assert launch.backward_mode() == mode
        monkeypatch.delenv(experimental.SWITCH)
    assert launch.persistent_launch_options() == {}


def test_result_files_record_the_pins_under_the_old_variable_names(monkeypatch):
    """``environment.cuda_settings`` of every result file (cnnlstm_fast.env): the switch
    and the pins that are not the default, keyed and spelled as the environment
    variables were, which benchmarks/report.py reads in older result files too."""
    from cnnlstm_fast import env

    assert env.collect()["cuda_settings"] == dict.fromkeys(
        ("CNNLSTM_FAST_EXPERIMENTAL", *OLD_VARIABLES))
    monkeypatch.setenv(experimental.SWITCH, "1")
    with use_kernels(cuda_forward="streamed", cuda_backward="auto", cuda_pdl=True,
                     triton_backward="persistent"):
        assert experimental.recorded_settings() == {
            "CNNLSTM_FAST_EXPERIMENTAL": "1", "CNNLSTM_FAST_CUDA_KERNEL": "streamed",
            "CNNLSTM_FAST_CUDA_BACKWARD": None,  # the default
            "CNNLSTM_FAST_CUDA_PDL": "1", "CNNLSTM_FAST_TRITON_BACKWARD": "persistent"}
    assert list(env.CUDA_SETTINGS) == list(experimental.recorded_settings())


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
    for argument, values in {**EXPERIMENTAL_PINS, "triton_backward": ["persistent"]}.items():
        for value in values:
            assert f"set_kernels({argument}={value!r})" in pins


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
    with its own parameter). The CPU op takes the same schema: a kernel name both take
    ("persistent"; the CPU op refuses the cuda-only names) and pdl and experimental,
    which it ignores, all three away from their defaults."""
    from cnnlstm_fast.backends.compiled import ops

    if ops() is None:
        pytest.skip("extension not built")
    monkeypatch.setenv(experimental.SWITCH, "1")
    set_kernels(cuda_forward="persistent", cuda_pdl=True)
    assert cuda_kernels().op_arguments(backward=False) == dict(
        kernel_name="persistent", pdl=True, experimental=True)

    def run(gx, h0, c0, w_hh):
        return torch.ops.cnnlstm_fast.recurrence_forward(
            "lstm", gx, h0, c0, w_hh, None, None, None, False, True,
            **cuda_kernels().op_arguments(backward=False))[0]

    args = (torch.randn(5, 2, 16), torch.zeros(2, 4), torch.zeros(2, 4), torch.randn(16, 4))
    torch.testing.assert_close(torch.compile(run, fullgraph=True)(*args), run(*args))
