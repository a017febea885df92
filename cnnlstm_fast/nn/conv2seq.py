"""ConvToSequence: the hand-off from a convolution's raw output to a recurrent stack.

A CNN-LSTM's convolution gives (B, C, T) (Conv1d over time) or (B, C, H, W) (Conv2d over
an image whose width is the sequence, as in CRNN); the recurrent layers want a sequence
(T, B, C) or (B, T, C). Between the two sit a batch norm, an activation and, for 2-D
maps, a reduction over the height. This block is that hand-off and the recurrent stack:

    seq = activation(norm(x))                     # x: the RAW convolution output
    seq = seq.mean(2) / seq.amax(2)               # reduce over H, for (B, C, H, W)
    seq = seq.permute(2, 0, 1)                    # (T, B, C), or (B, T, C) if batch_first
    out, h = rnn(seq)                             # or packed with ``lengths``

Status: this is the reference path, the composition above in PyTorch ops, which the
fused path will be tested against. The fused path (norm, activation and reduction
applied while the input projection's GEMM loads its panels, never materialising the
activated sequence) is not written yet: today the activated sequence is materialised
once, in the convolution's layout, and handed to the rnn as a transposed view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .rnn import GRU, LSTM, RNN

__all__ = ["ConvToSequence"]

ACTIVATIONS = {
    None: None,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "hardtanh": F.hardtanh,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}
REDUCTIONS = (None, "mean", "max")
_LAYERS = (nn.LSTM, nn.GRU, nn.RNN)


class ConvToSequence(nn.Module):
    """Raw convolution output -> norm -> activation -> (reduce over H) -> recurrent stack.

    Args:
        rnn: an LSTM, GRU or RNN, ours or torch.nn's (a torch.nn one becomes ours in
            place, as :func:`cnnlstm_fast.swap` does, with backend "auto").
        norm: None, or a BatchNorm1d (x of shape (B, C, T)) / BatchNorm2d (x of shape
            (B, C, H, W)) over the C = ``rnn.input_size`` channels, used with torch's
            training and eval semantics (batch statistics and running-stat updates in
            training).
        activation: None, "relu", "leaky_relu", "hardtanh", "gelu" or "tanh".
        reduce: None for x of shape (B, C, T); "mean" or "max" over H for x of shape
            (B, C, H, W), the sequence running along W.

    ``forward(x, lengths=None, hx=None)`` returns what ``rnn`` returns on the sequence;
    with ``lengths`` (B lengths, each in [1, T]), what it returns on
    ``pack_padded_sequence(seq, lengths, batch_first=rnn.batch_first,
    enforce_sorted=False)``, its output padded back with ``pad_packed_sequence`` (to T
    steps). The state_dict holds ``rnn.*`` and ``norm.*``.
    """

    def __init__(self, rnn: nn.Module, *, norm: nn.Module | None = None,
                 activation: str | None = "relu", reduce: str | None = None):
        super().__init__()
        if not isinstance(rnn, _LAYERS):
            raise TypeError("ConvToSequence: rnn must be an LSTM, GRU or RNN (cnnlstm_fast's "
                            f"or torch.nn's), got {type(rnn).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError("ConvToSequence: activation must be one of "
                             f"{tuple(ACTIVATIONS)}, got {activation!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"ConvToSequence: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if norm is not None:
            want = nn.BatchNorm1d if reduce is None else nn.BatchNorm2d
            if not isinstance(norm, want):
                shape = "(B, C, T)" if reduce is None else "(B, C, H, W)"
                raise TypeError(f"ConvToSequence: norm must be None or a {want.__name__} (x of "
                                f"shape {shape} with reduce={reduce!r}), got {type(norm).__name__}")
            if norm.num_features != rnn.input_size:
                raise ValueError("ConvToSequence: norm.num_features must equal rnn.input_size "
                                 f"({rnn.input_size}), got {norm.num_features}")
        if not isinstance(rnn, (LSTM, GRU, RNN)):
            from .swap import swap

            swap(rnn)
        self.rnn = rnn
        self.norm = norm
        self.activation = activation
        self.reduce = reduce

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, reduce={self.reduce!r}"

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The rnn's input sequence from the raw convolution output ``x`` (checked)."""
        self._check_input(x)
        seq = x if self.norm is None else self.norm(x)
        act = ACTIVATIONS[self.activation]
        if act is not None:
            seq = act(seq)
        if self.reduce == "mean":
            seq = seq.mean(2)
        elif self.reduce == "max":
            seq = seq.amax(2)
        # (B, C, T) -> (B, T, C) or (T, B, C): a view, the projection reads it in place
        return seq.transpose(1, 2) if self.rnn.batch_first else seq.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, hx=None):
        seq = self.sequence(x)
        if lengths is None:
            return self.rnn(seq, hx)
        steps = x.shape[-1]
        lengths = self._check_lengths(lengths, x.shape[0], steps)
        if x.shape[0] == 0:  # nothing to pack: the padded result is the rnn's on no rows
            return self.rnn(seq, hx)
        packed = pack_padded_sequence(seq, lengths, batch_first=self.rnn.batch_first,
                                      enforce_sorted=False)
        out, hidden = self.rnn(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=self.rnn.batch_first, total_length=steps)
        return out, hidden

    def _check_input(self, x) -> None:
        want = 3 if self.reduce is None else 4
        layout = "(B, C, T)" if want == 3 else "(B, C, H, W)"
        if not isinstance(x, torch.Tensor) or x.dim() != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ConvToSequence(reduce={self.reduce!r}): x must have shape "
                             f"{layout}, got {got}")
        if x.shape[1] != self.rnn.input_size:
            raise ValueError(f"ConvToSequence: x must have C = rnn.input_size = "
                             f"{self.rnn.input_size} channels (dim 1), got shape {tuple(x.shape)}")

    @staticmethod
    def _check_lengths(lengths, batch: int, steps: int) -> torch.Tensor:
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.numel() != batch or lengths.is_floating_point():
            raise ValueError(f"ConvToSequence: lengths must be {batch} integers (one per row "
                             f"of x), got {lengths.dtype} of shape {tuple(lengths.shape)}")
        lengths = lengths.to("cpu", torch.int64)
        # (data-dependent: not while torch.compile traces; pack_padded_sequence checks too)
        if batch and not torch.compiler.is_compiling() and (
                lengths.min() < 1 or lengths.max() > steps):
            raise ValueError(f"ConvToSequence: lengths must be in [1, {steps}] (the steps of "
                             f"x), got min {int(lengths.min())}, max {int(lengths.max())}")
        return lengths
