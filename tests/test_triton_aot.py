"""Every shipped Triton kernel specialisation compiles for sm_80 and sm_90, no GPU needed.

conftest.py sets TRITON_INTERPRET=1 in this process, under which ``triton.jit`` builds
interpreted functions that cannot be compiled; the compilation therefore runs in a
child process without that variable (``python -m cnnlstm_fast.kernels.triton.aot``),
using Triton's bundled ptxas. Cold, it takes ~1.5 CPU-seconds per specialisation (two
workers); Triton's cache (~/.triton/cache) makes re-runs fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from cnnlstm_fast.kernels.triton.aot import specialisations  # noqa: E402

ARCHS = (80, 90)


def test_every_kernel_compiles_ahead_of_time_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "cnnlstm_fast.kernels.triton.aot", "--arch", *map(str, ARCHS),
         "--jobs", "2"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-4000:]
    compiled = re.findall(r"^ok sm_(\d+) (\w+) (\w+) .* ptx=(\d+) cubin=(\d+)$", proc.stdout, re.M)
    expected = len(specialisations()) * len(ARCHS)
    assert len(compiled) == expected, report[-4000:]
    assert {int(a) for a, *_ in compiled} == set(ARCHS)
    assert {k for _, k, *_ in compiled} == {
        "recurrence_step_forward", "recurrence_step_backward", "recurrence_step_matmul",
        "recurrence_forward_persistent", "recurrence_backward_persistent",
    }
    assert {d for _, _, d, *_ in compiled} == {"fp32", "fp16", "bf16"}
    assert all(int(ptx) > 0 and int(cubin) > 0 for *_, ptx, cubin in compiled)


def test_specialisations_cover_every_cell_and_dtype():
    specs = specialisations()
    cells = {c["CELL"] for name, _, c in specs if name == "recurrence_step_forward"}
    assert cells == {0, 1, 2, 3}
    for kernel in ("recurrence_forward_persistent", "recurrence_backward_persistent"):
        assert {d for name, d, _ in specs if name == kernel} == {"fp32", "fp16", "bf16"}
        assert {c["CELL"] for name, _, c in specs if name == kernel} == {0, 1, 2, 3}
    assert any(c.get("PROJ") for name, _, c in specs if name == "recurrence_step_backward")
