"""The ``triton`` backend: fused Triton kernels of the recurrence.

Kernels and launchers live in ``cnnlstm_fast/kernels/triton/`` (per-step kernels in
``recurrence.py``, the persistent forward and backward in ``persistent.py``, launchers
and block size tables in ``launch.py``); they are imported on first use, so the
package imports without Triton. On CUDA tensors the forward uses the persistent kernel
where its co-residency assumptions hold (grid <= SM count, W_hh slice on chip, no
proj_size) and the per-step kernels otherwise; the backward runs per step. These are
the kernels as verified on a GPU. With ``CNNLSTM_FAST_EXPERIMENTAL=1``
(``cnnlstm_fast/experimental.py``; not yet run on a GPU) the backward may be pinned to
``auto`` (persistent where it fits) or ``persistent``
(``experimental.set_kernels(triton_backward=...)``), and both persistent
kernels are cooperative launches (where Triton has ``launch_cooperative_grid``): the
driver starts all their programs together, also beside other kernels (with
DistributedDataParallel, NCCL's all-reduce runs beside the backward), and refuses a
grid the GPU could never hold at once, where "auto" then runs per step. A barrier that
waits too long raises a RuntimeError instead of returning wrong values. With
``TRITON_INTERPRET=1`` the same kernels run in Triton's interpreter on CPU tensors
(per step only; that is how they are tested without a GPU).
"""

from __future__ import annotations

import os

import torch

from .base import Backend, RecurrenceSpec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    supports = (
        "CUDA tensors (CPU tensors under TRITON_INTERPRET=1) of dtype float32, float16 or "
        "bfloat16; LSTM (with proj_size), GRU, RNN tanh/relu, variable lengths, reverse"
    )

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton cannot be imported ({e})"
        if not torch.cuda.is_available() and not _interpreting():
            return (
                "no CUDA device; set TRITON_INTERPRET=1 before importing triton to run "
                "the kernels in Triton's interpreter on CPU tensors"
            )
        return None

    def unsupported_reason(self, spec: RecurrenceSpec) -> str | None:
        if spec.device.type == "cpu" and not _interpreting():
            return "device cpu needs TRITON_INTERPRET=1"
        if spec.device.type not in ("cuda", "cpu"):
            return f"device {spec.device.type} is neither cuda nor cpu (interpreter)"
        if spec.dtype not in DTYPES:
            return f"dtype {spec.dtype} is not one of float32, float16, bfloat16"
        return None

    def forward(self, spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved):
        from ..kernels.triton import launch

        return launch.forward(spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved)

    def backward(self, spec, saved, batch_sizes, d_y, d_hT, d_cT):
        from ..kernels.triton import launch

        return launch.backward(spec, saved, batch_sizes, d_y, d_hT, d_cT)
