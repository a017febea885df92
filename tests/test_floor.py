"""The per-step floor (cnnlstm_fast/bench/floor.py, csrc/cuda/floor.cu): its arithmetic
and reporting everywhere; the kernel itself on a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from cnnlstm_fast import bench
from cnnlstm_fast.bench import floor, report
from cnnlstm_fast.bench.suites import Config

ROOT = Path(__file__).resolve().parent.parent


def _fake_floor(monkeypatch, exchange_us=2.0, matmul_us=0.5):
    calls = []

    def measure(batch, hidden, gates, dtype, device, peak, steps=1024, blocks=None):
        calls.append((batch, hidden, gates, dtype, device, peak))
        return floor.Floor(batch, hidden, gates, str(dtype), 132, steps, 1.0, exchange_us,
                           matmul_us, exchange_us)

    monkeypatch.setattr(floor, "measure", measure)
    monkeypatch.setattr(floor, "unavailable_reason", lambda device: None)
    return calls


def test_row_floor_counts_layers_directions_and_the_backward(monkeypatch):
    calls = _fake_floor(monkeypatch)
    cfg = Config("gru", 16, 1024, 768, 768, layers=2, directions=2, dtype="bfloat16",
                 mode="forward_backward", device="cuda")
    us, why = floor.row_floor(cfg, 700.0)
    assert why is None and us == pytest.approx(2.5 * 2 * 2 * 2)
    assert calls == [(16, 768, 3, torch.bfloat16, "cuda", 700.0)]
    us, why = floor.row_floor(Config("lstm", 16, 8, 4, 4, dtype="float16", device="cuda"), 700.0)
    assert us == pytest.approx(2.5) and why is None
    for model in ("cell", "cnnlstm-1d"):
        us, why = floor.row_floor(Config("lstm", 1, 8, 4, 4, device="cuda", model=model), 1.0)
        assert us is None and "no recurrence floor" in why


def test_rows_carry_the_floor_and_the_ratio_to_it():
    cfg = Config("lstm", 16, 1000, 768, 768, dtype="float16", device="cuda")
    timings = {"torch.nn": {"median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.1},
               "cuda": {"median_ms": 4.0, "p20_ms": 3.9, "p80_ms": 4.1}}
    rows = bench._rows(cfg, "quick", timings, 10**9, {"float16": 700.0}, {}, floor_us=0.5)
    by = {r["provider"]: r for r in rows}
    assert by["torch.nn"]["floor_us_per_step"] == 0.5
    assert by["torch.nn"]["x_floor"] == pytest.approx(2.0 / 0.5)  # 2 us per step
    assert by["cuda"]["x_floor"] == pytest.approx(8.0)
    rows = bench._rows(cfg, "quick", timings, 10**9, {"float16": 700.0}, {})
    assert all(r["floor_us_per_step"] is None and r["x_floor"] is None for r in rows)


def test_cuda_config_rows_get_the_floor_and_a_failure_is_a_skip_note(monkeypatch):
    """run_config's CUDA branch, with the device parts faked (CUDA timing, the steps):
    the floor reaches every row of a layer config, and a floor that cannot be measured
    becomes one skip entry instead of ending the suite."""
    from cnnlstm_fast.bench import providers, timing

    cfg = Config("lstm", 16, 100, 8, 8, dtype="float16", device="cuda")
    monkeypatch.setattr(providers, "config_steps",
                        lambda cfg, names, limits: ({n: (lambda: None) for n in names}, {}))
    monkeypatch.setattr(timing, "time_cuda", lambda steps, reps: {
        n: {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "peak_mib": 1.0} for n in steps})
    _fake_floor(monkeypatch)
    rows, skips = bench.run_config(cfg, "quick", ["torch.nn", "cuda"], {}, 10, {"float16": 100.0})
    assert not skips and {r["floor_us_per_step"] for r in rows} == {2.5}
    assert [r["x_floor"] for r in rows] == pytest.approx([10.0 / 2.5] * 2)  # 10 us a step
    monkeypatch.setattr(floor, "measure", lambda *a, **k: 1 / 0)
    rows, skips = bench.run_config(cfg, "quick", ["torch.nn", "cuda"], {}, 10, {"float16": 100.0})
    assert {r["x_floor"] for r in rows} == {None}
    assert skips == [{"config": cfg.name, "provider": "floor", "reason":
                      "measuring the floor failed: ZeroDivisionError: division by zero"}]


def test_cpu_runs_have_no_floor_and_print_no_floor_columns(capsys):
    result = bench.main(["--device", "cpu", "--config", "B=2,T=3,I=5,H=4", "--reps", "2",
                         "--no-progress", "--cells", "lstm", "--modes", "forward",
                         "--providers", "torch.nn,reference"])
    assert all(r["x_floor"] is None for r in result["results"])
    assert not any(s["provider"] == "floor" for s in result["skipped"])
    out = capsys.readouterr().out
    assert "us/step" in out and "x floor" not in out
    report.print_table([{**result["results"][0], "floor_us_per_step": 0.5, "x_floor": 3.0}],
                       "t", [])
    assert "x floor" in capsys.readouterr().out


def test_results_tables_show_the_floor_where_a_run_has_it():
    spec = importlib.util.spec_from_file_location("perf_report", ROOT / "benchmarks" / "report.py")
    perf_report = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = perf_report  # its dataclasses look their module up there
    spec.loader.exec_module(perf_report)
    cfg = Config("lstm", 16, 1000, 768, 768, dtype="float16", device="cuda")
    timings = {"torch.nn": {"median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.1},
               "auto": {"median_ms": 4.0, "p20_ms": 3.9, "p80_ms": 4.1}}
    rows = bench._rows(cfg, "quick", timings, 10**9, {"float16": 700.0}, {"auto": "cuda"},
                       floor_us=0.5)
    run = {"suite": "quick", "device": "GPU", "threads": 1, "peak_tflops": {"float16": 700.0},
           "environment": {"git_commit": "abc", "torch": "t", "triton": {"version": "x"},
                           "cnnlstm_fast": "v"}, "results": rows, "notes": []}
    text = "\n".join(perf_report._table(run))  # the tables of docs/performance.md
    assert "| configuration | torch.nn ms | floor us/step | auto |" in text
    assert "| 2.000 (4.0x floor) | 0.50 | 0.50x (cuda); 4.0 us/step, 8.0x floor |" in text


def test_a_failed_floor_measurement_is_a_note_not_a_crash(monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("'float' object is not subscriptable")

    monkeypatch.setattr(floor, "measure", broken)
    monkeypatch.setattr(floor, "unavailable_reason", lambda device: None)
    us, why = floor.row_floor(Config("lstm", 16, 8, 4, 4, dtype="float16", device="cuda"), 1.0)
    assert us is None and why == ("measuring the floor failed: TypeError: 'float' object is "
                                  "not subscriptable")


def test_floor_cli_writes_a_row_per_shape_as_it_goes(tmp_path, monkeypatch, capsys):
    """The CLI's own logic, with the GPU parts faked (the GPU test below runs it for
    real): every (dtype, batch, hidden, blocks) gets a row, the JSON is rewritten after
    each (a run cut short by a time limit keeps its rows) and marked complete at the end."""
    calls = _fake_floor(monkeypatch)
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    monkeypatch.setattr("cnnlstm_fast.bench.timing.matmul_peak_tflops",
                        lambda device, dtype: 100.0)
    real_write = json.dumps

    def dumps(report, **kw):
        if isinstance(report, dict) and "complete" in report:  # the CLI's JSON, not others'
            seen.append((len(report["results"]), report["complete"]))
        return real_write(report, **kw)

    monkeypatch.setattr(floor.json, "dumps", dumps)
    path = tmp_path / "floor.json"
    assert floor.main(["--batch", "1", "16", "--hidden", "8", "--dtype", "float16",
                       "--blocks", "0", "16", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["complete"] and report["device"] == "FakeGPU" and len(report["results"]) == 4
    assert seen == [(1, False), (2, False), (3, False), (4, True)]
    assert [c[:2] for c in calls] == [(1, 8), (1, 8), (16, 8), (16, 8)]
    assert report["results"][0]["us"] == 2.5 and "FakeGPU" in capsys.readouterr().out


def test_floor_cli_without_a_gpu_says_why(capsys):
    if floor.unavailable_reason("cuda") is None:
        pytest.skip("a GPU is here: the GPU tests below run the CLI")
    assert floor.main([]) == 2
    assert "no floor:" in capsys.readouterr().err


def _gpu_floor_op():
    why = floor.unavailable_reason("cuda")
    if why is not None:
        pytest.skip(why)
    return torch.ops.cnnlstm_fast


@pytest.mark.gpu
@pytest.mark.experimental("cuda-step-floor")  # tests/conftest.py
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, hidden, blocks", [(1, 1, 1), (3, 67, 7), (16, 768, 0),
                                                    (5, 131, 300)])
def test_gpu_floor_kernel_exchanges_every_step(batch, hidden, blocks, dtype):
    """h0 = 0 and every step writes mean(h) + 1: after s steps every element of the last
    slot is s, exactly. A block that read a stale slot or skipped the barrier would
    leave a smaller value somewhere. The barrier alone leaves h as it was. Blocks: 0 is
    one per SM; 300 is more than hidden (blocks without units)."""
    ops = _gpu_floor_op()
    most = ops.step_floor_max_blocks(torch.empty(0, device="cuda", dtype=dtype))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = min(blocks or sms, most)
    stride = -(-batch * hidden // 8) * 8
    # one step from an uneven h0 (i % 7): every element is mean(h0) + 1, computed as the
    # kernel does (an exact integer sum, one float32 division): a block that read only
    # part of h would get another mean
    state = batch * hidden
    h = torch.zeros(2, stride, device="cuda", dtype=dtype)
    h[0, :state] = (torch.arange(state, device="cuda") % 7).to(dtype)
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    ops.step_floor(h, counter, 1, batch, hidden, grid, True, True)
    total = torch.tensor(float(sum(i % 7 for i in range(state))), dtype=torch.float32)
    want = (total / state + 1).to(dtype).item()
    got = h[1, :state].float()
    assert torch.equal(got, torch.full_like(got, want)), (want, got.unique())
    # and the barrier without its fence (floor.py times it), which must give the same
    for steps, fence in ((1, True), (2, True), (37, True), (37, False)):
        h = torch.zeros(2, stride, device="cuda", dtype=dtype)
        counter = torch.zeros(1, device="cuda", dtype=torch.int32)
        ops.step_floor(h, counter, steps, batch, hidden, grid, True, fence)
        last = h[steps % 2, : batch * hidden].float()
        assert torch.equal(last, torch.full_like(last, float(steps))), (steps, fence, last.unique())
        assert int(counter) == steps * grid
        h.zero_()
        counter.zero_()
        ops.step_floor(h, counter, steps, batch, hidden, grid, False)
        assert not h.any() and int(counter) == steps * grid


@pytest.mark.gpu
@pytest.mark.experimental("cuda-step-floor")  # tests/conftest.py
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, hidden, blocks", [(1, 1, 1), (3, 67, 7), (16, 768, 16),
                                                    (5, 13, 16)])
def test_gpu_cluster_floor_kernel_exchanges_every_step(batch, hidden, blocks, dtype):
    """The cluster variant (sm_90): h0 from slot 0, one uneven step gives mean(h0) + 1
    everywhere (every block read all of its shared copy of h0), and 37 steps from zeros
    give 37 (a push that did not arrive leaves a stale value in a peer's copy, which
    its slice then reflects). 13 units over 16 blocks: some own none."""
    ops = _gpu_floor_op()
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    state = batch * hidden
    stride = -(-state // 8) * 8
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    h = torch.zeros(2, stride, device="cuda", dtype=dtype)
    h[0, :state] = (torch.arange(state, device="cuda") % 7).to(dtype)
    ops.step_floor(h, counter, 1, batch, hidden, blocks, True, True, True)
    total = torch.tensor(float(sum(i % 7 for i in range(state))), dtype=torch.float32)
    want = (total / state + 1).to(dtype).item()
    got = h[1, :state].float()
    assert torch.equal(got, torch.full_like(got, want)), (want, got.unique())
    h.zero_()
    ops.step_floor(h, counter, 37, batch, hidden, blocks, True, True, True)
    last = h[1, :state].float()
    assert torch.equal(last, torch.full_like(last, 37.0)), last.unique()


@pytest.mark.gpu
@pytest.mark.experimental("cuda-step-floor")  # tests/conftest.py
def test_gpu_floor_op_checks_its_arguments():
    ops = _gpu_floor_op()
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="slot_stride 12 must be a multiple of 8"):
        ops.step_floor(torch.zeros(2, 12, device="cuda"), counter, 4, 3, 4, 1, True)
    with pytest.raises(RuntimeError, match="at least batch x hidden = 20"):
        ops.step_floor(torch.zeros(2, 16, device="cuda"), counter, 4, 4, 5, 1, True)
    with pytest.raises(RuntimeError, match="barrier must be one int32"):
        ops.step_floor(torch.zeros(2, 16, device="cuda"), counter.long(), 4, 4, 4, 1, True)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ops.step_floor(torch.zeros(33, device="cuda")[1:].view(2, 16), counter, 4, 4, 4, 1, True)
    with pytest.raises(RuntimeError, match="steps x blocks in uint32"):
        ops.step_floor(torch.zeros(2, 16, device="cuda"), counter, 2**30, 4, 4, 4, True)
    with pytest.raises(RuntimeError, match="at most 16 blocks, got exchange 1, blocks 17"):
        ops.step_floor(torch.zeros(2, 16, device="cuda"), counter, 4, 4, 4, 17, True, True, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.step_floor(torch.zeros(2, 16, device="cuda", dtype=torch.float64), counter, 4, 4, 4,
                       1, True)


@pytest.mark.gpu
@pytest.mark.experimental("cuda-step-floor")  # tests/conftest.py
def test_gpu_floor_measures_and_the_cli_writes_json(tmp_path):
    _gpu_floor_op()
    f = floor.measure(16, 768, 4, torch.float16, "cuda", 700.0, steps=256)
    assert f.blocks == torch.cuda.get_device_properties(0).multi_processor_count
    assert f.barrier_us > 0 and f.exchange_us > 0 and f.matmul_us > 0 and f.exchange_nofence_us > 0
    if torch.cuda.get_device_capability()[0] >= 9:  # 16 x 768 in fp16 fits twice in shared memory
        assert f.cluster_us is not None and f.cluster_us > 0
    else:
        assert f.cluster_us is None
    assert f.us == f.exchange_us + f.matmul_us
    assert f.matmul_us == pytest.approx(2 * 16 * 768 * 3072 / 700e12 * 1e6)
    path = tmp_path / "floor.json"
    assert floor.main(["--batch", "16", "--hidden", "768", "--dtype", "float16", "--steps", "64",
                       "--blocks", "0", "16", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [r["blocks"] for r in rows][1] == 16 and all(r["us"] > 0 for r in rows)
