"""Persistent forward kernel: one launch for the whole sequence.

Tiling: grid (hidden blocks, batch blocks), one program per SM. A program owns BLOCK_H
hidden units of all gates for BLOCK_B rows; its W_hh slice (gates x BLOCK_H x Hout,
padded to BLOCK_K = next power of two >= Hout) and its cell state stay in registers for
all steps. h is exchanged through global memory (L2, loads bypass L1 with ``.cg``) in
a double buffer (or the saved per-step state buffer when training), with one grid
barrier per step: every program adds 1 to a counter (release) and spins until it
reaches (step + 1) x programs (acquire).

Co-residency: the barrier needs every program resident at once. The launcher keeps the
grid <= the SM count and the slice within the on-chip budget, and assumes no other
kernel occupies the SMs; a spin bounded by ``spin_limit`` turns a violated assumption
into a flag the launcher reports instead of a hang (about spin_limit atomic loads, a
few seconds, whatever the number of steps). No projection (proj_size): the
launcher uses the per-step kernels then. In Triton's interpreter, which runs programs
one after another, only a grid of one program can pass the barrier.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .recurrence import LSTM, _cell_forward, _dot, _store_gates


@triton.jit
def _load_gate_slice(w_ptr, gate, hidden, cols, col_mask, BLOCK_K: tl.constexpr):
    """W_hh[gate * H + cols, :]^T as a (BLOCK_K, BLOCK_H) tile."""
    k = tl.arange(0, BLOCK_K)
    offs = (gate * hidden + cols)[None, :] * hidden + k[:, None]
    return tl.load(w_ptr + offs, mask=(k < hidden)[:, None] & col_mask[None, :], other=0.0)


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
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < batch
    col_mask = cols < hidden
    mask = row_mask[:, None] & col_mask[None, :]
    h_mask = row_mask[:, None] & (ks < hidden)[None, :]
    offs_h = rows[:, None] * hidden + cols[None, :]
    offs_g = rows[:, None] * (NGATES * hidden) + cols[None, :]
    state = batch * hidden

    w0 = _load_gate_slice(w_hh_ptr, 0, hidden, cols, col_mask, BLOCK_K)
    w1 = w0
    w2 = w0
    w3 = w0
    if NGATES > 1:
        w1 = _load_gate_slice(w_hh_ptr, 1, hidden, cols, col_mask, BLOCK_K)
        w2 = _load_gate_slice(w_hh_ptr, 2, hidden, cols, col_mask, BLOCK_K)
    if NGATES > 3:
        w3 = _load_gate_slice(w_hh_ptr, 3, hidden, cols, col_mask, BLOCK_K)
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
        h = tl.load(h_in + rows[:, None] * hidden + ks[None, :], mask=h_mask, other=0.0,
                    cache_modifier=".cg").to(w0.dtype)
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

        # Grid barrier: this program's stores are issued (CTA barrier), published
        # (release), then wait for everyone's (acquire).
        tl.debug_barrier()
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        target = (s + 1) * n_programs
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        while (arrived < target) & (spins_left > 0):
            arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            spins_left -= 1
        timed_out |= (arrived < target).to(tl.int32)
        spins_left = spin_limit * (1 - timed_out)
        tl.debug_barrier()

    if CELL == LSTM:
        tl.store(c_out_ptr + offs_h, c, mask=mask)
    if timed_out != 0:
        tl.store(timed_out_ptr, 1)
