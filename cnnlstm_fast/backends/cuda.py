"""The ``cuda`` backend: the recurrence as CUDA kernels compiled by nvcc into
``cnnlstm_fast._C`` (``csrc/cuda/``), dispatched through the same torch.library ops as
the ``cpu`` backend (CUDA dispatch key, ``csrc/recurrence_cuda.cpp``).

Forward runs a persistent kernel (one cooperative launch for the sequence, one grid
barrier per step; for fp16/bf16 on tensor cores with W_hh in registers, else W_hh in
shared memory) where the shape fits co-resident on the device, else the fused per-step
kernels; backward runs per-step kernels in reverse time and one GEMM for dW_hh.
``CNNLSTM_FAST_CUDA_KERNEL=auto|step|persistent|mma|mma-pipelined|mma-cluster|streamed``
and ``CNNLSTM_FAST_CUDA_BACKWARD=auto|step|persistent`` pin a path
(csrc/recurrence_cuda.cpp; ``mma-pipelined``, ``mma-cluster`` (the tensor-core forward
as one sm_90 thread-block cluster, h through distributed shared memory), ``streamed``
and the persistent backward have not run on a GPU yet, so ``auto`` does not pick them).
"""

from __future__ import annotations

import torch

from .. import _ext
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

    def unsupported_reason(self, spec: RecurrenceSpec) -> str | None:
        if spec.device.type != "cuda":
            return f"device {spec.device} is not a CUDA device"
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} is not float32, float16 or bfloat16"
        return None
