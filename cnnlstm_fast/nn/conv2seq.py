"""ConvToSequence: the hand-off from a convolution's raw output to a recurrent stack.

A CNN-LSTM's convolution gives (B, C, T) (Conv1d over time) or (B, C, H, W) (Conv2d over
an image whose width is the sequence, as in CRNN); the recurrent layers want a sequence
(T, B, C) or (B, T, C). Between the two sit a batch norm, an activation and, for 2-D
maps, a reduction over the height. This block is that hand-off and the recurrent stack:

    seq = activation(norm(x))                     # x: the RAW convolution output
    seq = seq.mean(2) / seq.amax(2)               # reduce over H, for (B, C, H, W)
    seq = seq.permute(2, 0, 1)                    # (T, B, C), or (B, T, C) if batch_first
    out, h = rnn(seq)                             # or packed with ``lengths``

The fused path computes the first layer's G_x of every direction straight from ``x``
(:func:`cnnlstm_fast.ops.conv2seq.projection`): the norm folded to a per-channel affine,
the activation and the reduction applied while the GEMM packs its row tiles, so the
activated sequence is never written and ``x`` is read once for both directions. The
recurrence then runs on the rnn's backend; with ``lengths``, G_x is written in the
packed sequence's sorted order and the rnn runs on the packed layout. It is taken where
the rnn runs one of our backends, outside autocast and torch.func transforms, with x, hx and the weights of one dtype; otherwise the block runs the
composition above (``sequence`` then ``rnn``), which is also what the fused path is
tested against.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import backends
from ..ops import conv2seq
from ..ops.conv2seq import ACTIVATIONS, REDUCTIONS
from ..ops.recurrence import transforms_active
from .rnn import GRU, LSTM, RNN, _split_bias

__all__ = ["ConvToSequence"]
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
        conv2seq._op()  # the extension loaded and the op registered, before any compile
        self.rnn = rnn
        self.norm = norm
        self.activation = activation
        self.reduce = reduce

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, reduce={self.reduce!r}"

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The rnn's input sequence from the raw convolution output ``x`` (checked)."""
        self._check_input(x)
        seq = conv2seq.reference_sequence(x, self.norm, self.activation, self.reduce)
        # (B, C, T) -> (B, T, C) or (T, B, C): a view, the projection reads it in place
        return seq.transpose(1, 2) if self.rnn.batch_first else seq.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, hx=None):
        self._check_input(x)
        steps = x.shape[-1]
        if lengths is not None:
            lengths = self._check_lengths(lengths, x.shape[0], steps)
        fused = self._fused(x, hx, lengths)
        if fused is not None:
            return fused
        seq = self.sequence(x)
        if lengths is None:
            return self.rnn(seq, hx)
        if x.shape[0] == 0:  # nothing to pack: the padded result is the rnn's on no rows
            return self.rnn(seq, hx)
        packed = pack_padded_sequence(seq, lengths, batch_first=self.rnn.batch_first,
                                      enforce_sorted=False)
        out, hidden = self.rnn(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=self.rnn.batch_first, total_length=steps)
        return out, hidden

    def _fused(self, x: torch.Tensor, hx, lengths):
        """The rnn's result from the fused projection, or None where it does not apply
        (``x`` and ``lengths`` already checked)."""
        rnn = self.rnn
        batch, steps = x.shape[0], x.shape[-1]
        if (batch == 0 or steps == 0 or hx is not None and not _plain_state(hx, x)
                or torch.is_autocast_enabled(x.device.type) or transforms_active()
                or any(w.dtype != x.dtype or w.device != x.device for w in rnn._flat_weights)
                or backends.resolve_early(rnn.backend, x, steps) is not None):
            return None
        # what the rnn would be handed, for its checks and its backend choice: the
        # sequence's shape, dtype and requires_grad without its values (nothing read)
        # (a zero-stride view of x: requires_grad as x has it, nothing copied or created
        # that torch.compile would see leak out of the graph)
        def value(*shape):
            return x.as_strided(shape, [0] * len(shape))

        order = None
        if lengths is None:
            shape = (batch, steps, x.shape[1]) if rnn.batch_first else (steps, batch, x.shape[1])
            dummy = value(*shape)
            rows, ragged = batch, False
        else:
            # pack_padded_sequence(enforce_sorted=False)'s layout, without the data: the
            # rows sorted by length, longest first; G_x is written in that order
            sorted_lengths, sorted_indices = torch.sort(lengths, descending=True)
            order = torch.empty_like(sorted_indices).scatter_(
                0, sorted_indices, torch.arange(batch))
            longest = int(sorted_lengths[0])
            batch_sizes = (sorted_lengths.unsqueeze(0) > torch.arange(longest).unsqueeze(1)).sum(1)
            dummy = PackedSequence(value(int(lengths.sum()), x.shape[1]), batch_sizes,
                                   sorted_indices.to(x.device), order.to(x.device))
            rows, steps = batch, longest
            ragged = bool(batch_sizes[0] != batch_sizes[-1])
        try:
            backend, spec, dtypes = rnn._resolve(
                dummy.data if order is not None else dummy, rows, steps, order is not None, hx,
                ragged)
        except backends.BackendUnavailableError:
            return None
        if backend.whole_module or dtypes.error is not None or dtypes.compute != x.dtype:
            return None
        directions = 2 if rnn.bidirectional else 1
        weights, biases = [], []
        for d in range(directions):
            names = rnn._all_weights[d]
            w = [getattr(rnn, name) for name in names]
            weights.append(w[0])
            b_ih, b_hh = (w[2], w[3]) if rnn.bias else (None, None)
            biases.append(_split_bias(spec.cell, b_ih, b_hh, rnn.hidden_size)[0])
        w_ih = weights[0] if directions == 1 else torch.cat(weights)
        bias = None if biases[0] is None else (
            biases[0] if directions == 1 else torch.cat(biases))
        scale, shift = conv2seq.fold_norm(self.norm, x)
        # (the norm's statistics over all of x, padding included, as the plain norm has
        # them; G_x only for the longest sequence's steps: x[..., :steps] is a view)
        gx = conv2seq.projection(x if steps == x.shape[-1] else x[..., :steps], scale, shift,
                                 self.activation, self.reduce, w_ih, bias, directions, order)
        if order is None:
            return rnn._forward_recurrence(backend, spec, dtypes, dummy, hx, first_gx=gx)
        out, hidden = rnn._forward_recurrence(backend, spec, dtypes, dummy, hx, first_gx=gx)
        out, _ = pad_packed_sequence(out, batch_first=rnn.batch_first, total_length=x.shape[-1])
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


def _plain_state(hx, x) -> bool:
    """Whether hx holds 3-D tensors of x's dtype and device (the rnn checks the rest)."""
    states = hx if isinstance(hx, (tuple, list)) else (hx,)
    return all(isinstance(h, torch.Tensor) and h.dim() == 3 and h.dtype == x.dtype
               and h.device == x.device for h in states)
