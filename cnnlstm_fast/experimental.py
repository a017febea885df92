"""Which GPU kernels may run: only GPU-verified ones unless ``CNNLSTM_FAST_EXPERIMENTAL=1``.

A kernel, or a change to a kernel, reaches the default path only once a GPU session has
passed its tests at the commit that ships it (docs/gpu.md). Until then it is
experimental: compiled in every build and tested on CPU where it can be, but run only
with the one switch ``CNNLSTM_FAST_EXPERIMENTAL=1``. Under it:

- the default kernels run their newer, unverified versions (the ``KERNELS`` below that
  nothing else selects: the cuda tensor-core forward's loads at the pass start, packed
  row counts written on the device, the triton persistent kernels' cooperative launch);
- the per-kernel settings may name the opt-in kernels (the other ``KERNELS``).

Without it those settings' experimental values are ignored, with a warning: the default
path is fixed. Their verified values (``CNNLSTM_FAST_CUDA_KERNEL=step``, ...) and
invalid values (an error) act as ever. The environment is read here, at each call; the
cuda backend passes what it selects to the compiled ops as arguments.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

SWITCH = "CNNLSTM_FAST_EXPERIMENTAL"


@dataclass(frozen=True)
class Kernel:
    """An experimental kernel: ``key`` (as in the GPU verification's report and the
    kernel status of docs/gpu.md), what it is, and what selects it under the switch
    (None: the switch alone, it is a default kernel's newer version)."""

    key: str
    what: str
    selected_by: str | None = None


KERNELS = (
    Kernel("cuda-mma-pass-start-loads", "cuda tensor-core forward loading each pass's G_x, "
           "c and h at the pass start"),
    Kernel("cuda-device-row-counts", "cuda packed row counts written on the device "
           "(write_row_runs), no host copy: packed input capturable in a CUDA graph"),
    Kernel("cuda-mma-pipelined", "cuda tensor-core forward loading each pass's inputs during "
           "the previous pass", "CNNLSTM_FAST_CUDA_KERNEL=mma-pipelined"),
    Kernel("cuda-mma-cluster", "cuda tensor-core forward as one thread-block cluster (sm_90)",
           "CNNLSTM_FAST_CUDA_KERNEL=mma-cluster"),
    Kernel("cuda-streamed", "cuda forward streaming W_hh from L2 in one cooperative launch",
           "CNNLSTM_FAST_CUDA_KERNEL=streamed"),
    Kernel("cuda-persistent-backward", "cuda backward in one cooperative launch",
           "CNNLSTM_FAST_CUDA_BACKWARD=persistent"),
    Kernel("cuda-pdl", "cuda per-step kernels with programmatic dependent launch (sm_90)",
           "CNNLSTM_FAST_CUDA_PDL=1"),
    Kernel("cuda-step-floor", "the per-step floor measurement (benchmark only, on no "
           "recurrence path, so it runs without the switch)",
           "the cnnlstm_fast::step_floor op (python -m cnnlstm_fast.bench.floor)"),
    Kernel("triton-cooperative-launch", "triton persistent kernels as cooperative launches"),
    Kernel("triton-persistent-backward", "triton backward in one launch per layer",
           "CNNLSTM_FAST_TRITON_BACKWARD=persistent"),
)


def enabled() -> bool:
    """Whether ``CNNLSTM_FAST_EXPERIMENTAL`` is 1 (unset, empty or 0: not)."""
    value = os.environ.get(SWITCH) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{SWITCH} must be 0 or 1, got {value!r}")
    return value == "1"


@dataclass(frozen=True)
class Setting:
    """A per-kernel environment variable: the values the default path honours (the first
    is the default) and those that select an experimental kernel."""

    variable: str
    verified: tuple[str, ...]
    experimental: tuple[str, ...]


CUDA_KERNEL = Setting("CNNLSTM_FAST_CUDA_KERNEL", ("auto", "step", "persistent", "mma"),
                      ("mma-pipelined", "mma-cluster", "streamed"))
CUDA_BACKWARD = Setting("CNNLSTM_FAST_CUDA_BACKWARD", ("auto", "step"), ("persistent",))
CUDA_PDL = Setting("CNNLSTM_FAST_CUDA_PDL", ("0",), ("1",))
TRITON_BACKWARD = Setting("CNNLSTM_FAST_TRITON_BACKWARD", ("step",), ("auto", "persistent"))
SETTINGS = (CUDA_KERNEL, CUDA_BACKWARD, CUDA_PDL, TRITON_BACKWARD)

_warned: set[tuple[str, str]] = set()


def choice(setting: Setting, experimental: bool | None = None) -> str:
    """The value of ``setting`` in effect: its variable's value (unset or empty: the
    default), an experimental value only where ``experimental`` (None: ``enabled()``),
    else the default, with a warning once per value. A value it does not know is an
    error naming the variable and the values it takes."""
    value = os.environ.get(setting.variable) or setting.verified[0]
    if value in setting.verified:
        return value
    if value not in setting.experimental:
        values = ", ".join(setting.verified + setting.experimental)
        raise ValueError(f"{setting.variable} must be one of {values}, got {value!r}")
    if enabled() if experimental is None else experimental:
        return value
    if (setting.variable, value) not in _warned and not torch.compiler.is_compiling():
        _warned.add((setting.variable, value))
        warnings.warn(f"{setting.variable}={value} selects an experimental kernel (not yet "
                      f"verified on a GPU) and is ignored without {SWITCH}=1; running the "
                      f"default ({setting.verified[0]})", stacklevel=3)
    return setting.verified[0]


@dataclass(frozen=True)
class CudaKernels:
    """The cuda backend's kernels for a call, the ops' ``kernel_name``, ``pdl`` and
    ``experimental`` arguments (csrc/recurrence_cuda.cpp)."""

    forward: str = "auto"
    backward: str = "auto"
    pdl: bool = False
    experimental: bool = False

    def op_arguments(self, backward: bool) -> dict:
        return dict(kernel_name=self.backward if backward else self.forward, pdl=self.pdl,
                    experimental=self.experimental)


def cuda_kernels() -> CudaKernels:
    """The cuda kernels the environment selects (see the module docstring)."""
    on = enabled()
    return CudaKernels(choice(CUDA_KERNEL, on), choice(CUDA_BACKWARD, on),
                       choice(CUDA_PDL, on) == "1", on)
