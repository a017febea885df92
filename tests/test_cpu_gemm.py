"""The cpu backend's own float32 GEMM (csrc/cpu/gemm*.cpp) and its users.

``cnnlstm_fast::linear`` (the input projection and its gradient GEMMs) and the
recurrence's per-step GEMMs, with the AVX-512 kernel and with torch's BLAS
(cnnlstm_fast.backends.cpu.use_gemm), against float64 on shapes that hit every tile edge: rows
1-3 (the 3 x 128 tile), 4-13 and 97-193 (12-row tiles and the 96-row blocks), columns
that are not multiples of the 32-wide panel, k = 1. Also the float tanh and sigmoid of the
pointwise pass (its own exp on AVX-512), through steps whose recurrent part is zero.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast import _ext
from cnnlstm_fast.backends import cpu, get_backend
from cnnlstm_fast.backends.base import RecurrenceSpec

from helpers import assert_as_accurate_as

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(
    CPU.unavailable_reason() is not None, reason=f"cpu backend: {CPU.unavailable_reason()}"
)


def _avx512() -> bool:
    module = _ext.load()
    return module is not None and module.cpu_gemm_info()["avx512_supported"]


GEMMS = [
    pytest.param("avx512", marks=pytest.mark.skipif(not _avx512(), reason="no AVX-512F")),
    "blas",
]


@pytest.fixture(params=GEMMS)
def gemm(request):
    with cpu.use_gemm(request.param):
        assert _ext.load().cpu_gemm_info()["in_use"] == request.param
        assert cpu.gemm_in_use() == request.param
        yield request.param
    assert cpu.get_gemm() == "auto"


LINEAR_SHAPES = [  # (rows, in, out)
    (1, 1, 1),
    (2, 7, 33),
    (3, 40, 129),
    (4, 5, 32),
    (13, 17, 64),
    (97, 31, 95),
    (193, 64, 300),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rows,k,n", LINEAR_SHAPES, ids=lambda v: str(v))
def test_linear_forward_backward(gemm, rows, k, n, bias):
    torch.manual_seed(rows * 1000 + k * 10 + n)
    x64 = torch.randn(rows, k, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(n, dtype=torch.float64, requires_grad=True) if bias else None
    g64 = torch.randn(rows, n, dtype=torch.float64)
    leaves64 = [t for t in (x64, w64, b64) if t is not None]

    def grads(fn, leaves, g):
        out = fn(*leaves) if bias else fn(*leaves, None)
        return [out, *torch.autograd.grad(out, leaves, g)]

    names = ["y", "dx", "dw", "db"][: 1 + len(leaves64)]
    exact = grads(torch.nn.functional.linear, leaves64, g64)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    ours = grads(torch.ops.cnnlstm_fast.linear, leaves32, g64.float())
    theirs = grads(torch.nn.functional.linear, leaves32, g64.float())
    assert_as_accurate_as(names, ours, theirs, exact)


def test_linear_reads_strided_views_and_batched_input(gemm):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24)  # (T, B, in): leading dims flattened
    w_t = torch.randn(24, 70).t()  # a transposed view as the weight
    expected = torch.nn.functional.linear(x.double(), w_t.double()).float()
    torch.testing.assert_close(torch.ops.cnnlstm_fast.linear(x, w_t, None), expected)
    a_t = torch.randn(24, 9).t()  # a transposed view as the input
    torch.testing.assert_close(
        torch.ops.cnnlstm_fast.linear(a_t, w_t, None),
        torch.nn.functional.linear(a_t.double(), w_t.double()).float(),
    )


def test_linear_opcheck(gemm):
    x, w, b = torch.randn(6, 5, requires_grad=True), torch.randn(37, 5), torch.randn(37)
    torch.library.opcheck(torch.ops.cnnlstm_fast.linear, (x, w, b))


@pytest.mark.parametrize(
    "steps,batch,hidden", [(3, 1, 40), (4, 3, 33), (3, 13, 17), (2, 100, 9)], ids=str
)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrence_with_each_gemm(gemm, cell, steps, batch, hidden):
    """The per-step GEMMs (forward and the transposed ones of backward) and the module's
    input projection, against float64, with each GEMM."""
    torch.manual_seed(steps * 100 + batch + hidden)
    kwargs = dict(input_size=11, hidden_size=hidden, num_layers=2, bidirectional=True)
    exact = getattr(torch.nn, cell.upper())(**kwargs).double()
    ours = getattr(clf, cell.upper())(**kwargs, backend="cpu")
    theirs = getattr(torch.nn, cell.upper())(**kwargs)
    ours.load_state_dict(exact.state_dict())
    theirs.load_state_dict(exact.state_dict())
    x = torch.randn(steps, batch, 11, dtype=torch.float64)

    def run(module, dtype):
        inp = x.to(dtype).requires_grad_()
        y = module(inp)[0]
        g = torch.ones_like(y) / y.numel() ** 0.5
        return [y, *torch.autograd.grad(y, [inp, *module.parameters()], g)]

    names = ["y", "dx", *(n for n, _ in exact.named_parameters())]
    assert_as_accurate_as(names, run(ours, torch.float32), run(theirs, torch.float32),
                          run(exact, torch.float64))


def test_tanh_of_the_pointwise_pass_is_within_a_few_ulps():
    """rnn_tanh with W_hh = 0 and h0 = 0 computes h = tanh(G_x) elementwise."""
    special = [0.0, 1e-30, -1e-7, 0.5499999, 0.55, 0.5500001, -0.55, 9.0, 44.0, 89.0,
               float("inf"), float("-inf")]
    values = torch.cat([torch.tensor(special), torch.linspace(-12, 12, 100_003),
                        torch.randn(10_000) * 1e-3]).float()
    hidden = 33  # not a multiple of the vector width: the masked tail too
    values = torch.cat([values, values[: -values.numel() % hidden]])
    batch = values.numel() // hidden
    spec = RecurrenceSpec("rnn_tanh", hidden, 0, False, torch.device("cpu"), torch.float32,
                          batch, 1, False)

    def tanh(gx):
        return CPU.forward(spec, gx.view(1, batch, hidden), torch.zeros(batch, hidden), None,
                           torch.zeros(hidden, hidden), None, None, None, False)[0].view(-1)

    y = tanh(values)
    exact = torch.tanh(values.double())
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    err_ulps = ((y.double() - exact).abs() / ulp).max().item()
    assert err_ulps <= 4, f"tanh error {err_ulps:.2f} ulps"
    assert torch.isnan(tanh(torch.full_like(values, float("nan")))).all()


def test_sigmoid_and_tanh_of_the_lstm_step_are_within_a_few_ulps():
    """lstm with W_hh = 0 and h0 = c0 = 0 saves sigmoid(G_x) for the i, f and o gates
    and tanh(G_x) for g: the pointwise pass's exp (exp_float on AVX-512) through both."""
    hidden = 37  # not a multiple of the vector width: the masked tail too
    values = torch.cat([torch.linspace(-87, 30, 200_003), torch.randn(20_000) * 1e-3,
                        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.55, -0.55, 16.5, -16.5])])
    values = torch.cat([values, values[: -values.numel() % (4 * hidden)]]).float()
    batch = values.numel() // (4 * hidden)
    gx = values[torch.randperm(values.numel())].view(1, batch, 4 * hidden)
    zeros = torch.zeros(batch, hidden)
    act = torch.ops.cnnlstm_fast.recurrence_forward(
        "lstm", gx, zeros, zeros, torch.zeros(4 * hidden, hidden), None, None, None, False,
        True)[3].view(batch, 4, hidden)
    pre = gx.view(batch, 4, hidden).double()
    exact = torch.stack([pre[:, 0].sigmoid(), pre[:, 1].sigmoid(), pre[:, 2].tanh(),
                         pre[:, 3].sigmoid()], 1)
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    err_ulps = ((act.double() - exact).abs() / ulp).amax(dim=(0, 2))
    # Measured 1.4-1.5 (torch.sigmoid in float32: 1.2), in units of eps * |exact|.
    assert (err_ulps <= 2).all(), f"i, f, g, o errors {err_ulps.tolist()} ulps"

    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 100.0, -100.0, 89.0,
                            -89.0, 0.0])
    gx = special.repeat(4).view(1, 1, 4 * 8)
    act = torch.ops.cnnlstm_fast.recurrence_forward(
        "lstm", gx, torch.zeros(1, 8), torch.zeros(1, 8), torch.zeros(32, 8), None, None,
        None, False, True)[3].view(4, 8)
    # As float32 computes 1 / (1 + exp(-x)) and tanh: exp overflows to inf past 88.7.
    want_sigmoid = torch.tensor([float("nan"), 1, 0, 1, 0, 1, 0, 0.5])
    want_tanh = torch.tensor([float("nan"), 1, -1, 1, -1, 1, -1, 0])
    for gate, want in zip(act, [want_sigmoid, want_sigmoid, want_tanh, want_sigmoid]):
        torch.testing.assert_close(gate, want, equal_nan=True, rtol=0, atol=0)


