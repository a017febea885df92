"""The conv2seq bench suite (cnnlstm_fast/bench/conv2seq.py): every provider computes what
the plain ops around torch.nn's layer compute, the fused path copies no input, the bytes
model, and the suite end to end at tiny shapes (its own shapes are in WORKLOADS)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cnnlstm_fast import bench
from cnnlstm_fast.bench import conv2seq
from cnnlstm_fast.bench.conv2seq import Config, Workload
from cnnlstm_fast.bench.providers import Skip
from helpers import module_backends

ROOT = Path(__file__).resolve().parent.parent
needs_cpu = pytest.mark.skipif("cpu" not in module_backends(), reason="the cpu backend is not built")

#: One per kind of hand-off, odd sizes whose x and sequence element counts no other
#: tensor of the call has (the copy check matches on them), >= 8 steps (auto's minimum).
TINY = (
    Workload("deepconvlstm", "lstm", 3, 5, 11, 4, 2),
    Workload("crnn", "lstm", 2, 7, 9, 3, 2, directions=2, height=3),
    Workload("deepspeech2", "gru", 3, 13, 10, 5, 1, directions=2),
    Workload("lrcn", "lstm", 2, 6, 10, 7, 1, batch_first=True, features=True),
)
EAGER = [conv2seq.BASELINE, conv2seq.PLAIN, conv2seq.FUSED, conv2seq.PLAIN_PINNED,
         conv2seq.FUSED_PINNED]


def _outputs(fn, x):
    with torch.no_grad():
        out = fn(x)
    return list(out[:1] if isinstance(out, tuple) else out)  # the rnn's output, or each G_x


@pytest.mark.parametrize("mode", ["segment", "forward"])
@pytest.mark.parametrize("workload", TINY, ids=lambda w: w.model)
def test_every_provider_computes_what_the_plain_ops_around_torch_nn_compute(workload, mode):
    cfg = Config(workload, mode=mode)
    built = conv2seq.build(cfg)
    want = None
    for provider in EAGER:
        try:
            fn, _ = conv2seq.provider_fn(cfg, built, provider)
        except Skip:
            continue
        got = _outputs(fn, built.x)
        if want is None:
            want = got
            continue
        # the plain segment gives (T, B, G) per direction, the fused one (D, T, B, G)
        got = torch.stack([g.reshape(want[0].shape) for g in got]).reshape(-1)
        torch.testing.assert_close(got, torch.stack(want).reshape(-1), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{provider}: {m}")


def _copies_of(events, sizes: set[int]) -> list[str]:
    copies = []
    for event in events:
        if event.name in ("aten::copy_", "aten::clone", "aten::contiguous") and event.input_shapes:
            shape = event.input_shapes[0]
            if shape and math.prod(shape) in sizes:
                copies.append(f"{event.name}{shape}")
    return copies


def _profiled(fn, x, grad: bool):
    with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU],
                                               record_shapes=True) as prof:
        fn(x)
    return prof.events()


@needs_cpu
@pytest.mark.parametrize("mode", ["segment", "forward", "forward_backward"])
@pytest.mark.parametrize("workload", TINY, ids=lambda w: w.model)
def test_the_fused_path_copies_no_input(workload, mode):
    """No copy of x, nor of a tensor of the sequence's size, in the fused segment or the
    block's forward (eval, or training with grad); the plain ops around torch.nn's layer
    copy the sequence (the check sees copies)."""
    cfg = Config(workload, mode=mode)
    built = conv2seq.build(cfg)
    _, block = built.pinned()  # the cpu backend named: the fused path runs
    x = built.x
    sizes = {x.numel(), workload.batch * workload.channels * workload.steps}
    if mode == "segment":
        fused = conv2seq.fused_segment(block)
        plain = conv2seq.plain_segment(built.theirs, torch.nn.functional.linear)
    else:
        fused, plain = block, built.theirs
        if mode == "forward_backward":
            x = (x.transpose(1, 2) if workload.features else x).detach().requires_grad_()
            x = x.transpose(1, 2) if workload.features else x
    grad = mode == "forward_backward"
    events = _profiled(fused, x, grad)
    assert any(e.name == "cnnlstm_fast::conv2seq_projection" for e in events), \
        "the fused projection did not run"
    assert _copies_of(events, sizes) == []
    assert _copies_of(_profiled(plain, x, grad), sizes), "the control: torch.nn's plain path copies"


def test_segment_bytes_count_each_op_once():
    w = Workload("crnn", "lstm", 2, 3, 5, 4, 1, directions=2, height=7)
    x, seq, gx = 2 * 3 * 7 * 5, 2 * 3 * 5, 2 * 5 * 2 * 16
    assert conv2seq.segment_bytes(w, True, [], 4) == {
        "bytes": 4 * (x + gx), "ideal_bytes": 4 * (x + gx), "x_ideal": 1.0}
    plain = conv2seq.segment_bytes(w, False, [seq, seq], 4)
    # norm 2x, relu 2x, amax x + seq, two layout copies, each direction reads seq, G_x
    assert plain["bytes"] == 4 * (2 * x + 2 * x + x + seq + 2 * 2 * seq + 2 * seq + gx)
    control = Workload("lrcn", "lstm", 2, 3, 5, 4, 1, features=True)
    assert conv2seq.segment_bytes(control, False, [], 4)["x_ideal"] == 1.0


def _report_script():
    spec = importlib.util.spec_from_file_location("docs_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@needs_cpu
def test_conv2seq_suite_tiny_json(tmp_path, monkeypatch, capsys):
    tiny = TINY[2:]  # a GRU, which auto runs on cpu, and the control, which it leaves to torch
    monkeypatch.setattr(conv2seq, "WORKLOADS", tiny)
    path = tmp_path / "conv2seq.json"
    bench.main(["--suite", "conv2seq", "--device", "cpu", "--reps", "2", "--no-progress",
                "--json", str(path)])
    result = json.loads(path.read_text())
    rows = result["results"]
    assert result["suite"] == "conv2seq" and result["complete"]
    assert {(r["model"], r["mode"]) for r in rows} == {
        (w.model, m) for w in tiny for m in conv2seq.MODES}
    by_key = {(r["model"], r["mode"], r["provider"]): r for r in rows}
    for w in tiny:
        for mode in conv2seq.MODES:
            assert by_key[(w.model, mode, "torch.nn")]["speedup"] == 1.0
            fused, plain = by_key[(w.model, mode, "fused")], by_key[(w.model, mode, "plain")]
            assert fused["vs_plain"] == pytest.approx(plain["median_ms"] / fused["median_ms"])
    gru = "deepspeech2"
    assert by_key[(gru, "forward", "fused")]["picked"] == "cpu"
    assert (gru, "forward", "fused pinned") not in by_key  # auto runs cpu: nothing to pin
    # eager segment rows carry the bytes: fused moves the ideal, plain more (norm, relu)
    assert by_key[(gru, "segment", "fused")]["x_ideal"] == 1.0
    assert by_key[(gru, "segment", "fused")]["copies"] == 0
    assert by_key[(gru, "segment", "torch.nn")]["x_ideal"] > 2
    assert {s["provider"] for s in result["skipped"]} >= {"plain compiled", "fused compiled"}
    assert any(note.startswith("conv2seq bytes") for note in result["notes"])
    assert "fused vs plain" in capsys.readouterr().out
    # benchmarks/report.py renders the file as it does the other suites'
    table = _report_script()._table(result)
    assert len(table) == 2 + len({r["config"] for r in rows})


@needs_cpu
def test_compiled_rows_time_the_compiled_plain_ops_and_block(monkeypatch):
    monkeypatch.setattr(conv2seq, "COMPILE_BACKEND", "aot_eager")  # seconds, not minutes
    cfg = Config(dataclasses.replace(TINY[2], compile=True), mode="forward")
    rows, skips = conv2seq.run_config(cfg, list(conv2seq.PROVIDERS), 2, {"float32": 1.0}, 0.1)
    by_provider = {r["provider"]: r for r in rows}
    for name in ("plain compiled", "fused compiled"):
        row = by_provider[name]
        assert row["compile_backend"] == "aot_eager" and row["graphs"] >= 1, row
    assert by_provider["fused compiled"]["vs_plain"] == pytest.approx(
        by_provider["plain compiled"]["median_ms"] / by_provider["fused compiled"]["median_ms"])
    assert by_provider["fused"]["graphs"] is None
