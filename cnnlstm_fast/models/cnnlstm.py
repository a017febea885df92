"""A configurable CNN-LSTM: CNN features per time step -> stacked (Bi)LSTM/GRU -> head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import GRU, LSTM, ConvToSequence

__all__ = ["CNNLSTM"]

_CONVS = ("1d", "2d")
_RNNS = {"lstm": LSTM, "gru": GRU}
_TASKS = ("classification", "regression")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


class CNNLSTM(nn.Module):
    """CNN feature extractor, a stacked optionally bidirectional LSTM or GRU, a head.

    Shapes (B batch, T time steps):

    - ``conv="1d"``: ``x`` is (B, T, C), C = ``in_channels`` features per step, e.g. a
      window of multichannel sensor readings. Each block is Conv1d over time (stride 1,
      ``padding="same"``) -> BatchNorm1d -> ReLU, so the sequence keeps all T steps.
    - ``conv="2d"``: ``x`` is (B, T, C, H, W), a clip of T frames with C channels. Each
      block is Conv2d (``padding="same"``) -> BatchNorm2d -> ReLU -> MaxPool2d(2,
      ceil_mode=True), applied to every frame; a global average pool then gives one
      vector per frame. Any H, W >= 1 works.

    The CNN gives (B, T, conv_channels[-1]); the recurrent layers (``batch_first``,
    inter-layer ``dropout``, ``backend`` passed through) give (B, T, D) with D =
    ``hidden_size * (2 if bidirectional else 1)``. The sequence is pooled to (B, D):
    with ``attention=True`` by a learnt softmax over time of a linear score per step;
    otherwise the last layer's final hidden state, both directions concatenated.
    Dropout, then a linear head, give the output (B, num_outputs): class logits for
    ``task="classification"``, values for ``task="regression"``. :meth:`loss` is the
    matching loss (cross-entropy or mean squared error).
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        *,
        conv: str = "1d",
        conv_channels: Sequence[int] = (64, 64),
        kernel_size: int = 5,
        rnn: str = "lstm",
        hidden_size: int = 128,
        num_layers: int = 2,
        bidirectional: bool = True,
        attention: bool = False,
        dropout: float = 0.1,
        task: str = "classification",
        backend: str = "auto",
    ):
        super().__init__()
        _choice("conv", conv, _CONVS)
        _choice("rnn", rnn, _RNNS)
        _choice("task", task, _TASKS)
        if not conv_channels:
            raise ValueError(f"conv_channels must name at least one layer, got {conv_channels!r}")
        self.conv, self.task = conv, task
        conv_cls, norm_cls = (nn.Conv1d, nn.BatchNorm1d) if conv == "1d" else (nn.Conv2d, nn.BatchNorm2d)
        blocks, channels = [], in_channels
        for out in conv_channels:
            # No conv bias: the batch norm right after it subtracts any bias again.
            blocks += [conv_cls(channels, out, kernel_size, padding="same", bias=False), norm_cls(out), nn.ReLU()]
            if conv == "2d":
                blocks.append(nn.MaxPool2d(2, ceil_mode=True))
            channels = out
        if conv == "2d":
            blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.cnn = nn.Sequential(*blocks)
        self.rnn = _RNNS[rnn](
            channels,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
            backend=backend,
        )
        features = hidden_size * (2 if bidirectional else 1)
        self.attention = nn.Linear(features, 1) if attention else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step CNN features (B, T, conv_channels[-1]) of ``x`` (see the class docstring)."""
        want = 3 if self.conv == "1d" else 5
        if x.dim() != want:
            layout = "(B, T, C)" if self.conv == "1d" else "(B, T, C, H, W)"
            raise ValueError(f"CNNLSTM(conv={self.conv!r}): expected x of shape {layout}, got {tuple(x.shape)}")
        if self.conv == "1d":
            return self.cnn(x.transpose(1, 2)).transpose(1, 2)
        batch, steps = x.shape[:2]
        # the feature size named, not -1: an empty batch or sequence has no size to infer
        return self.cnn(x.flatten(0, 1)).view(batch, steps, self.rnn.input_size)

    def _handoff(self) -> ConvToSequence | None:
        """With conv="1d", the last block's BatchNorm1d and ReLU and the recurrent layers
        as one ConvToSequence (fused: the activated features are never written). Kept
        outside the module tree, so the state_dict and the module list stay as built; made
        again if ``cnn`` or ``rnn`` was replaced since."""
        # (unswapped, the rnn is torch.nn's again: the block would swap it back)
        if self.conv != "1d" or len(self.cnn) < 3 or not isinstance(self.rnn, (LSTM, GRU)):
            return None
        norm, act = self.cnn[-2], self.cnn[-1]
        if type(norm) is not nn.BatchNorm1d or type(act) is not nn.ReLU or act.inplace:
            return None
        block = self.__dict__.get("_conv2seq")
        if block is None or block.rnn is not self.rnn or block.norm is not norm:
            block = ConvToSequence(self.rnn, norm=norm, activation="relu")
            self.__dict__["_conv2seq"] = block  # not a submodule: no new state_dict keys
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_outputs) from ``x`` (B, T, C) for conv="1d" or (B, T, C, H, W) for "2d"."""
        block = self._handoff()
        if block is not None and x.dim() == 3:
            raw = x.transpose(1, 2)
            for layer in list(self.cnn)[:-2]:  # the convolutions up to the last one's output
                raw = layer(raw)
            seq, hidden = block(raw)
        else:
            seq, hidden = self.rnn(self.features(x))
        if self.attention is not None:
            weights = torch.softmax(self.attention(seq), dim=1)  # (B, T, 1)
            pooled = (weights * seq).sum(1)
        else:
            h_n = hidden[0] if isinstance(hidden, tuple) else hidden
            directions = 2 if self.rnn.bidirectional else 1
            pooled = h_n[-directions:].transpose(0, 1).flatten(1)
        return self.head(self.dropout(pooled))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on class indices (classification) or MSE (regression)."""
        if self.task == "classification":
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target.view_as(output))