def test_bad_gemm_choice_is_named():
    with pytest.raises(ValueError, match="gemm must be one of 'auto', 'avx512', 'blas', "
                                         "got 'mkl'"):
        cpu.set_gemm("mkl")
    with pytest.raises(ValueError, match="gemm must be one of 'auto', 'avx512', 'blas', "
                                         "got 'AVX512'"):
        _ext.load().cpu_set_gemm("AVX512")  # the extension checks too
    assert cpu.get_gemm() == "auto"
    if not _avx512():
        with pytest.raises(ValueError, match="'avx512' needs a CPU with AVX-512F"):
            cpu.set_gemm("avx512")
        assert cpu.get_gemm() == "auto"


def test_use_gemm_restores_the_setting_after_an_error():
    with pytest.raises(KeyError):
        with cpu.use_gemm("blas"):
            assert cpu.gemm_in_use() == "blas"
            raise KeyError("inside")
    assert cpu.get_gemm() == "auto"
    assert cpu.gemm_in_use() == ("avx512" if _avx512() else "blas")


def test_inference_saves_nothing(monkeypatch):
    """Under no_grad the recurrence is asked for no saved state, even though the
    weights require grad (a forward that saved it wrote T x B x gates x H for nothing).
    Packed and padded inference take forward_from_input (packed rows read in place, a
    permuted conv output's strided features copied); a ConvToSequence block hands its
    first layer G_x and takes forward."""
    calls = []
    forward, from_input = type(CPU).forward, type(CPU).forward_from_input

    def spy(self, spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved):
        calls.append(need_saved)
        return forward(self, spec, gx, h0, c0, w_hh, w_hr, b_hn, batch_sizes, need_saved)

    def spy_from_input(self, *args, **kwargs):
        result = from_input(self, *args, **kwargs)
        calls.append("from_input" if result is not None else "declined")
        return result

    monkeypatch.setattr(type(CPU), "forward", spy)
    monkeypatch.setattr(type(CPU), "forward_from_input", spy_from_input)
    lstm = clf.LSTM(4, 6, backend="cpu")
    x = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    with torch.no_grad():
        lstm(x)
        lstm(torch.randn(2, 4, 3).permute(2, 0, 1))
        clf.ConvToSequence(lstm)(torch.randn(2, 4, 3))
    lstm(x)
    assert calls == ["from_input", "from_input", False, True]


