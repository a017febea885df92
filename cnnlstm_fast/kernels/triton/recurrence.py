"""Per-step Triton kernels of the recurrence: one launch (or two) per time step.

Forward, ``recurrence_step_forward``: grid (hidden blocks, batch blocks). A program owns
BLOCK_H hidden units of ALL gates for BLOCK_B batch rows: it computes their recurrent
matmul h_{t-1} W_hh^T (K loop over the state width, fp32 accumulation), adds G_x[t],
applies the cell and writes the new state, Y[t] and (training) the gate activations.
The state h lives in fp32 buffers indexed by step, so h_{t-1} of another program is
read from global memory after the previous launch ended (launch order is the barrier).
LSTM with proj_size: the kernel writes m = o tanh(c) and ``recurrence_step_matmul``
then computes h = m W_hr^T (a second launch per step, since every h column needs all m).

Backward walks the steps in reverse, two launches per step: ``recurrence_step_backward``
(pointwise gate gradients -> dG_x[t], the carried dc; with proj_size it first forms
dm = (dh + dY[t]) W_hr) and a float32 torch GEMM in the launcher (dh_{t-1} =
dG_h[t] W_hh, plus (dh + dY[t]) z for GRU). dW_hh and dW_hr are one GEMM each after
the loop. The pointwise backward (``_cell_backward``) is shared with the persistent
backward kernel in ``persistent.py``.

Inactive rows (row >= n_active, variable lengths) keep their state; Y and dG_x are 0
there. ``INTERPRET`` switches to what the Triton interpreter can run (tanh as
2 sigmoid(2x) - 1, dots upcast to fp32); it never changes the GPU code.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

LSTM: tl.constexpr = tl.constexpr(0)
GRU: tl.constexpr = tl.constexpr(1)
RNN_TANH: tl.constexpr = tl.constexpr(2)
RNN_RELU: tl.constexpr = tl.constexpr(3)

#: cell name -> the CELL constexpr of the kernels.
CELL_IDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


@triton.jit
def _tanh(x, INTERPRET: tl.constexpr):
    # The interpreter has no libdevice.
    if INTERPRET:
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0
    else:
        return libdevice.tanh(x)


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    # The interpreter's bf16 dot is wrong; fp16/bf16 products are exact in fp32, so the
    # upcast computes what the GPU's fp32-accumulating dot does.
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _rows_times_w(
    a_ptr, a2_ptr, stride_a, w_ptr, stride_wn, stride_wk, rows, cols, row_mask, col_mask,
    k_size, ADD_A2: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[b, n] = sum_k (a + a2)[rows[b], k] * w[cols[n] * stride_wn + k * stride_wk] (fp32)."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, k_size, BLOCK_K):
        k = k0 + ks
        k_mask = k < k_size
        a_offs = rows[:, None] * stride_a + k[None, :]
        a_mask = row_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
        if ADD_A2:
            a += tl.load(a2_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
        w_offs = k[:, None] * stride_wk + cols[None, :] * stride_wn
        w = tl.load(w_ptr + w_offs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a.to(w.dtype), w, acc, INTERPRET)
    return acc


@triton.jit
def _cell_forward(
    a0, a1, a2, a3, gx_ptr, offs, hidden, mask, h_old, c_old, b_hn,
    CELL: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Gates of one block from the recurrent pre-activations a0..a3 and G_x.

    Returns (new output, new c, saved extra, gate activations 0..3): extra is c before
    the step (LSTM) or a_n + b_hn (GRU)."""
    x0 = tl.load(gx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CELL == LSTM:
        i = tl.sigmoid(a0 + x0)
        f = tl.sigmoid(a1 + tl.load(gx_ptr + offs + hidden, mask=mask, other=0.0).to(tl.float32))
        g = _tanh(a2 + tl.load(gx_ptr + offs + 2 * hidden, mask=mask, other=0.0).to(tl.float32), INTERPRET)
        o = tl.sigmoid(a3 + tl.load(gx_ptr + offs + 3 * hidden, mask=mask, other=0.0).to(tl.float32))
        c_new = f * c_old + i * g
        return o * _tanh(c_new, INTERPRET), c_new, c_old, i, f, g, o
    elif CELL == GRU:
        h_n = a2 + b_hn
        r = tl.sigmoid(a0 + x0)
        z = tl.sigmoid(a1 + tl.load(gx_ptr + offs + hidden, mask=mask, other=0.0).to(tl.float32))
        x_n = tl.load(gx_ptr + offs + 2 * hidden, mask=mask, other=0.0).to(tl.float32)
        n = _tanh(x_n + r * h_n, INTERPRET)
        return (1.0 - z) * n + z * h_old, c_old, h_n, r, z, n, n
    else:
        if CELL == RNN_TANH:
            out = _tanh(a0 + x0, INTERPRET)
        else:
            out = tl.maximum(a0 + x0, 0.0)
        return out, c_old, c_old, out, out, out, out


@triton.jit
def _store_gates(ptr, offs, hidden, mask, g0, g1, g2, g3, NGATES: tl.constexpr):
    tl.store(ptr + offs, g0, mask=mask)
    if NGATES > 1:
        tl.store(ptr + offs + hidden, g1, mask=mask)
        tl.store(ptr + offs + 2 * hidden, g2, mask=mask)
    if NGATES > 3:
        tl.store(ptr + offs + 3 * hidden, g3, mask=mask)


@triton.jit
def _cell_backward(
    d_out, dc, act_ptr, extra_ptr, h_prev_ptr, offs_h, offs_g, hidden, mask,
    CELL: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Gate gradients of one block of one step, from d_out (the gradient reaching the
    step's output) and dc (LSTM: the cell-state gradient carried from the next step).

    act_ptr + offs_g: the step's gate activations; extra_ptr + offs_h: c before the
    step (LSTM) or a_n + b_hn (GRU); h_prev_ptr + offs_h: the state before the step
    (GRU). Returns dG_x of gates 0..3, dG_h of gate 2 (GRU: d a_n r; else gate 2's
    dG_x) and the cell-state gradient before the step (dc unchanged but for LSTM)."""
    g0 = tl.load(act_ptr + offs_g, mask=mask, other=0.0)
    if CELL == LSTM:
        f = tl.load(act_ptr + offs_g + hidden, mask=mask, other=0.0)
        g = tl.load(act_ptr + offs_g + 2 * hidden, mask=mask, other=0.0)
        o = tl.load(act_ptr + offs_g + 3 * hidden, mask=mask, other=0.0)
        c_prev = tl.load(extra_ptr + offs_h, mask=mask, other=0.0)
        tanh_c = _tanh(f * c_prev + g0 * g, INTERPRET)
        d_c = dc + d_out * o * (1.0 - tanh_c * tanh_c)
        d_g = d_c * g0 * (1.0 - g * g)
        return (d_c * g * g0 * (1.0 - g0), d_c * c_prev * f * (1.0 - f), d_g,
                d_out * tanh_c * o * (1.0 - o), d_g, d_c * f)
    elif CELL == GRU:
        z = tl.load(act_ptr + offs_g + hidden, mask=mask, other=0.0)
        n = tl.load(act_ptr + offs_g + 2 * hidden, mask=mask, other=0.0)
        h_n = tl.load(extra_ptr + offs_h, mask=mask, other=0.0)
        h_prev = tl.load(h_prev_ptr + offs_h, mask=mask, other=0.0)
        d_an = d_out * (1.0 - z) * (1.0 - n * n)
        d_ar = d_an * h_n * g0 * (1.0 - g0)
        d_az = d_out * (h_prev - n) * z * (1.0 - z)
        return d_ar, d_az, d_an, d_an, d_an * g0, dc
    else:
        if CELL == RNN_TANH:
            d = d_out * (1.0 - g0 * g0)
        else:
            d = tl.where(g0 > 0.0, d_out, 0.0)
        return d, d, d, d, d, dc


@triton.jit(do_not_specialize=["n_active"])
def recurrence_step_forward(
    gx_ptr, h_in_ptr, h_out_ptr, c_ptr, y_ptr, w_hh_ptr, b_hn_ptr, act_ptr, extra_ptr,
    n_active, batch, hidden, out_size,
    CELL: tl.constexpr, NGATES: tl.constexpr, HAS_B_HN: tl.constexpr, PROJ: tl.constexpr,
    SAVE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step: h_out = cell(G_x[t] + h_in W_hh^T). All buffers contiguous; fp32 state.

    h_in/h_out (B, out_size); c (B, H) updated in place (each element by its owner);
    with PROJ h_out is the m buffer (B, H) and Y is written by the projection launch."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < batch
    col_mask = cols < hidden
    mask = row_mask[:, None] & col_mask[None, :]
    active = (rows < n_active)[:, None] & col_mask[None, :]
    gate_w = hidden * out_size
    a0 = _rows_times_w(h_in_ptr, h_in_ptr, out_size, w_hh_ptr, out_size, 1, rows, cols,
                       row_mask, col_mask, out_size, False, INTERPRET, BLOCK_B, BLOCK_H, BLOCK_K)
    a1 = a0
    a2 = a0
    a3 = a0
    if NGATES > 1:
        a1 = _rows_times_w(h_in_ptr, h_in_ptr, out_size, w_hh_ptr + gate_w, out_size, 1, rows,
                           cols, row_mask, col_mask, out_size, False, INTERPRET, BLOCK_B, BLOCK_H,
                           BLOCK_K)
        a2 = _rows_times_w(h_in_ptr, h_in_ptr, out_size, w_hh_ptr + 2 * gate_w, out_size, 1,
                           rows, cols, row_mask, col_mask, out_size, False, INTERPRET, BLOCK_B,
                           BLOCK_H, BLOCK_K)
    if NGATES > 3:
        a3 = _rows_times_w(h_in_ptr, h_in_ptr, out_size, w_hh_ptr + 3 * gate_w, out_size, 1,
                           rows, cols, row_mask, col_mask, out_size, False, INTERPRET, BLOCK_B,
                           BLOCK_H, BLOCK_K)
    offs_h = rows[:, None] * hidden + cols[None, :]
    offs_g = rows[:, None] * (NGATES * hidden) + cols[None, :]
    zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    c_old = zero
    if CELL == LSTM:
        c_old = tl.load(c_ptr + offs_h, mask=mask, other=0.0)
    h_old = zero
    if not PROJ:
        h_old = tl.load(h_in_ptr + offs_h, mask=mask, other=0.0)
    b_hn = zero
    if HAS_B_HN:
        b_hn += tl.load(b_hn_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out, c_new, extra, g0, g1, g2, g3 = _cell_forward(
        a0, a1, a2, a3, gx_ptr, offs_g, hidden, mask, h_old, c_old, b_hn, CELL, INTERPRET
    )
    if CELL == LSTM:
        tl.store(c_ptr + offs_h, c_new, mask=active)
    if SAVE:
        _store_gates(act_ptr, offs_g, hidden, active, g0, g1, g2, g3, NGATES)
        if NGATES > 1:
            tl.store(extra_ptr + offs_h, extra, mask=active)
    y = tl.where(active, out, 0.0)
    if PROJ:
        tl.store(h_out_ptr + offs_h, y, mask=mask)
    else:
        tl.store(h_out_ptr + offs_h, tl.where(active, out, h_old), mask=mask)
        tl.store(y_ptr + offs_h, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_active"])
def recurrence_step_matmul(
    a_ptr, w_ptr, keep_ptr, out_ptr, y_ptr,
    n_active, batch, n_size, k_size, stride_wn, stride_wk,
    INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The forward projection of one step: out = a W on active rows, keep elsewhere;
    Y = out on active rows, 0 elsewhere (a = m, W = W_hr^T, keep = h before the step)."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < batch
    col_mask = cols < n_size
    mask = row_mask[:, None] & col_mask[None, :]
    active = (rows < n_active)[:, None] & col_mask[None, :]
    acc = _rows_times_w(a_ptr, a_ptr, k_size, w_ptr, stride_wn, stride_wk, rows, cols, row_mask,
                        col_mask, k_size, False, INTERPRET, BLOCK_B, BLOCK_N, BLOCK_K)
    offs = rows[:, None] * n_size + cols[None, :]
    keep = tl.load(keep_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl.where(active, acc, keep), mask=mask)
    tl.store(y_ptr + offs, tl.where(active, acc, 0.0).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_active"])
def recurrence_step_backward(
    dh_ptr, dy_ptr, dc_ptr, act_ptr, extra_ptr, h_prev_ptr, w_hr_ptr, dgx_ptr, dgh_ptr,
    dh_all_ptr, n_active, batch, hidden, out_size,
    CELL: tl.constexpr, NGATES: tl.constexpr, PROJ: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gate gradients of one step: dG_x[t] (and dG_h[t] for GRU), dc carried in place.

    The gradient reaching the step's output is dh + dY[t]; with PROJ it is first taken
    through W_hr (dm = (dh + dY[t]) W_hr), and the first column block also saves
    dh + dY[t] for dW_hr."""
    pid_h = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < batch
    col_mask = cols < hidden
    mask = row_mask[:, None] & col_mask[None, :]
    active = (rows < n_active)[:, None] & col_mask[None, :]
    offs_h = rows[:, None] * hidden + cols[None, :]
    offs_g = rows[:, None] * (NGATES * hidden) + cols[None, :]
    if PROJ:
        d_out = _rows_times_w(dh_ptr, dy_ptr, out_size, w_hr_ptr, 1, hidden, rows, cols, row_mask,
                              col_mask, out_size, True, INTERPRET, BLOCK_B, BLOCK_H, BLOCK_K)
        if pid_h == 0:
            ps = tl.arange(0, BLOCK_K)
            for p0 in range(0, out_size, BLOCK_K):
                p = p0 + ps
                offs_p = rows[:, None] * out_size + p[None, :]
                p_mask = row_mask[:, None] & (p < out_size)[None, :]
                g_h = tl.load(dh_ptr + offs_p, mask=p_mask, other=0.0)
                g_h += tl.load(dy_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)
                tl.store(dh_all_ptr + offs_p, g_h, mask=p_mask & (rows < n_active)[:, None])
    else:
        d_out = tl.load(dh_ptr + offs_h, mask=mask, other=0.0)
        d_out += tl.load(dy_ptr + offs_h, mask=mask, other=0.0).to(tl.float32)
    if CELL == LSTM:
        dc = tl.load(dc_ptr + offs_h, mask=mask, other=0.0)
    else:
        dc = d_out  # unused: only the LSTM carries a cell-state gradient
    d0, d1, d2, d3, d2_h, dc_new = _cell_backward(
        d_out, dc, act_ptr, extra_ptr, h_prev_ptr, offs_h, offs_g, hidden, mask, CELL, INTERPRET)
    _store_gates(dgx_ptr, offs_g, hidden, active, d0, d1, d2, d3, NGATES)
    if CELL == GRU:
        _store_gates(dgh_ptr, offs_g, hidden, active, d0, d1, d2_h, d3, NGATES)
    if CELL == LSTM:
        tl.store(dc_ptr + offs_h, tl.where(active, dc_new, dc), mask=mask)
