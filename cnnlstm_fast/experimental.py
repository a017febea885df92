"""Which GPU kernels may run: only GPU-verified ones unless ``CNNLSTM_FAST_EXPERIMENTAL=1``.

A kernel, or a change to a kernel, reaches the default path only once a GPU session has
passed its tests at the commit that ships it (docs/gpu.md). Until then it is
experimental: compiled in every build and tested on CPU where it can be, but run only
with the one switch ``CNNLSTM_FAST_EXPERIMENTAL=1`` (an environment variable, read here
at each call). Under it:

- the default kernels run their newer, unverified versions (the ``KERNELS`` below that
  nothing else selects: the cuda tensor-core forward's loads at the pass start, packed
  row counts written on the device, the triton persistent kernels' cooperative launch);
- the kernel pins of :func:`set_kernels` may name the opt-in kernels (the other
  ``KERNELS``).

The pins are process settings, set from Python (:func:`set_kernels`, or the context
manager :func:`use_kernels`; :func:`get_kernels` reads them): ``cuda_forward``,
``cuda_backward``, ``cuda_pdl`` and ``triton_backward``. Each has verified values and
experimental ones. Without the switch an experimental value is ignored, with a warning
(once per value) when a call would have used it: the default path is fixed. Verified
values (``cuda_forward="step"``, ...) act as ever, and a value a pin does not take is a
ValueError from :func:`set_kernels`, with or without the switch. They are read at each
call; the cuda backend passes what it selects to the compiled ops as arguments (the C++
reads no environment variable), the triton launcher uses it itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
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
           "the previous pass", "set_kernels(cuda_forward='mma-pipelined')"),
    Kernel("cuda-mma-cluster", "cuda tensor-core forward as one thread-block cluster (sm_90)",
           "set_kernels(cuda_forward='mma-cluster')"),
    Kernel("cuda-streamed", "cuda forward streaming W_hh from L2 in one cooperative launch",
           "set_kernels(cuda_forward='streamed')"),
    Kernel("cuda-persistent-backward", "cuda backward in one cooperative launch",
           "set_kernels(cuda_backward='persistent')"),
    Kernel("cuda-pdl", "cuda per-step kernels with programmatic dependent launch (sm_90)",
           "set_kernels(cuda_pdl=True)"),
    Kernel("cuda-step-floor", "the per-step floor measurement (benchmark only, on no "
           "recurrence path, so it runs without the switch)",
           "the cnnlstm_fast::step_floor op (python -m cnnlstm_fast.bench.floor)"),
    Kernel("triton-cooperative-launch", "triton persistent kernels as cooperative launches"),
    Kernel("triton-persistent-backward", "triton backward in one launch per layer",
           "set_kernels(triton_backward='persistent')"),
)


def enabled() -> bool:
    """Whether ``CNNLSTM_FAST_EXPERIMENTAL`` is 1 (unset, empty or 0: not); read at each
    call."""
    value = os.environ.get(SWITCH) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{SWITCH} must be 0 or 1, got {value!r}")
    return value == "1"


@dataclass(frozen=True)
class Setting:
    """A kernel pin of :func:`set_kernels`: its keyword ``argument``, the values the
    default path honours (the first is the default), those that select an experimental
    kernel, and ``record_key``, the name result files record it under (``cuda_settings``
    of cnnlstm_fast.env: the environment variable the pin was until it became a setting,
    so that older result files and newer ones read alike)."""

    argument: str
    verified: tuple
    experimental: tuple
    record_key: str

    @property
    def default(self):
        return self.verified[0]

    def check(self, value):
        """``value`` if the pin takes it, else a ValueError naming the argument, the values
        it takes and the value given (a pin of booleans takes only ``bool``; one of names
        only ``str``)."""
        allowed = self.verified + self.experimental
        typed = (isinstance(value, bool) if isinstance(self.default, bool)
                 else isinstance(value, str))
        if not typed or value not in allowed:
            raise ValueError(f"{self.argument} must be one of "
                             f"{', '.join(map(repr, allowed))}, got {value!r}")
        return value

    def recorded(self, value) -> str | None:
        """``value`` as a result file records it: None for the default, ``"1"``/``"0"``
        for a boolean (as the environment variable was spelled), else the name."""
        if value == self.default:
            return None
        if isinstance(value, bool):
            return "1" if value else "0"
        return value


CUDA_FORWARD = Setting("cuda_forward", ("auto", "step", "persistent", "mma"),
                       ("mma-pipelined", "mma-cluster", "streamed"), "CNNLSTM_FAST_CUDA_KERNEL")
CUDA_BACKWARD = Setting("cuda_backward", ("auto", "step"), ("persistent",),
                        "CNNLSTM_FAST_CUDA_BACKWARD")
CUDA_PDL = Setting("cuda_pdl", (False,), (True,), "CNNLSTM_FAST_CUDA_PDL")
TRITON_BACKWARD = Setting("triton_backward", ("step",), ("auto", "persistent"),
                          "CNNLSTM_FAST_TRITON_BACKWARD")
SETTINGS = (CUDA_FORWARD, CUDA_BACKWARD, CUDA_PDL, TRITON_BACKWARD)
_BY_ARGUMENT = {s.argument: s for s in SETTINGS}

_lock = threading.Lock()
# The pins in effect, by argument: replaced whole by set_kernels, never changed in place,
# so a call reading it on another thread sees the old pins or the new ones, not a mix.
_pins: dict = {s.argument: s.default for s in SETTINGS}
_warned: set[tuple[str, object]] = set()


def set_kernels(*, cuda_forward: str | None = None, cuda_backward: str | None = None,
                cuda_pdl: bool | None = None, triton_backward: str | None = None) -> None:
    """Pins GPU kernels for the whole process; an argument left None keeps its pin.

    - ``cuda_forward``: the ``cuda`` forward kernel: ``"auto"`` (the default),
      ``"step"``, ``"persistent"`` or ``"mma"`` (the tensor-core kernel); experimental:
      ``"mma-pipelined"``, ``"mma-cluster"`` (sm_90), ``"streamed"``. A pinned kernel
      that cannot run a shape makes that call an error.
    - ``cuda_backward``: the ``cuda`` backward: ``"auto"`` (the default, = ``"step"``),
      ``"step"``; experimental: ``"persistent"``.
    - ``cuda_pdl``: ``False`` (the default); experimental: ``True``, the ``cuda``
      per-step kernels with programmatic dependent launch (sm_90).
    - ``triton_backward``: the ``triton`` backward: ``"step"`` (the default);
      experimental: ``"auto"`` (persistent where it fits) and ``"persistent"``.

    Experimental values take effect only with ``CNNLSTM_FAST_EXPERIMENTAL=1``; without
    it a call runs the default instead, with a warning. A value a pin does not take is a
    ValueError naming the argument, its values and the value given, and then no pin
    changes. Read at each forward and backward call: a call running on another thread
    meanwhile may run its forward with the old pins and its backward with the new ones,
    so set them between calls. Unlike an environment variable they reach a process
    started from this one only where it is forked; a spawned worker or a new interpreter
    starts with the defaults and sets its own."""
    global _pins
    given = {name: value for name, value in (
        ("cuda_forward", cuda_forward), ("cuda_backward", cuda_backward),
        ("cuda_pdl", cuda_pdl), ("triton_backward", triton_backward)) if value is not None}
    for name, value in given.items():
        _BY_ARGUMENT[name].check(value)
    with _lock:
        _pins = {**_pins, **given}


def get_kernels() -> dict:
    """The pins (:func:`set_kernels`) as a dict of its arguments, e.g. ``{"cuda_forward":
    "auto", "cuda_backward": "auto", "cuda_pdl": False, "triton_backward": "step"}``: what
    was set, experimental values included whether or not the switch lets them run."""
    return dict(_pins)


@contextlib.contextmanager
def use_kernels(**pins) -> Iterator[None]:
    """``with use_kernels(cuda_forward="step"): ...`` runs the block with those pins
    (:func:`set_kernels`, same arguments) and restores every pin as it was before after
    it. Process-wide, not per thread."""
    before = get_kernels()
    set_kernels(**pins)
    try:
        yield
    finally:
        set_kernels(**before)


def choice(setting: Setting, experimental: bool | None = None):
    """The value of ``setting`` in effect: its pin, an experimental value only where
    ``experimental`` (None: ``enabled()``), else the default, with a warning once per
    value."""
    value = _pins[setting.argument]
    if value in setting.verified:
        return value
    if enabled() if experimental is None else experimental:
        return value
    if (setting.argument, value) not in _warned and not torch.compiler.is_compiling():
        _warned.add((setting.argument, value))
        warnings.warn(f"set_kernels({setting.argument}={value!r}) selects an experimental "
                      f"kernel (not yet verified on a GPU) and is ignored without {SWITCH}=1; "
                      f"running the default ({setting.default!r})", stacklevel=3)
    return setting.default


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
    """The cuda kernels the pins and the switch select (see the module docstring)."""
    on = enabled()
    return CudaKernels(choice(CUDA_FORWARD, on), choice(CUDA_BACKWARD, on),
                       choice(CUDA_PDL, on), on)


def recorded_settings() -> dict:
    """What a result file records of the GPU kernel selection (``cuda_settings`` of
    cnnlstm_fast.env): the switch as the environment has it and each pin where it is not
    the default (:meth:`Setting.recorded`), under its ``record_key``."""
    pins = get_kernels()
    return {SWITCH: os.environ.get(SWITCH),
            **{s.record_key: s.recorded(pins[s.argument]) for s in SETTINGS}}