@pytest.mark.parametrize(
    "cell,kwargs,steps,batch",
    [
        # 64 rows x 512 gate columns: 16 steps per 2 MiB chunk, so 37 steps take 3 chunks
        ("LSTM", dict(hidden_size=128), 37, 64),
        ("LSTM", dict(hidden_size=20, num_layers=2, bidirectional=True, proj_size=7), 9, 3),
        ("GRU", dict(hidden_size=130, bidirectional=True), 21, 65),
        ("GRU", dict(hidden_size=5, bias=False), 4, 1),
        ("RNN", dict(hidden_size=33, nonlinearity="relu", num_layers=2), 6, 2),
    ],
    ids=["lstm_chunks", "lstm_proj_bi", "gru_bi_chunks", "gru_nobias", "rnn_relu"],
)
@pytest.mark.parametrize("layout", ["time_major", "batch_first", "conv_permute", "packed"])
def test_inference_from_input_matches_torch_nn(gemm, monkeypatch, cell, kwargs, steps, batch,
                                               layout):
    """Inference runs recurrence_forward_from_input (G_x in chunks of steps) on the input
    where it lies (time-major, a batch-first input's transposed view, a conv output
    permuted to (T, B, C), a PackedSequence's rows), against torch.nn in float64 and
    against torch.nn's fp32 result."""
    used = []
    # one direction at a time, or both at once (bidirectional: csrc/cpu/directions.cpp)
    for name in ("forward_from_input", "forward_from_input_directions"):
        def spy(self, *args, _method=getattr(type(CPU), name), **kw):
            result = _method(self, *args, **kw)
            used.append(result is not None)
            return result

        monkeypatch.setattr(type(CPU), name, spy)
    torch.manual_seed(steps + batch)
    kwargs = dict(kwargs, batch_first=layout == "batch_first")
    exact = getattr(torch.nn, cell)(input_size=10, **kwargs).double()
    ours = getattr(clf, cell)(input_size=10, **kwargs, backend="cpu")
    theirs = getattr(torch.nn, cell)(input_size=10, **kwargs)
    ours.load_state_dict(exact.state_dict())
    theirs.load_state_dict(exact.state_dict())
    x = torch.randn(steps, batch, 10, dtype=torch.float64)
    if layout == "batch_first":
        x = x.transpose(0, 1).contiguous()
    elif layout == "conv_permute":  # a conv's (B, C, T) output permuted to (T, B, C)
        x = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    lengths = torch.randint(1, steps + 1, (batch,), generator=torch.Generator().manual_seed(1))
    lengths[batch // 2] = steps

    def call(module, inp):
        if layout == "packed":
            inp = torch.nn.utils.rnn.pack_padded_sequence(inp, lengths, enforce_sorted=False)
        y, state = module(inp)
        return [y.data if layout == "packed" else y,
                *(state if isinstance(state, tuple) else (state,))]

    with torch.no_grad():
        got = call(ours, x.float())
        reference = call(theirs, x.float())
        wanted = call(exact, x)
    assert used and all(used), "inference did not take forward_from_input"
    assert_as_accurate_as(["y", "h_n", "c_n"], got, reference, wanted)


def test_forward_from_input_opcheck():
    x, w_ih, b = torch.randn(5, 3, 4), torch.randn(24, 4), torch.randn(24)
    h0, c0, w_hh = torch.randn(3, 6), torch.randn(3, 6), torch.randn(24, 6)
    torch.library.opcheck(
        torch.ops.cnnlstm_fast.recurrence_forward_from_input,
        ("lstm", x, w_ih, b, h0, c0, w_hh, None, None, True),
    )
    torch.library.opcheck(
        torch.ops.cnnlstm_fast.recurrence_forward_from_input,
        ("lstm", x, w_ih, b, h0, c0, w_hh, None, None, False), {"kernel_name": "per_step"},
    )
    # a PackedSequence's rows: 5 steps of 3, 3, 2, 1, 1 rows
    torch.library.opcheck(
        torch.ops.cnnlstm_fast.recurrence_forward_from_input,
        ("lstm", torch.randn(10, 4), w_ih, b, h0, c0, w_hh, None, None, True),
        {"batch_sizes": torch.tensor([3, 3, 2, 1, 1])},
    )


def test_forward_from_input_checks_packed_rows():
    """Packed input must be a PackedSequence's: batch sizes never increasing, summing to
    the rows of x; the errors say what was wrong."""
    w_ih, h0, c0, w_hh = torch.randn(24, 4), torch.randn(3, 6), torch.randn(3, 6), torch.randn(24, 6)
    op = torch.ops.cnnlstm_fast.recurrence_forward_from_input
    with pytest.raises(RuntimeError, match="must sum to x's rows \\(9\\), got 10"):
        op("lstm", torch.randn(9, 4), w_ih, None, h0, c0, w_hh, None, None, False,
           batch_sizes=torch.tensor([3, 3, 2, 1, 1]))
    with pytest.raises(RuntimeError, match="never increase.*got 2 then 3 at step 2"):
        op("lstm", torch.randn(10, 4), w_ih, None, h0, c0, w_hh, None, None, False,
           batch_sizes=torch.tensor([3, 2, 3, 1, 1]))
    with pytest.raises(RuntimeError, match="x must be 2-D \\(rows, input\\) with batch_sizes"):
        op("lstm", torch.randn(5, 2, 4), w_ih, None, h0, c0, w_hh, None, None, False,
           batch_sizes=torch.tensor([2, 2, 2, 2, 2]))


@pytest.mark.parametrize("rows,k,n", [(13, 257, 33), (97, 300, 95), (200, 513, 64), (25, 1, 7)],
                         ids=str)
def test_linear_with_transposed_input_runs_k_blocks(gemm, rows, k, n):
    """A transposed input (as dW = dG^T h reads dG) with more than one 12-row tile takes
    the K-blocked path with A packed (gemm.cpp): k across block edges (256), tiles of
    fewer rows, columns that are not whole panels."""
    torch.manual_seed(rows + k + n)
    a = torch.randn(k, rows, dtype=torch.float64).t()
    w = torch.randn(k, n, dtype=torch.float64).t()
    b = torch.randn(n, dtype=torch.float64)
    exact = torch.nn.functional.linear(a, w, b)
    ours = torch.ops.cnnlstm_fast.linear(a.float(), w.float(), b.float())
    theirs = torch.nn.functional.linear(a.float(), w.float(), b.float())
    assert_as_accurate_as(["y"], [ours], [theirs], [exact])


def _cache_info():
    from cnnlstm_fast.backends import cpu

    return cpu.cache_info()


@pytest.fixture
def cache_limit():
    """Restores the cache bound the extension loaded with after the test."""
    before = _cache_info()["limit_bytes"]
    yield
    _ext.load().cpu_set_cache_limit(before)


def test_buffer_cache_reuses_freed_blocks_and_empties(cache_limit):
    """Large outputs come from the cache once freed; reused memory is overwritten (the
    second result does not depend on the first); empty_cache gives the blocks back."""
    from cnnlstm_fast.backends import cpu

    cpu.set_cache_limit(1024)
    torch.manual_seed(0)
    x1, x2, w = torch.randn(2048, 64), torch.randn(2048, 64), torch.randn(300, 64)
    cpu.empty_cache()
    before = _cache_info()
    y1 = torch.ops.cnnlstm_fast.linear(x1, w, None)  # 2.4 MB: a cached size
    assert _cache_info()["in_use_bytes"] >= y1.numel() * 4
    expected1 = y1.clone()
    del y1
    after_free = _cache_info()
    assert after_free["cached_blocks"] >= 1
    y2 = torch.ops.cnnlstm_fast.linear(x2, w, None)
    after_reuse = _cache_info()
    assert after_reuse["hits"] == before["hits"] + 1
    torch.testing.assert_close(y2, torch.nn.functional.linear(x2.double(), w.double()).float())
    assert not torch.equal(y2, expected1)
    y2.resize_(4096, 300).fill_(1.0)  # an ordinary resizable tensor
    del y2
    cpu.empty_cache()
    assert _cache_info()["cached_bytes"] == 0


def test_buffer_cache_blocks_show_in_the_profilers_memory_view(cache_limit):
    """torch.profiler(profile_memory=True) sees a block of the cache handed out and given
    back, with the block's size, as it sees c10's CPU allocations: a block reused from
    the cache as well as a new one (peak_memory.py's tensor peak rests on it)."""
    from torch.profiler import ProfilerActivity, profile

    cpu.set_cache_limit(1024)
    x, w = torch.randn(2048, 64), torch.randn(300, 64)
    for reused in (False, True):
        if not reused:
            cpu.empty_cache()
        hits = _cache_info()["hits"]
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y = torch.ops.cnnlstm_fast.linear(x, w, None)  # 2.4 MB: from the cache
            size = y.untyped_storage().nbytes()
            del y
        assert (_cache_info()["hits"] > hits) == reused
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and abs(e.nbytes()) >= size]
        assert len(sizes) == 2 and sizes[0] == -sizes[1] > 0, sizes


