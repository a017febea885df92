"""Model building blocks made of our layers."""

from .cnnlstm import CNNLSTM

__all__ = ["CNNLSTM"]
