"""The recurrence contract every backend implements.

A backend computes the recurrence of ONE layer in ONE direction. The input projection
``G_x = x @ W_ih^T + b`` has already been done outside (one large GEMM per layer and
direction, by the backend's ``input_projection``: ``F.linear`` unless the backend has a
faster GEMM); dW_ih, dx and the bias gradients come from ``dG_x`` through its autograd.

Shapes (T steps, B batch rows, H hidden units, Hout = proj_size or H, g gates):

forward(spec, G_x (T,B,gH), h0 (B,Hout), c0 (B,H) | None, W_hh (gH,Hout),
        W_hr (Hout,H) | None, b_hn (H,) | None, batch_sizes (T,) int64 CPU | None,
        need_saved) -> (Y (T,B,Hout), h_T (B,Hout), c_T (B,H) | None, saved tuple)

backward(spec, saved, batch_sizes, dY, dh_T, dc_T | None)
        -> (dG_x, dh0, dc0 | None, dW_hh, dW_hr | None, db_hn | None)

Gate order is torch's: LSTM (i, f, g, o); GRU (r, z, n) with
``n = tanh(G_x_n + r * (h @ W_hn^T + b_hn))``; RNN a single gate. For LSTM and RNN
the whole bias (b_ih + b_hh) is folded into G_x; for GRU only b_hr and b_hz are, and
b_hn stays inside the recurrence because r multiplies it.

Variable lengths: batch_sizes[t] rows are active at step t (sorted by decreasing
length, as in a PackedSequence). Inactive rows keep their state and have Y == 0 and
dG_x == 0 there. A reverse direction walks t from T-1 down to 0, so each row starts at
its own last element from h0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@dataclass(frozen=True)
class RecurrenceSpec:
    """What a backend needs to know to decide whether it can run a recurrence."""

    cell: str
    hidden_size: int
    proj_size: int
    reverse: bool
    device: torch.device
    dtype: torch.dtype
    batch: int
    steps: int
    variable_lengths: bool
    #: whether autograd will need the backward (grad mode on and the input or a weight
    #: requires grad); ``auto`` rules may differ for inference and training.
    needs_grad: bool = False
    #: the module the call belongs to, as the tuning record keys it (``backends/tuned.py``):
    #: ``(kind, input_size, layers, directions)``, kind "seq" for LSTM/GRU/RNN and "cell"
    #: for the cells; empty where no module asked (the record is not consulted then).
    layer: tuple = ()

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def out_size(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size


class Backend:
    """Base class of the recurrence backends.

    ``whole_module`` backends (only ``torch``) run the module's forward themselves
    instead of the per-layer recurrence.
    """

    name: str = ""
    whole_module: bool = False
    #: Human-readable summary used in "does not support" errors.
    supports: str = ""

    def unavailable_reason(self) -> str | None:
        """None when the backend can run on this machine, else why not."""
        return None

    def unsupported_reason(self, spec: RecurrenceSpec) -> str | None:
        """None when the backend can run ``spec``, else what is missing."""
        return None

    def variants(self, spec: RecurrenceSpec) -> list[str]:
        """Names of this backend's variants worth timing against it for ``spec``
        (``cnnlstm_fast.tune`` times ``"<name>:<variant>"`` beside ``name``)."""
        return []

    def variant(self, name: str) -> "Backend":
        """The backend run as variant ``name`` (its ``name`` is ``"<name>:<variant>"``);
        a ValueError naming the variants there are for an unknown one."""
        raise ValueError(f"backend {self.name!r} has no variants, got {name!r}")

    def input_projection(self, x, weight, bias):
        """``G_x = x @ weight^T + bias`` (differentiable) for a layer this backend runs."""
        return torch.nn.functional.linear(x, weight, bias)

    #: Whether ``forward``/``backward`` take packed input as a PackedSequence's rows: G_x
    #: (N, gates*H) with ``batch_sizes``, and Y, the saved tensors, dY and dG_x in the same
    #: rows (the module then never pads G_x or packs Y). Otherwise G_x is padded.
    packed_rows = False

    def forward_from_input(self, spec, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn,
                           batch_sizes=None):
        """Inference (no autograd) of a layer straight from its input, the input
        projection included: ``x`` padded (T, B, I), or with ``batch_sizes`` a
        PackedSequence's data (N, I), and Y in the same layout. ``(Y, h_T, c_T | None)``,
        or None where the backend has no such path (the module then projects and calls
        ``forward``)."""
        return None

    def forward(self, spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved):
        raise NotImplementedError

    def backward(self, spec, saved, batch_sizes, d_y, d_hT, d_cT):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