def test_buffer_cache_off_and_bad_setting(cache_limit, monkeypatch):
    cpu.empty_cache()
    cpu.set_cache_limit(0)
    x, w = torch.randn(2048, 64), torch.randn(300, 64)
    before = _cache_info()
    del_me = torch.ops.cnnlstm_fast.linear(x, w, None)
    del del_me
    after = _cache_info()
    assert after["limit_bytes"] == 0
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (
        before["hits"], before["misses"], 0)
    for bad in (-1, 1.5, "8", True, None):
        with pytest.raises(ValueError, match=f"mb must be a whole number of MiB >= 0, "
                                             f"got {bad!r}"):
            cpu.set_cache_limit(bad)
    with pytest.raises(ValueError, match="must be >= 0 bytes, got -5"):
        _ext.load().cpu_set_cache_limit(-5)
    assert _cache_info()["limit_bytes"] == 0
    for value, mb in (("", 1024), ("0", 0), (" 16 ", 16)):
        monkeypatch.setenv("CNNLSTM_FAST_CPU_CACHE_MB", value)
        assert _ext.cpu_cache_mb_from_environment() == mb
    for bad in ("lots", "-1", "1.5", "1e3", "0x10"):
        monkeypatch.setenv("CNNLSTM_FAST_CPU_CACHE_MB", bad)
        with pytest.raises(ValueError, match=f"CNNLSTM_FAST_CPU_CACHE_MB must be a whole number "
                                             f"of MB >= 0, got '{bad}'"):
            _ext.cpu_cache_mb_from_environment()


