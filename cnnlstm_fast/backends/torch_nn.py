"""The ``torch`` backend: the module runs torch.nn's own forward (cuDNN, oneDNN or
ATen's native loop). It is the baseline every benchmark compares against and the
last fallback of ``auto``."""

from __future__ import annotations

from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    whole_module = True
    supports = "everything torch.nn supports"
