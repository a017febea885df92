"""The ``cuda`` backend: availability reporting everywhere; kernels on a GPU.

On a machine without a GPU only the reporting runs (the kernels are compiled by nvcc
during the build, which fails if a kernel does not compile). With a GPU every kernel
path (per-step and persistent) is compared with the reference backend, forward and
backward, fp32 (IEEE) and fp16/bf16 by the tolerance rule of docs/design.md#testing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast import _ext, backends
from cnnlstm_fast.backends import RecurrenceSpec
from cnnlstm_fast.ops.recurrence import recurrence

from helpers import errors_vs_exact
from test_reference import make_args

experimental = pytest.mark.experimental  # tests/conftest.py: runs only with the switch
STREAMED = pytest.param("streamed", marks=experimental("cuda-streamed"))


def test_cuda_backend_reports_why_not_without_a_gpu():
    report = backends.backend_report()
    assert "cuda" in report
    if not torch.cuda.is_available():
        assert report["cuda"] is not None and report["cuda"]
        assert "cuda" not in clf.available_backends()
        with pytest.raises(backends.BackendUnavailableError, match="'cuda' is not available"):
            clf.LSTM(3, 4, backend="cuda")(torch.randn(2, 1, 3))


def test_cuda_kernels_were_compiled_when_nvcc_was_present():
    ext = _ext.load()
    if ext is None:
        pytest.skip(f"extension not built: {_ext.load_error()}")
    info = ext.build_info()
    if not info["cuda"]:
        pytest.skip("built without nvcc")
    assert hasattr(torch.ops.cnnlstm_fast, "recurrence_forward")
    # the op has a CUDA kernel registered even on a machine without a GPU
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "cnnlstm_fast::recurrence_forward", "CUDA"
    )


def _backend(name):
    """The backend, its extension loaded: the compiled backends call torch.ops directly,
    which has no cnnlstm_fast ops until unavailable_reason() has loaded _C (a GPU test run
    alone would fail on that). On a GPU machine an unavailable backend is a failure with
    its reason, not a skip."""
    backend = backends.get_backend(name)
    why = backend.unavailable_reason()
    assert why is None, f"backend {name!r} is unavailable: {why}"
    return backend


def _run(backend, spec, bs, tensors, device, dtype):
    moved = [None if v is None else v.detach().to(device, dtype).requires_grad_(True) for v in tensors]
    spec = RecurrenceSpec(**{**spec.__dict__, "device": torch.device(device), "dtype": dtype})
    y, h, c = recurrence(_backend(backend), spec, *moved, batch_sizes=bs)
    outs = [y, h] + ([c] if c is not None else [])
    gen = torch.Generator(device="cpu").manual_seed(5)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(device)).sum() for o in outs)
    loss.backward()
    return [o.detach().double().cpu() for o in outs], [
        None if v is None else v.grad.double().cpu() for v in moved
    ]


# (cell, hidden, proj, reverse, batch_sizes, batch); 6 steps.
GPU_CASES = [
    ("lstm", 64, 0, False, None, 5),
    ("lstm", 96, 48, True, None, 5),
    ("lstm", 33, 0, False, [5, 5, 3, 2, 2, 1], 5),
    ("gru", 64, 0, True, [5, 4, 4, 2, 1, 1], 5),
    ("gru", 130, 0, False, None, 5),
    ("rnn_tanh", 40, 0, True, None, 5),
    ("rnn_relu", 17, 0, False, [5, 3, 3, 1, 1, 1], 5),
    # hidden above the SM count (A100 108, H100/H200 132): the persistent kernel puts
    # several units in a block (the last one partly empty: 301 is prime) and has more
    # (row, unit) pairs than 32-lane groups, so it splits the reduction over fewer lanes
    # (40 rows) or runs several rounds per step (100 rows); the per-step kernels get
    # reductions of several shared-memory chunks and a partial last row tile.
    ("lstm", 301, 0, True, [40, 40, 31, 17, 17, 2], 40),
    ("gru", 301, 0, False, None, 100),
]


def _make(case, steps=6):
    """make_args with W_hh (and W_hr) scaled by 1/sqrt(fan_in), as torch initialises
    them: with unit-variance weights the recurrence is chaotic and float32 rounding is
    amplified past any sensible tolerance (the reference itself in float32 misses these
    bounds in 4 of the first 7 cases, by up to 6e4x), so a correct kernel would fail."""
    cell, hidden, proj, reverse, sizes, batch = case
    spec, bs, tensors = make_args(cell, hidden, proj, reverse, sizes, dtype=torch.float64,
                                  batch=batch, steps=steps)
    tensors[3] = tensors[3].detach() / (proj or hidden) ** 0.5
    if proj:
        tensors[4] = tensors[4].detach() / hidden**0.5
    return spec, bs, tensors


def _assert_matches_reference_fp32(case, steps=6):
    """Forward and backward of the cuda backend in float32 (the kernels the pins
    select) against the float64 reference."""
    spec, bs, tensors = _make(case, steps)
    ref_out, ref_grads = _run("reference", spec, bs, tensors, "cpu", torch.float64)
    out, grads = _run("cuda", spec, bs, tensors, "cuda", torch.float32)
    for a, e in zip(out, ref_out):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    for a, e in zip(grads, ref_grads):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["step", "persistent", STREAMED, "auto"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_matches_reference_fp32(case, kernel, pin_kernels):
    pin_kernels(cuda_forward=kernel)
    if kernel in ("persistent", "streamed") and case[2]:
        pytest.skip(f"the {kernel} kernel has no projection")
    _assert_matches_reference_fp32(case)


@pytest.mark.gpu
@experimental("cuda-persistent-backward")
@pytest.mark.parametrize("case", [c for c in GPU_CASES if not c[2]], ids=str)
def test_cuda_persistent_backward_matches_reference_fp32(case, pin_kernels):
    """cuda_backward="persistent" (auto does not pick it yet): the reverse-time
    loop in one cooperative launch, W_hh read from L2, against the float64 reference;
    packed sequences, reverse direction, several partial-sum splits and row tiles."""
    pin_kernels(cuda_backward="persistent")
    _assert_matches_reference_fp32(case)


@pytest.mark.gpu
@experimental("cuda-device-row-counts", "cuda-persistent-backward")
@pytest.mark.parametrize("kernel", ["auto", STREAMED])
def test_cuda_packed_rows_written_by_several_launches(kernel, pin_kernels):
    """125 distinct lengths: the kernels that read the row counts from device memory get
    them from two launches of write_row_runs (at most 120 runs each)."""
    pin_kernels(cuda_forward=kernel, cuda_backward="persistent")
    _assert_matches_reference_fp32(("gru", 32, 0, False, list(range(125, 0, -1)), 125), 125)



# Shapes where a streamed kernel's blocks take more than one work item and its threads
# more than one (row, unit) element: more tiles than an H100's grid of 264 blocks
# (column tiles x row tiles: 32 x 9 and 16 x 19).
STREAMED_LARGE_CASES = [("lstm", 1024, 0, False, None, 136), ("rnn_tanh", 2048, 0, True, None, 300)]


@pytest.mark.gpu
@experimental("cuda-streamed", "cuda-persistent-backward")
@pytest.mark.parametrize("case", STREAMED_LARGE_CASES, ids=str)
def test_cuda_streamed_kernels_several_items_per_block(case, pin_kernels):
    """The streamed forward and the persistent backward where each block loops over
    several work items and each thread over several elements (the smaller cases give
    every block one item), float32 against the float64 reference."""
    pin_kernels(cuda_forward="streamed", cuda_backward="persistent")
    _assert_matches_reference_fp32(case, steps=4)


@pytest.mark.gpu
@experimental("cuda-persistent-backward")
@pytest.mark.parametrize("kernel", [STREAMED, "auto"])
@pytest.mark.parametrize("case", [("gru", 301, 0, False, None, 100),
                                  ("lstm", 301, 0, True, [40, 40, 31, 17, 17, 2], 40)], ids=str)
def test_cuda_streamed_kernels_are_deterministic(case, kernel, pin_kernels):
    """The kernels that meet at grid barriers add their split sums in a fixed order, so
    five runs give the same bits; a race between blocks in global memory (which
    compute-sanitizer's racecheck does not see) would show as runs that differ.
    Forward (streamed, or auto's persistent kernel) and the persistent backward."""
    pin_kernels(cuda_forward=kernel, cuda_backward="persistent")
    spec, bs, tensors = _make(case)
    first = _run("cuda", spec, bs, tensors, "cuda", torch.float32)
    for run in range(4):
        again = _run("cuda", spec, bs, tensors, "cuda", torch.float32)
        for i, (a, e) in enumerate(zip([*again[0], *again[1]], [*first[0], *first[1]])):
            if e is not None:
                assert torch.equal(a, e), f"run {run + 2}, output/grad {i}: max diff {(a - e).abs().max()}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [STREAMED, "persistent", "mma"])
def test_cuda_inference_matches_reference(kernel, pin_kernels):
    """Forward without saving for backward (act, h_prev and extra are null in the
    kernels), packed and reverse, against the reference: y, h_T, c_T."""
    pin_kernels(cuda_forward=kernel)
    dtype = torch.bfloat16 if kernel == "mma" else torch.float32
    spec, bs, tensors = _make(("lstm", 130, 0, True, [7, 7, 5, 5, 2, 1], 7))
    # the inputs as the kernel sees them; in bf16 h is rounded once a step: 6 eps
    rounded = [None if v is None else v.detach().to(dtype).double() for v in tensors]
    ref = _backend("reference").forward(spec, *rounded, bs, False)
    moved = [None if v is None else v.detach().to("cuda", dtype) for v in tensors]
    cuda_spec = RecurrenceSpec(**{**spec.__dict__, "device": torch.device("cuda"), "dtype": dtype})
    with torch.no_grad():
        ours = _backend("cuda").forward(cuda_spec, *moved, bs, False)
    eps = torch.finfo(dtype).eps
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=6 * eps)
    for name, a, e in zip(("y", "h_T", "c_T"), ours[:3], ref[:3]):
        torch.testing.assert_close(a.double().cpu(), e.detach(), **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _graph_check(make_model, run, new_input, dtype):
    """``run(model, x)`` returns a flat list of tensors. Captured in a CUDA graph (after a
    warm-up on a side stream) and replayed on fresh inputs, it gives what eager gives."""
    torch.manual_seed(0)
    captured, eager = make_model().to("cuda", dtype), make_model().to("cuda", dtype)
    eager.load_state_dict(captured.state_dict())
    static_x = new_input()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(captured, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(captured, static_x)
    for _ in range(2):
        x = new_input()
        static_x.copy_(x)
        graph.replay()
        for i, (a, e) in enumerate(zip(static_out, run(eager, x))):
            torch.testing.assert_close(a, e, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, pytest.param(True, marks=experimental("cuda-pdl"))],
                         ids=["plain", "pdl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_cuda_training_step_is_capturable_in_a_cuda_graph(cls, dtype, pdl, pin_kernels):
    """Forward and backward through torch.cuda.make_graphed_callables (stacked,
    bidirectional; the persistent or per-step forward, the per-step backward, the dW
    GEMMs), replayed on fresh inputs: outputs, input and weight gradients as eager. With
    cuda_pdl=True the per-step kernels are captured with programmatic
    dependent launch (a graph edge of its own), the forward's too (the per-step forward
    pinned, so a PDL kernel also follows the saved-state copy's memcpy node)."""
    if pdl:
        if torch.cuda.get_device_capability() < (9, 0):
            pytest.skip("programmatic dependent launch needs sm_90")
        pin_kernels(cuda_forward="step")
    pin_kernels(cuda_pdl=pdl)
    torch.manual_seed(0)
    kw = dict(input_size=24, hidden_size=64, num_layers=2, bidirectional=True, backend="cuda")
    model = getattr(clf, cls)(**kw).to("cuda", dtype)
    eager = getattr(clf, cls)(**kw).to("cuda", dtype)
    eager.load_state_dict(model.state_dict())
    sample = torch.randn(20, 4, 24, device="cuda", dtype=dtype, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (sample,))
    for _ in range(2):
        x = torch.randn_like(sample)
        results = []
        for net, fn in ((model, graphed), (eager, eager)):
            net.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y, hidden = fn(xi)
            outs = [y, *(hidden if isinstance(hidden, tuple) else (hidden,))]
            gen = torch.Generator(device="cpu").manual_seed(1)
            sum((o.float() * torch.randn(o.shape, generator=gen).to("cuda")).sum()
                for o in outs).backward()
            results.append([o.detach() for o in outs] + [xi.grad]
                           + [p.grad for p in net.parameters()])
        for i, (a, e) in enumerate(zip(*results)):
            torch.testing.assert_close(a, e, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.gpu
@experimental("cuda-device-row-counts")
@pytest.mark.parametrize("kernel", ["auto", "step", STREAMED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_packed_inference_is_capturable_in_a_cuda_graph(dtype, kernel, pin_kernels):
    """Packed sequences in inference, captured and replayed on fresh data: the module
    builds its packed index on the device while capturing (ops/recurrence.py, packed_index)
    and the row counts reach the kernels through write_row_runs, whose arguments the
    graph keeps (experimental: by default the counts are copied from the host, which a
    capture refuses). (Packed training is not captured here: make_graphed_callables
    takes tensors, not PackedSequences.)"""
    pin_kernels(cuda_forward=kernel)
    lengths = torch.tensor([9, 7, 7, 4, 1])

    def new_input():
        x = torch.randn(9, 5, 16, device="cuda", dtype=dtype)
        return torch.nn.utils.rnn.pack_padded_sequence(x, lengths).data

    batch_sizes = torch.nn.utils.rnn.pack_padded_sequence(torch.zeros(9, 5, 1), lengths).batch_sizes

    def run(model, data):
        with torch.no_grad():
            y, (h, c) = model(torch.nn.utils.rnn.PackedSequence(data, batch_sizes))
        return [y.data, h, c]

    _graph_check(lambda: clf.LSTM(16, 48, num_layers=2, backend="cuda"), run, new_input, dtype)


@pytest.mark.gpu
@experimental("cuda-pdl")
@pytest.mark.parametrize("case", GPU_CASES + [("lstm", 768, 0, False, None, 16)], ids=str)
def test_cuda_pdl_gives_the_same_bits(case, pin_kernels):
    """cuda_pdl=True (programmatic dependent launch of the per-step kernels,
    sm_90) runs the same kernels in the same order, only launched earlier: forward and
    backward through the per-step kernels are bit for bit those without it, three runs
    (a kernel that read its predecessor's output before pdl_wait would differ
    somewhere). Float32, and bfloat16 at hidden 768 (long per-step reductions)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90 (elsewhere it is plain launches)")
    pin_kernels(cuda_forward="step", cuda_backward="step")
    spec, bs, tensors = _make(case)
    dtype = torch.bfloat16 if case[1] == 768 else torch.float32
    pin_kernels(cuda_pdl=False)
    want = _run("cuda", spec, bs, tensors, "cuda", dtype)
    pin_kernels(cuda_pdl=True)
    for _ in range(3):
        got = _run("cuda", spec, bs, tensors, "cuda", dtype)
        for name, a, e in zip(("outputs", "gradients"), got, want):
            for i, (x, y) in enumerate(zip(a, e)):
                if y is not None:
                    assert torch.equal(x, y), f"{name} {i} differ with PDL"


@pytest.mark.gpu
def test_cuda_ops_refuse_experimental_kernels_without_the_switch():
    """The ops themselves (not only the Python side's selection) keep the default path to
    the verified kernels: an experimental kernel named with experimental=False is an
    error, before anything runs."""
    layer = clf.LSTM(4, 8, backend="cuda").cuda()
    x = torch.randn(3, 2, 4, device="cuda")
    gx = torch.randn(3, 2, 32, device="cuda")
    h0, c0 = torch.zeros(2, 8, device="cuda"), torch.zeros(2, 8, device="cuda")
    args = ("lstm", gx, h0, c0, layer.weight_hh_l0.detach(), None, None, None, False, False)
    forward = torch.ops.cnnlstm_fast.recurrence_forward
    for kernel in ("mma-pipelined", "mma-cluster", "streamed"):
        with pytest.raises(RuntimeError, match=f"'{kernel}' is experimental"):
            forward(*args, kernel_name=kernel)
    with pytest.raises(RuntimeError, match="pdl=True .* is experimental"):
        forward(*args, pdl=True)
    with pytest.raises(RuntimeError, match="forward kernel must be one of"):
        forward(*args, kernel_name="fast")
    assert layer(x)[0].shape == (3, 2, 8)


@pytest.mark.gpu
@experimental("cuda-persistent-backward")
def test_cuda_persistent_backward_pinned_with_projection_is_an_error(pin_kernels):
    pin_kernels(cuda_backward="persistent")
    layer = clf.LSTM(8, 16, proj_size=4, backend="cuda").cuda()
    y, _ = layer(torch.randn(3, 2, 8, device="cuda"))
    with pytest.raises(RuntimeError, match="persistent backward has no projection"):
        y.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["step", "persistent", STREAMED])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_saved_state_matches_reference(case, kernel, pin_kernels):
    """What forward saves (activations, state before each step, LSTM cell state / GRU
    a_n + b_hn, inactive rows included) is the reference's, in float32."""
    pin_kernels(cuda_forward=kernel)
    if kernel in ("persistent", "streamed") and case[2]:
        pytest.skip(f"the {kernel} kernel has no projection")
    spec, bs, tensors = _make(case)
    ref = _backend("reference").forward(spec, *tensors, bs, True)
    moved = [None if v is None else v.detach().to("cuda", torch.float32) for v in tensors]
    cuda_spec = RecurrenceSpec(**{**spec.__dict__, "device": torch.device("cuda"),
                                  "dtype": torch.float32})
    ours = _backend("cuda").forward(cuda_spec, *moved, bs, True)
    for name, a, e in zip(("act", "h_prev", "extra"), ours[3][:3], ref[3][:3]):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and a.shape == e.shape, name
        torch.testing.assert_close(a.double().cpu(), e.detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"saved {name}: {m}")


# (cell, hidden, proj, reverse, batch_sizes, batch) for the tensor-core kernel; 12 steps.
MMA_CASES = [
    ("lstm", 64, 0, False, None, 5),
    # 76 blocks of 4 units; two passes of 16 rows, the second partly empty
    ("lstm", 302, 0, True, [17] * 4 + [12] * 4 + [5, 5, 1, 1], 17),
    ("gru", 130, 0, False, [5, 4, 4, 2, 2, 2, 2, 2, 1, 1, 1, 1], 5),
    ("gru", 66, 0, True, None, 33),  # three passes
    ("rnn_tanh", 40, 0, True, None, 5),
    ("rnn_relu", 18, 0, False, [5, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1], 5),
    ("lstm", 768, 0, False, None, 16),  # the canonical width: 96 blocks of 8 units
    ("gru", 1024, 0, True, None, 3),  # 103 blocks of 10 units, 4 k-steps per warp
]


def _error_vs_fp64(outs_grads, exact):
    names = ("Y", "h_T", "c_T", "d_gx", "d_h0", "d_c0", "d_w_hh", "d_w_hr", "d_b_hn")
    return errors_vs_exact(names, [*outs_grads[0], *outs_grads[1]], [*exact[0], *exact[1]])


def _assert_low_precision_within_12_eps(case, dtype):
    """Forward and backward in fp16/bf16 (the kernels the pins select) against the
    fp64 reference run on the same inputs rounded to the dtype: h is rounded at most once
    a step, so after 12 steps the bound is 12 eps."""
    cell, hidden, proj, reverse, sizes, batch = case
    spec, bs, tensors = make_args(cell, hidden, proj, reverse, sizes, dtype=torch.float64,
                                  batch=batch, steps=12)
    tensors[3] = tensors[3].detach() / hidden**0.5
    # the same inputs as the kernel sees them, rounded to the dtype
    rounded = [None if v is None else v.detach().to(dtype).double() for v in tensors]
    exact = _run("reference", spec, bs, rounded, "cpu", torch.float64)
    errs = _error_vs_fp64(_run("cuda", spec, bs, tensors, "cuda", dtype), exact)
    bound = 12 * torch.finfo(dtype).eps
    assert max(errs.values()) <= bound, f"errors {errs} exceed {bound:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backward", [
    "step", pytest.param("persistent", marks=experimental("cuda-persistent-backward"))])
@pytest.mark.parametrize("kernel", [
    "mma", pytest.param("mma-pipelined", marks=experimental("cuda-mma-pipelined"))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MMA_CASES, ids=str)
def test_cuda_tensor_core_kernel_low_precision(case, dtype, kernel, backward, pin_kernels):
    """The tensor-core persistent kernel (pinned, so an unusable plan fails instead of
    passing on another path; "mma-pipelined" loads each pass's G_x, c and h during the
    previous pass, experimental), forward and backward (per-step or persistent)
    against the fp64 reference: h is rounded to the dtype at each of the 12 steps, so the
    bound is 12 eps. The cases include several passes of rows and packed sequences."""
    pin_kernels(cuda_forward=kernel, cuda_backward=backward)
    _assert_low_precision_within_12_eps(case, dtype)


@pytest.mark.gpu
@experimental("cuda-streamed", "cuda-persistent-backward")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MMA_CASES + [("lstm", 2048, 0, False, [16] * 6 + [9] * 6, 16)],
                         ids=str)
def test_cuda_streamed_kernels_low_precision(case, dtype, pin_kernels):
    """The streamed forward and the persistent backward (both pinned; not picked by auto
    yet), fp16/bf16 against the fp64 reference with the tensor-core test's bound (the
    streamed kernel keeps h in float32, so it rounds less); hidden 2048 is the size the
    persistent kernels cannot hold on chip."""
    pin_kernels(cuda_forward="streamed", cuda_backward="persistent")
    _assert_low_precision_within_12_eps(case, dtype)


# Cases the cluster variant holds (W_hh in at most 16 blocks), 12 steps; the comments
# give the plan: blocks of units (m_tiles).
CLUSTER_CASES = [
    ("lstm", 64, 0, False, None, 5),  # 16 blocks of 4 units (1)
    # 16 blocks of 16 units (4), the largest LSTM; two passes, packed, reverse
    ("lstm", 256, 0, True, [17] * 4 + [12] * 4 + [5, 5, 1, 1], 17),
    ("lstm", 130, 0, False, None, 3),  # 9 blocks of 16 units (4), the last one partial
    ("gru", 336, 0, False, [5, 4, 4, 2, 2, 2, 2, 2, 1, 1, 1, 1], 5),  # 16 x 21 (4), 2 k-steps
    ("gru", 66, 0, True, None, 33),  # 14 blocks of 5 units (1); three passes
    ("gru", 4, 0, False, None, 1),  # a cluster of one block
    ("rnn_tanh", 512, 0, True, None, 5),  # 16 blocks of 32 units (2)
    ("rnn_relu", 18, 0, False, [5, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1], 5),  # 2 blocks
]


@pytest.mark.gpu
@experimental("cuda-mma-cluster")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CLUSTER_CASES, ids=str)
def test_cuda_tensor_core_cluster_low_precision(case, dtype, pin_kernels):
    """cuda_forward="mma-cluster" (sm_90; not picked by auto): the tensor-core
    forward as one thread-block cluster, h through distributed shared memory, against the
    fp64 reference within 12 eps (forward and the per-step backward)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    pin_kernels(cuda_forward="mma-cluster", cuda_backward="step")
    _assert_low_precision_within_12_eps(case, dtype)


@pytest.mark.gpu
@experimental("cuda-mma-cluster")
@pytest.mark.parametrize("case", CLUSTER_CASES, ids=str)
def test_cuda_tensor_core_cluster_equals_grid_variant(case, pin_kernels):
    """The cluster variant splits K over the warps as the grid variant does (the split
    depends on hidden only) and sums the warps' partials in the same order; the tiling of
    gate rows may differ (fewer, larger blocks), which does not change an MMA output
    element, and so does the exchange of h. So every output is bit for bit the same: a
    lost or stale push of h shows here even where it stays within the 12-eps bound. Run
    3 times: a race may not show every time."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    spec, bs, tensors = _make(case, 12)
    spec = RecurrenceSpec(**{**spec.__dict__, "device": torch.device("cuda"),
                             "dtype": torch.bfloat16})
    moved = [None if v is None else v.detach().to("cuda", torch.bfloat16) for v in tensors]
    pin_kernels(cuda_forward="mma")
    grid = _backend("cuda").forward(spec, *moved, bs, False)
    pin_kernels(cuda_forward="mma-cluster")
    for _ in range(3):
        cluster = _backend("cuda").forward(spec, *moved, bs, False)
        for name, a, e in zip(("y", "h_T", "c_T"), cluster[:3], grid[:3]):
            if e is not None:
                assert torch.equal(a, e), f"{name}: max diff {(a.float() - e.float()).abs().max()}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, dtype, shapes", [
    # (batch, hidden) per thread: one kernel whose shared memory grows with hidden (the
    # CUDA-core kernel) or with batch (the cluster kernel's h copies). The grid mma
    # kernel is left out: its size depends on m_tiles, a template argument, so two
    # sizes are two kernels and there is no shared limit to lower.
    ("persistent", torch.float32, [(4, 64), (4, 512)]),
    pytest.param("mma-cluster", torch.bfloat16, [(1, 128), (64, 128)],
                 marks=experimental("cuda-mma-cluster")),
])
def test_cuda_concurrent_forwards_of_different_sizes(kernel, dtype, shapes, pin_kernels):
    """Host threads planning and launching one persistent kernel at different sizes at
    once (a server running two models): each plan must leave the kernel's dynamic
    shared memory limit high enough for the other thread's launch (it only ever raises
    it). A plan that set it to its own size could lower it between the other thread's
    plan and launch, and that launch would fail (found in review; not yet run)."""
    import threading

    if kernel == "mma-cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    pin_kernels(cuda_forward=kernel)
    gen = torch.Generator().manual_seed(0)
    work = []
    for batch, hidden in shapes:
        layer = clf.LSTM(hidden, hidden, backend="cuda").to("cuda", dtype).eval()
        x = torch.randn(16, batch, hidden, generator=gen).to("cuda", dtype)
        with torch.no_grad():
            work.append((layer, x, layer(x)[0]))
    errors = []

    def run(layer, x, want):
        try:
            with torch.no_grad():
                for _ in range(200):
                    got = layer(x)[0]
                    if not torch.equal(got, want):
                        raise AssertionError(f"max diff {(got - want).abs().max()}")
            torch.cuda.synchronize()
        except Exception as e:  # reported below, with the thread's shape
            errors.append(f"batch {x.shape[1]}, hidden {x.shape[2]}: {e}")

    threads = [threading.Thread(target=run, args=w) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, layer, dtype, why, runs_at", [
    ("mma", "LSTM(8, 16)", "float32", "no tensor-core kernel in float32", None),
    pytest.param("mma-cluster", "LSTM(8, 768)", "bfloat16", "W_hh in more than 16 blocks", None,
                 marks=experimental("cuda-mma-cluster")),
    # the control: at batch 16 the same layer runs, so batch 256 is what it refuses
    pytest.param("mma-cluster", "LSTM(8, 256)", "float16", "h of batch 256 over the shared "
                 "memory", 16, marks=experimental("cuda-mma-cluster")),
], ids=lambda v: str(v))
def test_cuda_tensor_core_kernel_pinned_where_it_cannot_run_is_an_error(kernel, layer, dtype,
                                                                         why, runs_at):
    """In a child process: this error path once crashed the interpreter on the GPU
    machine, and a crash must fail this test, not end the test run. The batch is 256;
    the error lists every kernel's limits, so where the reason (`why`) depends on the
    batch, the same layer must run at batch ``runs_at`` first."""
    if kernel == "mma-cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    ctor = layer[:-1] + ", backend='cuda')"
    control = (
        f"layer(torch.randn(3, {runs_at}, 8, device='cuda', dtype=torch.{dtype}))\n"
        "print('ran at the smaller batch')\n" if runs_at else ""
    )
    code = (
        "import torch, cnnlstm_fast as clf\n"
        "from cnnlstm_fast import experimental\n"
        f"experimental.set_kernels(cuda_forward='{kernel}')\n"
        f"layer = clf.{ctor}.cuda().to(torch.{dtype})\n"
        + control +
        "try:\n"
        f"    layer(torch.randn(3, 256, 8, device='cuda', dtype=torch.{dtype}))\n"
        "except RuntimeError as error:\n"
        "    print('raised:', error)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit code {run.returncode}: {run.stderr[-3000:]}"
    if runs_at:
        assert "ran at the smaller batch" in run.stdout, run.stdout
    expected = (f"raised: cuda_forward='{kernel}' (cnnlstm_fast.experimental.set_kernels), "
                "but that kernel cannot run")
    assert expected in run.stdout, run.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
@pytest.mark.parametrize("size", [(16, 256, 768, 768), (1, 64, 32, 2048), (256, 32, 128, 256)])
def test_cuda_low_precision_error_within_twice_torch(cls_name, dtype, size):
    """Error against an fp64 reference at most 2x torch.nn's (cuDNN's) in the same dtype."""
    batch, steps, inp, hidden = size
    ours = getattr(clf, cls_name)(inp, hidden, backend="cuda").cuda()
    theirs = getattr(torch.nn, cls_name)(inp, hidden).cuda()
    theirs.load_state_dict(ours.state_dict())
    exact = getattr(torch.nn, cls_name)(inp, hidden).double()
    exact.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    x = torch.randn(steps, batch, inp)
    ref = exact(x.double())[0]
    err_ours = (ours.to(dtype)(x.cuda().to(dtype))[0].double().cpu() - ref).abs().max()
    err_torch = (theirs.to(dtype)(x.cuda().to(dtype))[0].double().cpu() - ref).abs().max()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


@pytest.mark.gpu
def test_cuda_module_parity_bidirectional_packed():
    from torch.nn.utils.rnn import pack_padded_sequence

    ours = clf.LSTM(12, 24, num_layers=2, bidirectional=True, backend="cuda").cuda()
    theirs = torch.nn.LSTM(12, 24, num_layers=2, bidirectional=True).cuda()
    theirs.load_state_dict(ours.state_dict())
    x = pack_padded_sequence(torch.randn(9, 4, 12).cuda(), torch.tensor([9, 3, 7, 1]),
                             enforce_sorted=False)
    a, b = ours(x), theirs(x)
    torch.testing.assert_close(a[0].data, b[0].data, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[1][0], b[1][0], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell, proj, with_b_hn", [("lstm", 0, False), ("lstm", 3, False),
                                                   ("gru", 0, True), ("rnn_tanh", 0, False)],
                         ids=["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_cuda_opcheck(cell, proj, with_b_hn, dtype):
    """torch.library.opcheck of the ops with CUDA tensors: schema (no undeclared
    mutation), the fake implementations against what the CUDA kernels return (shapes,
    dtypes, devices of all six outputs), autograd registration and AOT dispatch: what
    torch.compile relies on (the CPU twin is test_cpu_backend.py::test_opcheck)."""
    from test_cpu_backend import make_inputs

    _, a = make_inputs(cell, proj, with_b_hn, torch.float32, 3, 3, 5, [3, 1, 2])
    a = {k: v if v is None or k == "batch_sizes" else v.to("cuda", dtype) for k, v in a.items()}
    args = (cell, a["gx"], a["h0"], a["c0"], a["w_hh"], a["w_hr"], a["b_hn"], a["batch_sizes"],
            False, True)
    torch.library.opcheck(torch.ops.cnnlstm_fast.recurrence_forward.default, args)
    _, _, _, act, h_prev, extra = torch.ops.cnnlstm_fast.recurrence_forward(*args)
    extra = extra if cell in ("lstm", "gru") else None
    out = proj or 5
    cuda = dict(device="cuda", dtype=dtype)
    back = (cell, act, h_prev, extra, a["w_hh"], a["w_hr"], a["batch_sizes"], False,
            torch.randn(3, 3, out, **cuda), torch.randn(3, out, **cuda),
            torch.randn(3, 5, **cuda) if cell == "lstm" else None)
    torch.library.opcheck(torch.ops.cnnlstm_fast.recurrence_backward.default, back)