def _in_fresh_process(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=False)


def test_cache_limit_is_read_from_the_environment_when_the_extension_loads():
    """CNNLSTM_FAST_CPU_CACHE_MB reaches the extension when Python loads it; a bad value
    warns and makes the cpu backend unavailable with the error as its reason, so a layer
    that names it raises that error."""
    code = ("import torch, cnnlstm_fast as clf\n"
            "from cnnlstm_fast.backends import cpu\n"
            "print(cpu.cache_info()['limit_bytes'])\n")
    done = _in_fresh_process(code, CNNLSTM_FAST_CPU_CACHE_MB="7")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(7 << 20)
    code = ("import torch, cnnlstm_fast as clf\n"
            "try:\n"
            "    clf.GRU(3, 4, backend='cpu')(torch.randn(2, 1, 3))\n"
            "except clf.backends.BackendUnavailableError as error:\n"
            "    print('raised:', error)\n")
    done = _in_fresh_process(code, CNNLSTM_FAST_CPU_CACHE_MB="lots")
    assert done.returncode == 0, done.stderr
    assert "raised:" in done.stdout and \
        "CNNLSTM_FAST_CPU_CACHE_MB must be a whole number of MB >= 0, got 'lots'" in done.stdout
    assert "RuntimeWarning: CNNLSTM_FAST_CPU_CACHE_MB must be" in done.stderr


def test_buffer_cache_evicts_to_keep_the_block_just_freed(cache_limit):
    cpu.empty_cache()
    cpu.set_cache_limit(3)
    w = torch.randn(300, 64)
    small = torch.ops.cnnlstm_fast.linear(torch.randn(2048, 64), w, None)  # 2.4 MB
    large = torch.ops.cnnlstm_fast.linear(torch.randn(2400, 64), w, None)  # 2.8 MB
    del small
    assert _cache_info()["cached_blocks"] == 1
    del large  # both do not fit in 3 MB: the smaller one goes
    info = _cache_info()
    assert info["cached_blocks"] == 1 and 2_800_000 <= info["cached_bytes"] <= 3 << 20
    cpu.set_cache_limit(2)  # a lower bound gives back what is cached beyond it at once
    info = _cache_info()
    assert (info["limit_bytes"], info["cached_blocks"], info["cached_bytes"]) == (2 << 20, 0, 0)
    cpu.empty_cache()
