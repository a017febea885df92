"""The profiler runs on CPU, names our ops and writes a Chrome trace."""

import json

import torch

import cnnlstm_fast
from cnnlstm_fast import profile


def test_profile_layer_cpu(tmp_path):
    trace = tmp_path / "trace.json"
    result = profile.profile_layer("lstm", batch=2, steps=4, input_size=5, hidden_size=3,
                                   backend="cpu", mode="forward_backward", iters=2, trace=str(trace))
    names = [r["name"] for r in result.rows]
    assert "cnnlstm_fast::recurrence_forward" in names and "cnnlstm_fast::recurrence_backward" in names
    assert abs(sum(r["share"] for r in result.rows) - 1) < 0.2
    assert all(r["calls"] >= 1 and r["self_ms"] >= 0 for r in result.rows)
    forward = result.rows[names.index("cnnlstm_fast::recurrence_forward")]
    assert forward["per_step"] == forward["calls"] / (2 * 4)
    assert [r["name"] for r in result.ranges] == ["cnnlstm_fast.LSTM (root)"]
    assert result.flops > 0 and result.peak_tflops > 0 and result.peak_gbps > 0
    assert "traceEvents" in json.loads(trace.read_text())
    assert "recurrence_forward" in result.format()


def test_profile_user_model_ranges_named_by_module(tmp_path):
    model = torch.nn.Sequential(cnnlstm_fast.GRU(4, 3, backend="reference"))
    x = torch.randn(5, 2, 4)
    result = profile.profile_model(model, (x,), steps=5, iters=1)
    assert [r["name"] for r in result.ranges] == ["cnnlstm_fast.GRU 0"]
    assert result.trace is None


def test_profile_cli(tmp_path, capsys):
    trace = tmp_path / "t.json"
    profile.main(["--batch", "2", "--steps", "3", "--input-size", "4", "--hidden-size", "3",
                  "--backend", "reference", "--iters", "1", "--trace", str(trace)])
    assert trace.exists() and "our ranges" in capsys.readouterr().out
