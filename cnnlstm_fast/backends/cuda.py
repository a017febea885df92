"""The ``cuda`` backend: the recurrence as CUDA kernels compiled by nvcc into
``cnnlstm_fast._C`` (``csrc/cuda/``), dispatched through the same torch.library ops as
the ``cpu`` backend (CUDA dispatch key, ``csrc/recurrence_cuda.cpp``).

Forward runs a persistent kernel (one cooperative launch for the sequence, one grid
barrier per step; for fp16/bf16 on tensor cores with W_hh in registers, else W_hh in
shared memory) where the shape fits co-resident on the device, else the fused per-step
kernels; backward runs per-step kernels in reverse time and one GEMM for dW_hh. These
are the kernels as verified on a GPU. ``experimental.set_kernels(cuda_forward=...)``
(``auto``, ``step``, ``persistent``, ``mma``) pins a forward path; the experimental
kernels (csrc/cuda/experimental/: the forwards ``cuda_forward="mma-pipelined"``,
``"mma-cluster"`` and ``"streamed"``, ``cuda_backward="persistent"``, ``cuda_pdl=True``,
and the default kernels' newer versions) run only with ``CNNLSTM_FAST_EXPERIMENTAL=1``
(``cnnlstm_fast/experimental.py``, which holds the pins, reads the switch and passes
the selection to the ops as arguments).
"""

from __future__ import annotations

import torch

from .. import _ext, experimental
from .base import RecurrenceSpec
from .compiled import CompiledOpsBackend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CudaBackend(CompiledOpsBackend):
    name = "cuda"
    supports = (
        "CUDA tensors in float32, float16 or bfloat16: LSTM (with or without proj_size), "
        "GRU, RNN tanh/relu, packed sequences, both directions"
    )

    def unavailable_reason(self) -> str | None:
        why = super().unavailable_reason()
        if why is not None:
            return why
        if not _ext.load().build_info()["cuda"]:
            return "cnnlstm_fast._C was built without CUDA (no nvcc at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
        return None

    def kernel_arguments(self, backward: bool) -> dict:
        return experimental.cuda_kernels().op_arguments(backward)

    def unsupported_reason(self, spec: RecurrenceSpec) -> str | None:
        if spec.device.type != "cuda":
            return f"device {spec.device} is not a CUDA device"
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} is not float32, float16 or bfloat16"
        return None
