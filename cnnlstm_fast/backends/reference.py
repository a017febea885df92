"""The ``reference`` backend: the executable specification of the recurrence.

Plain PyTorch, one step at a time, with the backward written out by hand so that
every kernel (and its saved state) has an explicit counterpart to be compared with.
float16/bfloat16 inputs are computed in float32 (accumulation and cell state in
float32, outputs in the input dtype), as every kernel does.

Per step t (rows [0, n_t) active, see base.py):
  LSTM  a = G_x[t] + h W_hh^T;  i,f,o = sigmoid, g = tanh;  c' = f c + i g;
        m = o tanh(c');  h' = m W_hr^T (projection) or m
  GRU   a = h W_hh^T;  r = sigmoid(G_x_r + a_r);  z = sigmoid(G_x_z + a_z);
        n = tanh(G_x_n + r (a_n + b_hn));  h' = (1 - z) n + z h
  RNN   h' = tanh | relu(G_x[t] + h W_hh^T)
"""

from __future__ import annotations

import torch

from .base import Backend, RecurrenceSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 for the 16-bit float types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def step_order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def active_rows(batch_sizes: torch.Tensor | None, steps: int, batch: int) -> list[int]:
    if batch_sizes is None:
        return [batch] * steps
    return [int(n) for n in batch_sizes.tolist()]


def cell_step(cell, gx_t, h, c, w_hh, w_hr, b_hn):
    """One step of the active rows, in out-of-place ops: ``(h', c' or None, the gate
    activations (LSTM i,f,g,o; GRU r,z,n; RNN h'), GRU's a_n + b_hn or None)``."""
    a_h = h @ w_hh.T
    if cell == "lstm":
        i, f, g, o = (gx_t + a_h).chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c + i * g
        m = o * c_new.tanh()
        return m if w_hr is None else m @ w_hr.T, c_new, torch.cat((i, f, g, o), 1), None
    if cell == "gru":
        x_r, x_z, x_n = gx_t.chunk(3, 1)
        h_r, h_z, h_n = a_h.chunk(3, 1)
        if b_hn is not None:
            h_n = h_n + b_hn
        r = (x_r + h_r).sigmoid()
        z = (x_z + h_z).sigmoid()
        n = (x_n + r * h_n).tanh()
        return (1 - z) * n + z * h, None, torch.cat((r, z, n), 1), h_n
    pre = gx_t + a_h
    h_new = pre.tanh() if cell == "rnn_tanh" else pre.relu()
    return h_new, None, h_new, None


