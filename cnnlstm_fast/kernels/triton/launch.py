"""Launchers of the Triton recurrence kernels: buffers, block sizes, the step loop.

``forward``/``backward`` follow the contract of ``cnnlstm_fast/backends/base.py``.
State, cell state, gate activations and gradients are fp32 buffers; Y comes out in
the input dtype. Saved for backward: (act, h_prev, extra, W_hh, W_hr, m) with act the
gate activations (T, B, gH), h_prev the state before each step (T, B, Hout), extra c
before the step (LSTM) or a_n + b_hn (GRU), m = o tanh(c) per step (proj_size only).

Block sizes come from small tables keyed by shape (``step_config``,
``persistent_config``), cached, so a shape compiles once: ``n_active`` is not
specialised on, and the other integer arguments only on Triton's usual (==1,
multiple of 16) classes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton

from ... import experimental

from .persistent import recurrence_backward_persistent, recurrence_forward_persistent
from .recurrence import (
    CELL_IDS,
    recurrence_step_backward,
    recurrence_step_forward,
    recurrence_step_matmul,
)

#: True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 at import).
INTERPRETING = not isinstance(recurrence_step_forward, triton.runtime.JITFunction)

#: Registers + shared memory one persistent program may hold for its W_hh slice and
#: h tile; larger slices use the per-step kernels. A heuristic awaiting GPU tuning.
PERSISTENT_ON_CHIP_BYTES = 160 * 1024

#: Spins of one grid barrier before the persistent kernel gives up (see persistent.py).
PERSISTENT_SPIN_LIMIT = 1 << 24


@functools.cache
def _cooperative_supported() -> bool:
    """Whether this Triton launches CUDA kernels cooperatively on request (the
    ``launch_cooperative_grid`` option, present in the pinned Triton 3.9; the version that
    added it is not checked here)."""
    try:
        import dataclasses

        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return any(f.name == "launch_cooperative_grid" for f in dataclasses.fields(CUDAOptions))


def persistent_launch_options(cooperative: bool | None = None) -> dict:
    """Launch options of the persistent kernels on a GPU: a plain launch, as verified on
    a GPU, or with ``cooperative`` (None: ``CNNLSTM_FAST_EXPERIMENTAL=1``; experimental,
    not yet run on a GPU) a cooperative one where this Triton has the option. A
    cooperative launch has the driver start every program of the grid together, once SMs
    that other kernels hold (NCCL's, beside DistributedDataParallel's backward) are free,
    instead of starting some programs that then spin at the grid barrier for the others;
    a grid the GPU could never hold at once fails at launch ("too many blocks in
    cooperative launch"). With a plain launch the bounded barrier is the only guard."""
    if cooperative is None:
        cooperative = experimental.enabled()
    if INTERPRETING or not cooperative or not _cooperative_supported():
        return {}
    return {"launch_cooperative_grid": True}


#: (cell, batch, hidden, dtype, device index, backward) whose persistent kernel the GPU
#: refused: more shared memory than it has (the on-chip estimate above is rough: fp16
#: H=768..1024 needs ~192 KiB, more than an A100's 163 KiB) or a cooperative grid it
#: cannot hold: "auto" runs them per step.
_persistent_out_of_resources: set[tuple] = set()


class StepConfig(NamedTuple):
    block_b: int
    block_h: int
    block_k: int
    num_warps: int


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@functools.lru_cache(maxsize=None)
def step_config(batch: int, width: int, k_size: int, itemsize: int) -> StepConfig:
    """Blocks of a per-step launch producing (batch, width) from a K of ``k_size``.

    Small hidden blocks give more programs, which matters more than tile efficiency
    at the small batches where the recurrence is latency-bound. tl.dot needs >= 16."""
    block_b = _pow2(batch, 16, 64)
    if INTERPRETING:  # fewer, larger programs: the interpreter pays per program
        return StepConfig(block_b, _pow2(width, 16, 64), _pow2(k_size, 16, 64), 4)
    block_h = 16 if width <= 512 else 32 if width <= 2048 else 64
    block_k = 64 if itemsize <= 2 else 32
    return StepConfig(block_b, block_h, block_k, 4 if block_b * block_h <= 1024 else 8)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def persistent_config(
    batch: int, hidden: int, gates: int, itemsize: int, programs_max: int
) -> StepConfig | None:
    """Blocks of a persistent kernel (forward or backward: the same tiles), or None when
    its assumptions cannot hold: more programs than ``programs_max`` (the SM count) or
    a slice too large on chip."""
    block_b = _pow2(batch, 16, 64)
    block_k = _pow2(hidden, 16, 1 << 30)
    batch_blocks = triton.cdiv(batch, block_b)
    block_h = 16
    while triton.cdiv(hidden, block_h) * batch_blocks > programs_max and block_h < block_k:
        block_h *= 2
    if triton.cdiv(hidden, block_h) * batch_blocks > programs_max:
        return None
    on_chip = (gates * block_h + block_b) * block_k * itemsize
    if on_chip > PERSISTENT_ON_CHIP_BYTES:
        return None
    return StepConfig(block_b, block_h, block_k, 8)


def _active_rows(batch_sizes, steps: int, batch: int) -> list[int]:
    if batch_sizes is None:
        return [batch] * steps
    return [int(n) for n in batch_sizes.tolist()]


def _order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _persistent_key(spec, gx, backward: bool = False) -> tuple:
    return (spec.cell, gx.shape[1], spec.hidden_size, gx.dtype, gx.device.index, backward)


def _persistent_choice(spec, gx, proj: bool, backward: bool = False) -> StepConfig | None:
    """Blocks of the persistent forward (or backward) kernel for gx's shape, dtype and
    device (for the backward, gx is any tensor of the layer's dtype with the batch as
    dimension 1), or None where it cannot run."""
    if proj or INTERPRETING or gx.device.type != "cuda":
        return None
    if _persistent_key(spec, gx, backward) in _persistent_out_of_resources:
        return None
    return persistent_config(
        gx.shape[1], spec.hidden_size, spec.gates, gx.element_size(),
        _sm_count(gx.device.index or 0),
    )


def _try_persistent(mode: str, fits, proj: bool, key: tuple, kind: str, run) -> bool:
    """Calls ``run`` (a persistent launch) where ``mode`` asks for it ("persistent", or
    "auto" where ``fits``); returns whether it ran. "auto" falls back (False, and
    remembers ``key``) when the kernel needs more shared memory than the GPU has or the
    driver refuses the cooperative launch as too large for the GPU."""
    if not (mode == "persistent" or (mode == "auto" and fits)):
        return False
    if proj:
        raise ValueError(f"the persistent {kind} kernel has no projection (proj_size); "
                         "use mode='step'")
    try:
        run()
    except (triton.runtime.OutOfResources, RuntimeError) as e:
        # Both are raised before anything ran (when the kernel is loaded, or by the
        # launch call): no state changed. Other RuntimeErrors (a barrier timeout)
        # propagate.
        if mode == "persistent" or not _refused_launch(e):
            raise
        _persistent_out_of_resources.add(key)
        return False
    return True


def _refused_launch(e: Exception) -> bool:
    """Whether ``e`` says the GPU cannot hold the persistent launch: Triton's
    OutOfResources (shared memory, registers) or CUDA's
    CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, which Triton raises as a RuntimeError
    carrying cuGetErrorString's text."""
    return (isinstance(e, triton.runtime.OutOfResources)
            or "too many blocks in cooperative launch" in str(e))


def _on_device(device: torch.device):
    """Triton launches on torch's current device and its current stream: make the
    tensors' device current (a tensor on cuda:1 with cuda:0 current would be read
    through the wrong context)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved, mode="auto"):
    """Runs the recurrence. ``mode``: "auto" (persistent where it fits, else per step),
    "step", or "persistent" (raises if not possible; in the interpreter only a grid of
    one program can run it)."""
    with _on_device(gx.device):
        return _forward(spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved, mode)


def _forward(spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved, mode):
    steps, batch, gate_width = gx.shape
    hidden, out_size, gates = spec.hidden_size, h0.shape[1], spec.gates
    proj = w_hr is not None
    f32 = dict(device=gx.device, dtype=torch.float32)
    gx, w_hh = gx.contiguous(), w_hh.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    rows = _active_rows(batch_sizes, steps, batch)

    h_state = torch.empty(steps + 1 if need_saved else 2, batch, out_size, **f32)
    first = steps if (need_saved and spec.reverse) else 0
    h_state[first] = h0
    c = c0.to(torch.float32).contiguous().clone() if c0 is not None else None
    y = torch.empty(steps, batch, out_size, device=gx.device, dtype=gx.dtype)
    act = torch.zeros(steps, batch, gate_width, **f32) if need_saved else None
    extra = torch.zeros(steps, batch, hidden, **f32) if need_saved and gates > 1 else None
    if proj:
        m = torch.zeros(steps if need_saved else 1, batch, hidden, **f32)

    def slots(s: int, t: int) -> tuple[int, int]:
        if not need_saved:
            return s % 2, (s + 1) % 2
        return (t + 1, t) if spec.reverse else (t, t + 1)

    common = dict(CELL=CELL_IDS[spec.cell], NGATES=gates, INTERPRET=INTERPRETING)
    persistent = _try_persistent(
        mode, mode == "auto" and _persistent_choice(spec, gx, proj), proj,
        _persistent_key(spec, gx), "forward",
        lambda: _persistent_run(spec, gx, h_state, c, y, w_hh, b_hn, act, extra, batch_sizes,
                                need_saved))
    if not persistent:
        cfg = step_config(batch, hidden, out_size, gx.element_size())
        grid = (triton.cdiv(hidden, cfg.block_h), triton.cdiv(batch, cfg.block_b))
        if proj:
            pcfg = step_config(batch, out_size, hidden, gx.element_size())
            pgrid = (triton.cdiv(out_size, pcfg.block_h), triton.cdiv(batch, pcfg.block_b))
        for s, t in enumerate(_order(steps, spec.reverse)):
            i, o = slots(s, t)
            m_t = (m[t] if need_saved else m[0]) if proj else None
            recurrence_step_forward[grid](
                gx[t], h_state[i], m_t if proj else h_state[o], gx if c is None else c, y[t],
                w_hh, gx if b_hn is None else b_hn, gx if act is None else act[t],
                gx if extra is None else extra[t], rows[t], batch, hidden, out_size,
                HAS_B_HN=b_hn is not None, PROJ=proj, SAVE=need_saved, **common,
                BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps,
            )
            if proj:
                recurrence_step_matmul[pgrid](
                    m_t, w_hr, h_state[i], h_state[o], y[t], rows[t], batch,
                    out_size, hidden, hidden, 1, INTERPRET=INTERPRETING,
                    BLOCK_B=pcfg.block_b, BLOCK_N=pcfg.block_h,
                    BLOCK_K=pcfg.block_k, num_warps=pcfg.num_warps,
                )
    last = slots(steps - 1, 0 if spec.reverse else steps - 1)[1]
    h_t = h_state[last].to(h0.dtype)
    c_t = None if c is None else c.to(h0.dtype)
    saved = ()
    if need_saved:
        h_prev = h_state[1:] if spec.reverse else h_state[:steps]
        saved = (act, h_prev, extra, w_hh, w_hr, m if proj else None)
    return y, h_t, c_t, saved


def _persistent_setup(spec, like, batch_sizes, backward: bool):
    """Blocks, grid, barrier flags and device row counts of a persistent launch; raises
    ValueError where the kernel cannot run. ``like``: a tensor of the layer's dtype
    with the batch as dimension 1 (G_x in the forward, dY in the backward)."""
    steps, batch = like.shape[:2]
    hidden = spec.hidden_size
    kind = "backward" if backward else "forward"
    if INTERPRETING:
        cfg = StepConfig(_pow2(batch, 16, 64), _pow2(hidden, 16, 1 << 30),
                         _pow2(hidden, 16, 1 << 30), 4)
        if batch > cfg.block_b:
            raise ValueError(f"the interpreter runs the persistent {kind} kernel with one "
                             f"program only (batch <= 64), got batch {batch}")
    else:
        cfg = _persistent_choice(spec, like, False, backward)
        if cfg is None:
            why = ("the GPU refused it at an earlier launch: shared memory or co-residency"
                   if _persistent_key(spec, like, backward) in _persistent_out_of_resources
                   else "grid <= SM count, W_hh slice on chip")
            raise ValueError(
                f"the persistent {kind} kernel cannot hold hidden_size {hidden}, batch "
                f"{batch}, {like.dtype} on this GPU ({why})"
            )
    grid = (triton.cdiv(hidden, cfg.block_h), triton.cdiv(batch, cfg.block_b))
    flags = torch.zeros(2, device=like.device, dtype=torch.int32)  # barrier counter, timed out
    # The row counts reach the device without a host sync (a pageable copy would sync).
    if batch_sizes is None:
        rows = torch.full((steps,), batch, device=like.device, dtype=torch.int32)
    else:
        rows = batch_sizes.to(torch.int32)
        rows = (rows.pin_memory() if like.is_cuda else rows).to(like.device, non_blocking=True)
    return cfg, grid, flags, rows


def _check_barrier(flags, grid, kind: str) -> None:
    # A host sync per call (the kernel's wait is bounded either way): a timed-out
    # barrier means wrong outputs, which must not be returned silently. It costs the
    # overlap of the next launches with this kernel, ~10-50 us of host time per call.
    if int(flags[1]) != 0:
        raise RuntimeError(
            f"persistent {kind} kernel: grid barrier timed out with {grid[0] * grid[1]} "
            "programs; they were not co-resident (is another kernel occupying the GPU?)"
        )


def _persistent_run(spec, gx, h_state, c, y, w_hh, b_hn, act, extra, batch_sizes, need_saved):
    steps, batch, _ = gx.shape
    cfg, grid, flags, rows = _persistent_setup(spec, gx, batch_sizes, backward=False)
    c_state = gx if c is None else c  # read at the start and written at the end by its owner
    recurrence_forward_persistent[grid](
        gx, h_state, c_state, c_state, y, w_hh, gx if b_hn is None else b_hn,
        gx if act is None else act, gx if extra is None else extra, rows, flags,
        flags[1:], steps, batch, spec.hidden_size, PERSISTENT_SPIN_LIMIT,
        CELL=CELL_IDS[spec.cell], NGATES=spec.gates, HAS_B_HN=b_hn is not None,
        SAVE=need_saved, REVERSE=spec.reverse, INTERPRET=INTERPRETING,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        **persistent_launch_options(),
    )
    _check_barrier(flags, grid, "forward")


def _persistent_backward_run(spec, act, h_prev, extra, w_hh, d_y, dh, dc, d_gx, d_gh,
                             batch_sizes):
    steps, batch, _ = act.shape
    cfg, grid, flags, rows = _persistent_setup(spec, d_y, batch_sizes, backward=True)
    recurrence_backward_persistent[grid](
        d_y, dh, act if dc is None else dc, act, act if extra is None else extra, h_prev,
        w_hh, d_gx, d_gh, rows, flags, flags[1:], steps, batch, spec.hidden_size,
        PERSISTENT_SPIN_LIMIT, CELL=CELL_IDS[spec.cell], NGATES=spec.gates,
        REVERSE=spec.reverse, INTERPRET=INTERPRETING,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        **persistent_launch_options(),
    )
    _check_barrier(flags, grid, "backward")


#: Values of ``mode`` (see ``backward``).
BACKWARD_MODES = ("step", "persistent", "auto")


def backward_mode() -> str:
    """The pin ``experimental.set_kernels(triton_backward=...)``, default "step"; "auto"
    and "persistent" (the persistent backward, not yet run on a GPU) only with
    CNNLSTM_FAST_EXPERIMENTAL=1 (cnnlstm_fast/experimental.py)."""
    return experimental.choice(experimental.TRITON_BACKWARD)


def backward(spec, saved, batch_sizes, d_y, d_hT, d_cT, mode=None):
    """The reverse-time recurrence. ``mode``: "step" (two launches a step), "persistent"
    (one launch for the layer; raises where it cannot run: projections, a grid larger
    than the SM count or a slice too large on chip; in the interpreter only a grid of
    one program), or "auto" (persistent where it fits, else per step). None: the
    ``triton_backward`` pin (``backward_mode``; the persistent backward has not run on a
    GPU yet)."""
    mode = backward_mode() if mode is None else mode
    if mode not in BACKWARD_MODES:
        raise ValueError(f"mode must be one of {', '.join(BACKWARD_MODES)}, got {mode!r}")
    with _on_device(saved[0].device):
        return _backward(spec, saved, batch_sizes, d_y, d_hT, d_cT, mode)


def _backward(spec, saved, batch_sizes, d_y, d_hT, d_cT, mode):
    act, h_prev, extra, w_hh, w_hr, m = saved
    steps, batch, gate_width = act.shape
    hidden, out_size = spec.hidden_size, h_prev.shape[2]
    proj, gru = w_hr is not None, spec.cell == "gru"
    f32 = dict(device=act.device, dtype=torch.float32)
    d_y = d_y.contiguous()
    dh = d_hT.to(torch.float32).contiguous().clone()
    dc = None
    if spec.cell == "lstm":
        dc = torch.zeros(batch, hidden, **f32) if d_cT is None else d_cT.to(torch.float32).contiguous().clone()
    d_gx = torch.zeros(steps, batch, gate_width, **f32)
    d_gh = torch.zeros_like(d_gx) if gru else d_gx
    d_h_all = torch.zeros(steps, batch, out_size, **f32) if proj else None

    persistent = _try_persistent(
        mode, mode == "auto" and _persistent_choice(spec, d_y, proj, backward=True), proj,
        _persistent_key(spec, d_y, backward=True), "backward",
        lambda: _persistent_backward_run(spec, act, h_prev, extra, w_hh, d_y, dh, dc, d_gx,
                                         d_gh, batch_sizes))
    if not persistent:
        _step_backward(spec, act, h_prev, extra, w_hh, w_hr, d_y, batch_sizes, dh, dc, d_gx,
                       d_gh, d_h_all)

    # (T, B, n) -> (T*B, n) by flatten: reshape(-1, n) is ambiguous where n == 0
    d_w_hh = d_gh.flatten(0, 1).T @ h_prev.flatten(0, 1)
    d_w_hr = None
    if proj:
        d_w_hr = d_h_all.flatten(0, 1).T @ m.flatten(0, 1)
    d_b_hn = d_gh[..., 2 * hidden :].sum((0, 1)) if gru else None
    return d_gx, dh, dc, d_w_hh, d_w_hr, d_b_hn


def _step_backward(spec, act, h_prev, extra, w_hh, w_hr, d_y, batch_sizes, dh, dc, d_gx, d_gh,
                   d_h_all):
    """The per-step backward loop; updates dh, dc, d_gx, d_gh, d_h_all in place."""
    steps, batch, _ = act.shape
    rows = _active_rows(batch_sizes, steps, batch)  # host ints: the loop slices by them
    hidden, out_size = spec.hidden_size, h_prev.shape[2]
    proj, gru = w_hr is not None, spec.cell == "gru"
    dh_in, dh_next = dh, torch.empty_like(dh)
    cfg = step_config(batch, hidden, out_size, w_hh.element_size())
    grid = (triton.cdiv(hidden, cfg.block_h), triton.cdiv(batch, cfg.block_b))
    # d_h = dG_h W_hh per step is a float32 torch GEMM (cuBLAS), with W_hh as the forward
    # used it: a Triton row-times-matrix kernel ran the 4H-long reduction in a few dozen
    # programs (~90 us a step at B=16, H=768 on an H100). IEEE float32 unless the caller
    # allowed TF32 in torch.backends.cuda.matmul.
    w_hh_f = w_hh.to(torch.float32)
    z = act[..., hidden : 2 * hidden] if gru else None  # GRU: d_h also flows through z
    for t in reversed(_order(steps, spec.reverse)):
        recurrence_step_backward[grid](
            dh, d_y[t], act if dc is None else dc, act[t], act if extra is None else extra[t],
            h_prev[t], act if w_hr is None else w_hr, d_gx[t], d_gh[t],
            act if d_h_all is None else d_h_all[t], rows[t], batch, hidden, out_size,
            CELL=CELL_IDS[spec.cell], NGATES=spec.gates, PROJ=proj, INTERPRET=INTERPRETING,
            BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
        )
        n = rows[t]  # active rows get d_gh W_hh (+ (dh + dY) z for GRU); the others keep dh
        if n > 0:
            if gru:
                torch.addmm((dh[:n] + d_y[t, :n]) * z[t, :n], d_gh[t, :n], w_hh_f, out=dh_next[:n])
            else:
                torch.mm(d_gh[t, :n], w_hh_f, out=dh_next[:n])
        if n < batch:
            dh_next[n:] = dh[n:]
        dh, dh_next = dh_next, dh
    if dh is not dh_in:
        dh_in.copy_(dh)
