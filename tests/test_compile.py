"""torch.compile sees through our layers: the compiled ops (with their fake
implementations) trace without graph breaks, and compiled results match eager.

Dynamo refuses to trace any nn.RNNBase subclass unless
``torch._dynamo.config.allow_rnn`` is set (torch.nn's own layers then graph-break and
run eagerly); ours are such subclasses, so the tests set it, as the README says to."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast import backends
from helpers import leaves

needs_cpu = pytest.mark.skipif(
    backends.backend_report().get("cpu") is not None, reason="cpu backend (the _C extension) not built"
)


def _fwd_bwd(model, x):
    x = x.detach().clone().requires_grad_(True)
    y, _ = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@needs_cpu
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_compiled_cpu_backend_matches_eager_without_graph_breaks(cls_name):
    torch._dynamo.reset()
    model = getattr(clf, cls_name)(5, 7, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(6, 3, 5)
    eager = _fwd_bwd(model, x)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        got = _fwd_bwd(compiled, x)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_reference_backend_matches_eager():
    torch._dynamo.reset()
    model = clf.GRU(4, 5, backend="reference")
    x = torch.randn(3, 2, 4)
    eager = _fwd_bwd(model, x)
    model.zero_grad(set_to_none=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        got = _fwd_bwd(torch.compile(model, backend="aot_eager"), x)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-6)


@needs_cpu
def test_default_inductor_compile_matches_eager():
    """torch.compile's default backend (inductor), which users get: it compiles the
    graph around our ops (their fakes give the shapes) and calls the ops themselves."""
    torch._dynamo.reset()
    model = clf.LSTM(5, 7, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(6, 3, 5)
    eager = _fwd_bwd(model, x)
    model.zero_grad(set_to_none=True)
    # DEBUG logging of the backend choice on: the log call must not break the graph
    logger = logging.getLogger("cnnlstm_fast.backends")
    level, logger.level = logger.level, logging.DEBUG
    try:
        with torch._dynamo.config.patch(allow_rnn=True):
            got = _fwd_bwd(torch.compile(model, fullgraph=True), x)
    finally:
        logger.setLevel(level)
    for a, b in zip([got[0], got[1], *got[2]], [eager[0], eager[1], *eager[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _call_targets(graph_module) -> set[str]:
    return {str(n.target) for m in graph_module.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"}


@needs_cpu
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_export_with_dynamic_batch_and_steps(cls_name):
    """torch.export of a model with our layers: the exported program holds our ops (not a
    decomposition into torch.nn's) and runs other batch sizes and lengths than it was
    traced with, as eager does."""
    from torch.export import Dim

    model = getattr(clf, cls_name)(5, 7, num_layers=2, bidirectional=True, batch_first=True,
                                   backend="cpu").eval()
    with torch._dynamo.config.patch(allow_rnn=True):
        program = torch.export.export(model, (torch.randn(3, 6, 5),),
                                      dynamic_shapes=({0: Dim("batch"), 1: Dim("steps")},))
    assert "cnnlstm_fast.recurrence_forward.default" in _call_targets(program.graph_module)
    x = torch.randn(4, 11, 5)
    got, want = program.module()(x), model(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


MODELS_FOR_TRACING = [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3), (6, 2, 5)),
    ("GRU", dict(num_layers=2), (6, 2, 5)),
    ("LSTMCell", {}, (2, 5)),
]


def _op_kinds(traced) -> list[str]:
    return sorted({node.kind() for node in traced.inlined_graph.nodes()})


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("cls_name,kwargs,shape", MODELS_FOR_TRACING, ids=[m[0] for m in MODELS_FOR_TRACING])
def test_jit_trace_records_what_torch_nn_records(cls_name, kwargs, shape, backend):
    """torch.jit.trace (TorchScript deployment, the classic ONNX exporter) records the
    graph a torch.nn layer gives (aten::lstm, ...), which runs without our extension."""
    if backend == "cpu" and backends.backend_report().get("cpu") is not None:
        pytest.skip("cpu backend (the _C extension) not built")
    model = getattr(clf, cls_name)(5, 7, **kwargs, backend=backend).eval()
    theirs = getattr(torch.nn, cls_name)(5, 7, **kwargs).eval()
    traced = torch.jit.trace(model, (torch.randn(*shape),))
    assert _op_kinds(traced) == _op_kinds(torch.jit.trace(theirs, (torch.randn(*shape),)))
    x = torch.randn(3, 5) if len(shape) == 2 else torch.randn(9, 3, 5)
    for got, want in zip(leaves(traced(x)), leaves(model(x))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_cpu
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize("cls_name,onnx_op", [("LSTM", "LSTM"), ("GRU", "GRU")])
def test_onnx_export_gives_the_onnx_recurrent_operator(cls_name, onnx_op, dynamo, tmp_path):
    """torch.onnx.export of our layers (both exporters) gives the model torch.nn's layers
    give: ONNX's LSTM/GRU operator, computing the same in onnxruntime. (Like torch.nn's,
    an LSTM with proj_size has no ONNX export.)"""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = getattr(clf, cls_name)(5, 7, num_layers=2, bidirectional=True, backend="cpu").eval()
    x = torch.randn(6, 2, 5)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    proto = onnx.load(str(path))
    op_types = {node.op_type for node in proto.graph.node}
    op_types |= {node.op_type for function in proto.functions for node in function.node}
    assert onnx_op in op_types, sorted(op_types)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = leaves(model(x))
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-5)


def test_fullgraph_compile_with_auto_in_a_fresh_process():
    """``auto``'s rules ask the extension which CPU GEMM runs and read the malloc
    settings, which Dynamo cannot trace: in a process where no eager call has filled the
    answers yet, a fullgraph compile failed on them. They are constants of the graph."""
    code = (
        "import torch, cnnlstm_fast as clf\n"
        "torch._dynamo.config.allow_rnn = True\n"
        "m = clf.GRU(8, 32)\n"
        "x = torch.randn(16, 2, 8)\n"
        "y = torch.compile(m, backend='aot_eager', fullgraph=True)(x)[0]\n"
        "torch.testing.assert_close(y, torch.nn.GRU.forward(m, x)[0], rtol=1e-5, atol=1e-6)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