class ReferenceBackend(Backend):
    name = "reference"
    supports = "every device and floating dtype (float16/bfloat16 computed in float32)"

    def unsupported_reason(self, spec: RecurrenceSpec) -> str | None:
        if not spec.dtype.is_floating_point:
            return f"dtype {spec.dtype} is not a floating point type"
        return None

    def forward(self, spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved):
        acc = compute_dtype(gx.dtype)
        steps, batch, _ = gx.shape
        hidden = spec.hidden_size
        gx = gx.to(acc)
        w_hh = w_hh.to(acc)
        w_hr = None if w_hr is None else w_hr.to(acc)
        b_hn = None if b_hn is None else b_hn.to(acc)
        h = h0.to(acc).clone()
        c = None if c0 is None else c0.to(acc).clone()
        y = gx.new_zeros(steps, batch, h.shape[1])
        act = gx.new_zeros(gx.shape)
        h_prev = gx.new_zeros(steps, batch, h.shape[1])
        # LSTM: the cell state before each step; GRU: a_n + b_hn of each step.
        extra = gx.new_zeros(steps, batch, hidden) if spec.cell in ("lstm", "gru") else None
        rows = active_rows(batch_sizes, steps, batch)

        for t in step_order(steps, spec.reverse):
            n = rows[t]
            hp = h[:n]
            h_prev[t] = h
            if spec.cell == "lstm":
                extra[t] = c
            h_new, c_new, act[t, :n], extra_t = cell_step(
                spec.cell, gx[t, :n], hp, None if c is None else c[:n], w_hh, w_hr, b_hn)
            if spec.cell == "lstm":
                c[:n] = c_new
            elif spec.cell == "gru":
                extra[t, :n] = extra_t
            h[:n] = h_new
            y[t, :n] = h_new

        dtype = h0.dtype
        saved = (act, h_prev, extra, w_hh, w_hr) if need_saved else ()
        c_out = None if c is None else c.to(dtype)
        return y.to(dtype), h.to(dtype), c_out, saved

    def backward(self, spec, saved, batch_sizes, d_y, d_hT, d_cT):
        # out of place (each step's rows padded to the batch, then stacked), so that
        # torch.func's vmap can batch it (jacrev, a Hessian)
        act, h_prev, extra, w_hh, w_hr = saved
        acc = act.dtype
        steps, batch, gate_width = act.shape
        d_y = d_y.to(acc)
        dh = d_hT.to(acc)
        dc = None if d_cT is None else d_cT.to(acc)
        rows = active_rows(batch_sizes, steps, batch)
        d_gx, d_gh, d_h_all, m_all = ([None] * steps for _ in range(4))

        for t in reversed(step_order(steps, spec.reverse)):
            n = rows[t]
            g_h = dh[:n] + d_y[t, :n]
            if spec.cell == "lstm":
                i, f, g, o = act[t, :n].chunk(4, 1)
                c_prev = extra[t, :n]
                tanh_c = (f * c_prev + i * g).tanh()
                if w_hr is not None:
                    d_h_all[t] = _pad_rows(g_h, batch)
                    m_all[t] = _pad_rows(o * tanh_c, batch)
                    d_m = g_h @ w_hr
                else:
                    d_m = g_h
                d_c = dc[:n] + d_m * o * (1 - tanh_c * tanh_c)
                d_a = torch.cat(
                    (
                        d_c * g * i * (1 - i),
                        d_c * c_prev * f * (1 - f),
                        d_c * i * (1 - g * g),
                        d_m * tanh_c * o * (1 - o),
                    ),
                    1,
                )
                d_a_h = d_a
                dc = _keep_rows(d_c * f, dc)
                dh_new = d_a @ w_hh
            elif spec.cell == "gru":
                r, z, nn_ = act[t, :n].chunk(3, 1)
                h_n = extra[t, :n]
                d_an = g_h * (1 - z) * (1 - nn_ * nn_)
                d_ar = d_an * h_n * r * (1 - r)
                d_az = g_h * (h_prev[t, :n] - nn_) * z * (1 - z)
                d_a = torch.cat((d_ar, d_az, d_an), 1)
                # the recurrent pre-activation's gradient differs from G_x's in the n gate
                d_a_h = torch.cat((d_ar, d_az, d_an * r), 1)
                dh_new = g_h * z + d_a_h @ w_hh
            else:
                h_new = act[t, :n]
                if spec.cell == "rnn_tanh":
                    d_a = g_h * (1 - h_new * h_new)
                else:
                    d_a = g_h * (h_new > 0).to(acc)
                d_a_h = d_a
                dh_new = d_a @ w_hh
            dh = _keep_rows(dh_new, dh)
            d_gx[t], d_gh[t] = _pad_rows(d_a, batch), _pad_rows(d_a_h, batch)

        d_gx = _stack(d_gx, act)
        d_gh = _stack(d_gh, act)
        # (T, B, n) -> (T*B, n) by flatten: reshape(-1, n) is ambiguous where n == 0
        d_w_hh = d_gh.flatten(0, 1).T @ h_prev.flatten(0, 1)
        d_w_hr = None
        if w_hr is not None:
            d_h_all = _stack(d_h_all, act.new_zeros(steps, batch, w_hr.shape[0]))
            m_all = _stack(m_all, act.new_zeros(steps, batch, spec.hidden_size))
            d_w_hr = d_h_all.flatten(0, 1).T @ m_all.flatten(0, 1)
        d_b_hn = d_gh[..., 2 * spec.hidden_size :].sum((0, 1)) if spec.cell == "gru" else None
        return d_gx, dh, dc, d_w_hh, d_w_hr, d_b_hn


def _pad_rows(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """A step's active rows followed by zero rows up to the batch."""
    if rows.shape[0] == batch:
        return rows
    return torch.cat((rows, rows.new_zeros(batch - rows.shape[0], *rows.shape[1:])))


def _keep_rows(active: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The state with its first rows replaced by the active ones (the rest carried)."""
    if active.shape[0] == state.shape[0]:
        return active
    return torch.cat((active, state[active.shape[0]:]))


def _stack(steps: list, like: torch.Tensor) -> torch.Tensor:
    return torch.stack(steps) if steps else like.new_zeros(like.shape)


def differentiable_forward(spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes):
    """The same recurrence as :meth:`ReferenceBackend.forward`, in out-of-place ops that
    autograd records: ``(Y, h_T, c_T or None)``. What the second derivative recomputes
    and differentiates (see ``cnnlstm_fast/ops/recurrence.py``); float16/bfloat16 are
    computed in float32 as in the forward."""
    acc = compute_dtype(gx.dtype)
    steps, batch, _ = gx.shape
    gx, w_hh = gx.to(acc), w_hh.to(acc)
    w_hr = None if w_hr is None else w_hr.to(acc)
    b_hn = None if b_hn is None else b_hn.to(acc)
    h = h0.to(acc)
    c = None if c0 is None else c0.to(acc)
    rows = active_rows(batch_sizes, steps, batch)
    ys = [None] * steps
    for t in step_order(steps, spec.reverse):
        n = rows[t]
        h_new, c_new, _, _ = cell_step(
            spec.cell, gx[t, :n], h[:n], None if c is None else c[:n], w_hh, w_hr, b_hn)
        if c_new is not None:
            c = _keep_rows(c_new, c)
        h = _keep_rows(h_new, h)
        ys[t] = _pad_rows(h_new, batch)
    y = torch.stack(ys) if steps else gx.new_zeros(0, batch, h.shape[1])
    dtype = h0.dtype
    return y.to(dtype), h.to(dtype), None if c is None else c.to(dtype)
