"""The benchmark runs end to end on a tiny config and writes sane JSON rows."""

import json

import pytest

import cnnlstm_fast
from cnnlstm_fast import bench


def test_bench_tiny_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--batch", "2", "--steps", "3", "--input-size", "5",
            "--hidden-size", "4", "--reps", "2", "--json", str(path)]
    bench.main(argv)
    report = json.loads(path.read_text())
    rows = report["results"]
    providers = ["torch.nn", *cnnlstm_fast.available_backends()]
    assert {"reference", "torch"} <= set(providers)
    expected = {(c, m, p) for c in ("lstm", "gru") for m in bench.MODES for p in providers}
    assert {(r["cell"], r["mode"], r["provider"]) for r in rows} == expected
    for row in rows:
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["us_per_step"] == pytest.approx(row["median_ms"] * 1e3 / 3)
        assert row["gflops"] > 0 and row["speedup"] > 0
        if row["provider"] == "torch.nn":
            assert row["speedup"] == 1.0
    assert report["environment"]["torch"] == cnnlstm_fast.env.collect()["torch"]
    assert "torch.nn" in capsys.readouterr().out


def test_flops_count():
    cfg = bench.Config("lstm", 16, 32, 128, 64, 2, "float32", "forward", "cpu")
    assert cfg.flops == 8 * 32 * 16 * 64 * (128 + 64) + 8 * 32 * 16 * 64 * (64 + 64)
    gru = bench.Config("gru", 16, 32, 128, 64, 1, "float32", "forward_backward", "cpu")
    assert gru.flops == 3 * 6 * 32 * 16 * 64 * (128 + 64)


def test_unknown_provider_is_an_error():
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--providers", "no_such_backend"])
