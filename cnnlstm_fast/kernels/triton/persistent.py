"""Persistent kernels: one launch for the whole sequence, forward and backward.

Tiling: grid (hidden blocks, batch blocks), one program per SM. A program owns BLOCK_H
hidden units of all gates for BLOCK_B rows; its W_hh slice (gates x BLOCK_H x Hout,
padded to BLOCK_K = next power of two >= Hout) and its cell state stay in registers for
all steps. h is exchanged through global memory (L2, loads bypass L1 with ``.cg``) in
a double buffer (or the saved per-step state buffer when training), with one grid
barrier per step: every program adds 1 to a counter (release) and spins until it
reaches (step + 1) x programs (acquire).

Co-residency: the barrier needs every program resident at once. The launcher keeps the
grid <= the SM count and the slice within the on-chip budget, and assumes no other
kernel occupies the SMs (a plain launch, as verified on a GPU). With
CNNLSTM_FAST_EXPERIMENTAL=1 it launches cooperatively where Triton can
(``launch_cooperative_grid``; not yet run on a GPU): the driver then starts every
program together, waiting for SMs that other kernels hold (under
DistributedDataParallel NCCL's all-reduce runs beside the backward on another stream)
rather than starting some programs early, and refuses a grid the GPU could never hold
at once. A spin bounded by ``spin_limit`` guards the plain launch and a kernel bug: it
turns a barrier that never fills into a flag the launcher reports instead of a hang
(about spin_limit atomic loads, a few seconds, whatever the number of steps). No projection (proj_size): the launcher uses the
per-step kernels then. In Triton's interpreter, which runs programs one after
another, only a grid of one program can pass the barrier.

The backward (``recurrence_backward_persistent``) uses the same grid and barrier with
the transposed slice, W_hh[:, cols] of every gate (see its docstring). Both kernels
need ~192 KiB of shared memory at hidden 768 in fp16/bf16 (Triton stages the dot
operands there) and spill registers at BLOCK_K = 1024 (ptxas for sm_90); none at 256.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .recurrence import GRU, LSTM, _cell_backward, _cell_forward, _dot, _store_gates


@triton.jit
def _load_gate_tile(w_ptr, gate, hidden, cols, col_mask, COLUMNS: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """A (BLOCK_K, BLOCK_H) tile of W_hh for k < H: W_hh[gate * H + cols, k]^T (the
    forward's slice: the gate rows of a program's units), or with COLUMNS
    W_hh[gate * H + k, cols] (the backward's: the columns its dh needs)."""
    k = tl.arange(0, BLOCK_K)
    if COLUMNS:
        offs = (gate * hidden + k)[:, None] * hidden + cols[None, :]
    else:
        offs = (gate * hidden + cols)[None, :] * hidden + k[:, None]
    return tl.load(w_ptr + offs, mask=(k < hidden)[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _load_w_tiles(w_ptr, hidden, cols, col_mask, NGATES: tl.constexpr, COLUMNS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The tiles of gates 0..3 (``_load_gate_tile``); unused gates repeat gate 0."""
    w0 = _load_gate_tile(w_ptr, 0, hidden, cols, col_mask, COLUMNS, BLOCK_K)
    w1 = w0
    w2 = w0
    w3 = w0
    if NGATES > 1:
        w1 = _load_gate_tile(w_ptr, 1, hidden, cols, col_mask, COLUMNS, BLOCK_K)
        w2 = _load_gate_tile(w_ptr, 2, hidden, cols, col_mask, COLUMNS, BLOCK_K)
    if NGATES > 3:
        w3 = _load_gate_tile(w_ptr, 3, hidden, cols, col_mask, COLUMNS, BLOCK_K)
    return w0, w1, w2, w3


@triton.jit
def _program_block(batch, hidden, NGATES: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's rows, hidden units (cols) and K range, with their masks: (rows,
    cols, ks, col_mask, mask (rows x cols), k_mask (rows x ks), offsets of (rows,
    cols) in a (B, H) and in a (B, gates x H) tensor)."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < batch
    col_mask = cols < hidden
    mask = row_mask[:, None] & col_mask[None, :]
    k_mask = row_mask[:, None] & (ks < hidden)[None, :]
    offs_h = rows[:, None] * hidden + cols[None, :]
    offs_g = rows[:, None] * (NGATES * hidden) + cols[None, :]
    return rows, cols, ks, col_mask, mask, k_mask, offs_h, offs_g


@triton.jit
def _load_exchange(ptr, offs, mask, dtype):
    """A tile another program wrote before the last grid barrier: read from L2 (``.cg``,
    L1 may hold a stale line), as ``dtype``."""
    return tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(dtype)


@triton.jit
def _grid_barrier(counter_ptr, target, spins_left, timed_out, spin_limit):
    """This program's stores are issued (CTA barrier) and published (release); then it
    waits (acquire) until the counter reaches ``target`` or ``spins_left`` runs out.
    Returns the spins the next barrier may use (0 once any barrier timed out) and the
    updated timed_out flag."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while (arrived < target) & (spins_left > 0):
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins_left -= 1
    timed_out |= (arrived < target).to(tl.int32)
    tl.debug_barrier()
    return spin_limit * (1 - timed_out), timed_out


@triton.jit
def recurrence_forward_persistent(
    gx_ptr, h_state_ptr, c0_ptr, c_out_ptr, y_ptr, w_hh_ptr, b_hn_ptr, act_ptr, extra_ptr,
    batch_sizes_ptr, counter_ptr, timed_out_ptr,
    steps, batch, hidden, spin_limit,
    CELL: tl.constexpr, NGATES: tl.constexpr, HAS_B_HN: tl.constexpr, SAVE: tl.constexpr,
    REVERSE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h_state: (T + 1, B, H) indexed like the per-step launcher when SAVE, else (2, B, H)
    with step s reading slot s % 2. batch_sizes: (T,) int32 on the device."""
    n_programs = tl.num_programs(0) * tl.num_programs(1)
    rows, cols, ks, col_mask, mask, h_mask, offs_h, offs_g = _program_block(
        batch, hidden, NGATES, BLOCK_B, BLOCK_H, BLOCK_K)
    state = batch * hidden

    w0, w1, w2, w3 = _load_w_tiles(w_hh_ptr, hidden, cols, col_mask, NGATES, False, BLOCK_K)
    zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    c = zero
    if CELL == LSTM:
        c = tl.load(c0_ptr + offs_h, mask=mask, other=0.0)
    b_hn = zero
    if HAS_B_HN:
        b_hn += tl.load(b_hn_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # spin_limit bounds each barrier's wait. After a timeout no later barrier waits
    # (spins_left stays 0), so a launch whose programs are not co-resident ends after
    # one timeout instead of one per step, and timed_out reports it.
    spins_left = spin_limit
    timed_out = 0

    for s in range(steps):
        if REVERSE:
            t = steps - 1 - s
        else:
            t = s
        if SAVE:
            if REVERSE:
                slot_in = t + 1
                slot_out = t
            else:
                slot_in = t
                slot_out = t + 1
        else:
            slot_in = s % 2
            slot_out = 1 - slot_in
        # int64: T x B x gH may exceed 2^31 elements.
        t64 = t.to(tl.int64)
        h_in = h_state_ptr + slot_in.to(tl.int64) * state
        h = _load_exchange(h_in, rows[:, None] * hidden + ks[None, :], h_mask, w0.dtype)
        a0 = _dot(h, w0, zero, INTERPRET)
        a1 = a0
        a2 = a0
        a3 = a0
        if NGATES > 1:
            a1 = _dot(h, w1, zero, INTERPRET)
            a2 = _dot(h, w2, zero, INTERPRET)
        if NGATES > 3:
            a3 = _dot(h, w3, zero, INTERPRET)
        h_old = tl.load(h_in + offs_h, mask=mask, other=0.0, cache_modifier=".cg")
        n_active = tl.load(batch_sizes_ptr + t)
        active = (rows < n_active)[:, None] & col_mask[None, :]
        out, c_new, extra, g0, g1, g2, g3 = _cell_forward(
            a0, a1, a2, a3, gx_ptr + t64 * batch * NGATES * hidden, offs_g, hidden, mask, h_old,
            c, b_hn, CELL, INTERPRET,
        )
        c = tl.where(active, c_new, c)
        if SAVE:
            _store_gates(act_ptr + t64 * batch * NGATES * hidden, offs_g, hidden, active,
                         g0, g1, g2, g3, NGATES)
            if NGATES > 1:
                tl.store(extra_ptr + t64 * state + offs_h, extra, mask=active)
        h_out = h_state_ptr + slot_out.to(tl.int64) * state
        tl.store(h_out + offs_h, tl.where(active, out, h_old), mask=mask)
        y = tl.where(active, out, 0.0).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + t64 * state + offs_h, y, mask=mask)

        spins_left, timed_out = _grid_barrier(counter_ptr, (s + 1) * n_programs, spins_left,
                                              timed_out, spin_limit)

    if CELL == LSTM:
        tl.store(c_out_ptr + offs_h, c, mask=mask)
    if timed_out != 0:
        tl.store(timed_out_ptr, 1)


@triton.jit
def recurrence_backward_persistent(
    d_y_ptr, dh_ptr, dc_ptr, act_ptr, extra_ptr, h_prev_ptr, w_hh_ptr, dgx_ptr, dgh_ptr,
    batch_sizes_ptr, counter_ptr, timed_out_ptr,
    steps, batch, hidden, spin_limit,
    CELL: tl.constexpr, NGATES: tl.constexpr, REVERSE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The backward of a layer without projection in one launch, steps in reverse order.

    A program owns BLOCK_H hidden units for BLOCK_B rows, as in the forward, and keeps
    W_hh[:, cols] (every gate row, its columns) on chip. Per step: the pointwise
    backward of its block (dG_x[t], dG_h[t], dc carried in registers), one grid
    barrier, then dh = dG_h[t] W_hh[:, cols] (+ (dh + dY[t]) z for GRU) on the rows
    active at t, reading all of dG_h[t] from L2 (``.cg``): dG_h itself is the exchange
    buffer, no double buffer needed. dG_h is rounded to the weights' dtype for the
    product (float32 accumulation), as the forward rounds h and as torch.nn does: in
    float32 the tile would not fit in shared memory at hidden 768 (320 KiB), so the
    per-step path's float32 GEMM is not mirrored for fp16/bf16. dh: (B, H) fp32,
    d_h_T in, dh_0 out; dc likewise (LSTM). act, extra, h_prev: as the forward saved
    them, (T, B, ...). dgx, dgh: (T, B, gH) fp32, zeroed by the launcher (inactive rows
    stay 0); dgh is dgx but for GRU."""
    n_programs = tl.num_programs(0) * tl.num_programs(1)
    rows, cols, ks, col_mask, mask, g_mask, offs_h, offs_g = _program_block(
        batch, hidden, NGATES, BLOCK_B, BLOCK_H, BLOCK_K)
    gate_width = NGATES * hidden
    offs_k = rows[:, None] * gate_width + ks[None, :]
    state = batch * hidden

    w0, w1, w2, w3 = _load_w_tiles(w_hh_ptr, hidden, cols, col_mask, NGATES, True, BLOCK_K)
    dh = tl.load(dh_ptr + offs_h, mask=mask, other=0.0)
    dc = dh  # unused but for LSTM
    if CELL == LSTM:
        dc = tl.load(dc_ptr + offs_h, mask=mask, other=0.0)
    zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    spins_left = spin_limit
    timed_out = 0

    for s in range(steps):
        if REVERSE:  # the forward ran t = T-1 .. 0, so the backward runs 0 .. T-1
            t = s
        else:
            t = steps - 1 - s
        t64 = t.to(tl.int64)  # T x B x gH may exceed 2^31 elements
        step_g = t64 * batch * gate_width
        n_active = tl.load(batch_sizes_ptr + t)
        active = (rows < n_active)[:, None] & col_mask[None, :]
        d_out = dh + tl.load(d_y_ptr + t64 * state + offs_h, mask=mask, other=0.0).to(tl.float32)
        d0, d1, d2, d3, d2_h, dc_new = _cell_backward(
            d_out, dc, act_ptr + step_g, extra_ptr + t64 * state, h_prev_ptr + t64 * state,
            offs_h, offs_g, hidden, mask, CELL, INTERPRET)
        _store_gates(dgx_ptr + step_g, offs_g, hidden, active, d0, d1, d2, d3, NGATES)
        if CELL == GRU:
            _store_gates(dgh_ptr + step_g, offs_g, hidden, active, d0, d1, d2_h, d3, NGATES)
        dc = tl.where(active, dc_new, dc)

        spins_left, timed_out = _grid_barrier(counter_ptr, (s + 1) * n_programs, spins_left,
                                              timed_out, spin_limit)

        # dh before step t: dG_h[t] W_hh over all gate rows, dG_h rounded to the
        # weights' dtype (as the forward rounds h), float32 accumulation.
        g_ptr = dgh_ptr + step_g
        acc = _dot(_load_exchange(g_ptr, offs_k, g_mask, w0.dtype), w0, zero, INTERPRET)
        if NGATES > 1:
            acc = _dot(_load_exchange(g_ptr + hidden, offs_k, g_mask, w0.dtype), w1, acc,
                       INTERPRET)
            acc = _dot(_load_exchange(g_ptr + 2 * hidden, offs_k, g_mask, w0.dtype), w2, acc,
                       INTERPRET)
        if NGATES > 3:
            acc = _dot(_load_exchange(g_ptr + 3 * hidden, offs_k, g_mask, w0.dtype), w3, acc,
                       INTERPRET)
        if CELL == GRU:  # h_t = ... + z h_{t-1}: d_out z flows to h_{t-1} directly
            acc += d_out * tl.load(act_ptr + step_g + offs_g + hidden, mask=mask, other=0.0)
        dh = tl.where(active, acc, dh)

    tl.store(dh_ptr + offs_h, dh, mask=mask)
    if CELL == LSTM:
        tl.store(dc_ptr + offs_h, dc, mask=mask)
    if timed_out != 0:
        tl.store(timed_out_ptr, 1)
