"""The benchmark CLI, the pytest-benchmark suite and the docs' generated tables."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cnnlstm_fast
from cnnlstm_fast import bench
from cnnlstm_fast.bench import report, suites

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--config", "B=2,T=3,I=5,H=4", "--reps", "2", "--no-progress"]


def test_bench_tiny_json_csv_compare(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main([*TINY, "--json", str(path), "--csv", str(tmp_path / "bench.csv")])
    result = json.loads(path.read_text())
    rows = result["results"]
    ours = [b for b in cnnlstm_fast.available_backends() if b != "torch"]
    assert {"reference", "cpu"} <= set(ours)
    expected = {(c, m, p) for c in suites.CELLS for m in suites.MODES
                for p in ["torch.nn", "auto", *ours]}
    assert {(r["cell"], r["mode"], r["provider"]) for r in rows} == expected
    for row in rows:
        # what auto picked, as the module resolved it in that run (its own rules decide
        # which; every layer of the config is named)
        if row["provider"] == "auto":
            assert row["picked"] and set(row["picked"].split("+")) <= {"torch", *ours}, row
        else:
            assert row["picked"] is None
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["us_per_step"] == pytest.approx(row["median_ms"] * 1e3 / 3)
        assert row["tflops"] > 0 and row["speedup"] > 0 and row["pct_peak"] > 0
        assert row["peak_mib"] is None  # CPU: not measured, not invented
        if row["provider"] == "torch.nn":
            assert row["speedup"] == 1.0
    assert result["peak_tflops"]["float32"] > 0
    assert result["environment"]["torch"] == cnnlstm_fast.env.collect()["torch"]
    assert any("flashrnn" in note for note in result["notes"])  # not installed here
    assert {s["provider"] for s in result["skipped"]} == {"flashrnn"}
    assert len((tmp_path / "bench.csv").read_text().splitlines()) == len(rows) + 1
    bench.main([*TINY, "--cells", "gru", "--modes", "forward", "--compare", str(path)])
    out = capsys.readouterr().out
    assert "torch.nn" in out and "change against" in out


def test_auto_picks_are_recorded_per_config():
    """The auto row names the backend the module chose for that very input: with the
    process default pinned, auto resolves to it."""
    with cnnlstm_fast.use_backend("reference"):
        result = bench.main([*TINY, "--cells", "lstm", "--providers", "auto"])
    assert {r["picked"] for r in result["results"] if r["provider"] == "auto"} == {"reference"}


def test_auto_choices_collects_and_restores_the_logger():
    import logging

    import torch

    from cnnlstm_fast.bench import providers

    logger = logging.getLogger("cnnlstm_fast.backends")
    before = (logger.level, logger.propagate, list(logger.handlers))
    with providers.auto_choices() as names:
        cnnlstm_fast.GRU(3, 4, backend="auto")(torch.randn(2, 1, 3))
        cnnlstm_fast.GRU(3, 4, backend="reference")(torch.randn(2, 1, 3))  # not auto: not collected
    assert len(names) == 1 and names[0] in cnnlstm_fast.available_backends()
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_auto_slower_than_torch_nn_is_a_note():
    row = dict(config="c", p20_ms=1.0, p80_ms=1.2)
    rows = [{**row, "provider": "torch.nn"},
            {**row, "provider": "auto", "picked": "cpu", "speedup": 0.8, "p20_ms": 1.25}]
    assert report.auto_notes(rows) == [
        "auto slower than torch.nn beyond the p20-p80 spread in 1 config(s): c (cpu, 0.80x)"]
    rows[1]["p20_ms"] = 1.15  # the ranges overlap: noise, no note
    assert report.auto_notes(rows) == []


def test_a_stopped_run_keeps_what_it_measured(tmp_path, monkeypatch):
    """--json is rewritten after every configuration, marked incomplete until the last:
    a run killed by a time limit (a GPU session's) keeps the configurations it finished."""
    path = tmp_path / "bench.json"
    real, calls = bench.run_config, []

    def stop_at_third(cfg, *args):
        calls.append(cfg.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a time limit's signal does mid-run
        return real(cfg, *args)

    monkeypatch.setattr(bench, "run_config", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*TINY, "--providers", "cpu", "--json", str(path)])
    partial = json.loads(path.read_text())
    assert partial["complete"] is False
    assert (partial["configs_done"], partial["configs_total"]) == (2, 4)
    assert {r["config"] for r in partial["results"]} == set(calls[:2])
    assert partial["notes"][0] == "incomplete: 2 of 4 configurations (the run was stopped)"
    monkeypatch.setattr(bench, "run_config", real)
    bench.main([*TINY, "--providers", "cpu", "--json", str(path)])
    full = json.loads(path.read_text())
    assert full["complete"] is True and full["configs_done"] == full["configs_total"] == 4
    assert not any(note.startswith("incomplete") for note in full["notes"])


def test_reference_skipped_above_its_limit():
    result = bench.main([*TINY, "--cells", "lstm", "--modes", "forward",
                         "--providers", "reference", "--limit", "reference=2"])
    assert [r["provider"] for r in result["results"]] == ["torch.nn"]
    assert "limit 2" in result["skipped"][0]["reason"]


def test_unsupported_dtype_is_skipped_with_a_note():
    result = bench.main([*TINY, "--cells", "gru", "--modes", "forward", "--dtype", "bfloat16",
                         "--providers", "cpu"])
    assert [s["provider"] for s in result["skipped"]] == ["cpu"]


def test_plot(tmp_path):
    rows = [dict(cell="lstm", mode="forward", dtype="float32", sweep="batch", batch=b,
                 provider=p, speedup=s) for b in (1, 2) for p, s in (("torch.nn", 1.0), ("cpu", 1.5))]
    assert [Path(p).name for p in report.plot(rows, str(tmp_path))] == ["speedup-batch-float32.png"]


def test_plot_panels_keep_sweep_bases_apart(tmp_path, monkeypatch):
    """short-seq sweeps T from two batches, for layers and cell loops: four panels, each
    with its own lines, not one line zigzagging between bases."""
    import matplotlib.axes

    rows = [dict(model=m, cell="lstm", mode="forward", dtype="float32", sweep="steps", steps=t,
                 batch=b, input_size=8, hidden_size=8, layers=1, directions=1, provider="cpu",
                 speedup=1.0 + t / 10) for m in ("", "cell") for b in (1, 16) for t in (1, 2, 4)]
    plotted = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, xs, ys, **kw: plotted.append(list(xs)) or real(ax, xs, ys, **kw))
    assert len(report.plot(rows, str(tmp_path))) == 1
    assert plotted == [[1, 2, 4]] * 4


def test_short_seq_suite_times_layers_and_cell_loops():
    shapes = suites.shapes("short-seq", "cpu")
    assert {(s["model"], s["batch"]) for s in shapes} == {("", 1), ("", 16), ("cell", 1), ("cell", 16)}
    assert {s["steps"] for s in shapes} == set(suites.SHORT_STEPS)
    assert not any(suites.is_model(s) for s in shapes)
    result = bench.main(["--device", "cpu", "--suite", "short-seq", "--reps", "2", "--no-progress",
                         "--cells", "gru", "--modes", "forward_backward",
                         "--providers", "auto,reference"])
    cell_rows = [r for r in result["results"] if r["model"] == "cell"]
    assert {r["provider"] for r in cell_rows} == {"torch.nn", "auto", "reference"}
    assert all(r["config"].startswith("cell-gru B") and r["flops"] == suites.Config(
        "gru", r["batch"], r["steps"], 256, 256, mode="forward_backward").flops for r in cell_rows)


def test_cell_loop_runs_the_cell_once_per_step_with_the_baseline_weights():
    from cnnlstm_fast.bench import providers

    cfg = suites.Config("lstm", 3, 5, 4, 6, model="cell", mode="forward_backward")
    steps, skipped = providers.config_steps(cfg, ["torch.nn", "reference"], {})
    assert not skipped
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append((type(module).__name__, args[0].shape)))
    try:
        steps["reference"]()
    finally:
        handle.remove()
    assert calls == [("LSTMCell", torch.Size([3, 4]))] * 5


def test_suites_shapes():
    shapes = suites.shapes("flashrnn", "cuda")
    assert shapes[0] == suites.CANONICAL
    assert {s["batch"] for s in shapes if s.get("sweep") == "batch"} == set(suites.BATCHES)
    assert {s["steps"] for s in shapes if s.get("sweep") == "steps"} == set(suites.STEPS)
    assert {s["hidden_size"] for s in suites.shapes("hidden-sweep", "cuda")} == set(suites.HIDDENS)
    configs = suites.make_configs(shapes, ["lstm"], ["bfloat16"], ["forward"], "cuda")
    assert len(configs) == len({c.name for c in configs})  # the sweeps meet at B=16 once


def test_flops_count():
    cfg = suites.Config("lstm", 16, 32, 128, 64, layers=2)
    assert cfg.flops == 8 * 32 * 16 * 64 * (128 + 64) + 8 * 32 * 16 * 64 * (64 + 64)
    gru = suites.Config("gru", 16, 32, 128, 64, mode="forward_backward")
    assert gru.flops == 3 * 6 * 32 * 16 * 64 * (128 + 64)
    bi = suites.Config("lstm", 1, 1, 3, 2, layers=2, directions=2)
    assert bi.flops == 2 * 8 * 2 * (3 + 2) + 2 * 8 * 2 * (4 + 2)


@pytest.mark.parametrize("argv", [["--providers", "no_such_backend"], ["--config", "B=2,T=3"],
                                  ["--dtype", "float64"], ["--limit", "reference"]])
def test_bad_arguments_are_errors(argv):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", *argv])


def test_pytest_benchmark_suite_smoke():
    """What CI runs of benchmarks/: every test once, tiny shapes, benchmarking disabled."""
    env = {**os.environ, "CNNLSTM_FAST_BENCH_TINY": "1", "CNNLSTM_FAST_BENCH_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-x",
         "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout


def _report_script():
    """benchmarks/report.py, the generator of the docs' tables (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("docs_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


needs_git = pytest.mark.skipif(not (ROOT / ".git").exists(),
                               reason="report.py orders result files by git history")


@needs_git
def test_generated_docs_are_what_report_py_generates():
    """README.md (support matrix, headline tables), docs/performance.md and docs/gpu.md
    (kernel status) are regenerated from benchmarks/results by benchmarks/report.py."""
    stale = [path.relative_to(ROOT).as_posix()
             for path, (text, new) in _report_script().regenerate().items() if new != text]
    assert not stale, (f"{stale} differ from what benchmarks/results generates: "
                       "run python benchmarks/report.py")


def _history(n):
    done = subprocess.run(["git", "rev-list", "--topo-order", "-n", str(n), "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def _bench_file(path, commit, rows, suite="config", **cuda_settings):
    """A result file as ``python -m cnnlstm_fast.bench --json`` writes it, reduced to what
    report.py reads."""
    full = [dict(dict(config=f"lstm B16 {r['dtype']} {r['mode']}", cell="lstm", batch=16,
                      steps=1024, input_size=768, hidden_size=768, layers=1, directions=1,
                      model="", device="cuda", median_ms=1.0), **r) for r in rows]
    path.write_text(json.dumps(dict(
        suite=suite, device="NVIDIA H100 80GB HBM3", threads=16, peak_tflops={}, notes=[],
        environment=dict(git_commit=commit, torch="2.11.0+cu130", triton={"version": "3.6.0"},
                         cnnlstm_fast="0.1.0", cuda_settings=cuda_settings),
        results=full)))


@needs_git
def test_newest_file_of_a_suite_is_by_the_commit_it_records(tmp_path):
    """Not by name: the newer commit's file sorts first whatever its suffix."""
    new, old = _history(6)[1], _history(6)[5]
    device = tmp_path / "gpu"
    device.mkdir()
    row = dict(provider="cuda", dtype="bfloat16", mode="forward", speedup=2.0)
    _bench_file(device / f"canonical-{new[:7]}.json", new, [row])
    _bench_file(device / f"canonical-{old[:7]}.json", old, [row])
    report = _report_script()
    files = report.load(tmp_path)["gpu"]
    assert [r.stem for r in files] == ["canonical", "canonical"]
    assert [r.path.name for r in report.newest(files)] == [f"canonical-{new[:7]}.json"]


@needs_git
def test_kernel_status_takes_the_newest_session_that_passed_and_timed_the_kernel(tmp_path):
    """A session counts for a default kernel when its log says every GPU test passed and
    its result files time that kernel; for an experimental kernel when its experimental
    verification ran to the end and passed that kernel, and its result files time it
    with the switch and its setting recorded."""
    passed, failed = _history(4)[3], _history(4)[1]  # the failed session is newer
    device = tmp_path / "gpu"
    device.mkdir()
    training = dict(provider="cuda", dtype="bfloat16", mode="forward_backward", speedup=2.0)
    _bench_file(device / f"canonical-{passed[:7]}.json", passed, [training])
    _bench_file(device / f"canonical-pb-{passed[:7]}.json", passed, [training],
                CNNLSTM_FAST_EXPERIMENTAL="1", CNNLSTM_FAST_CUDA_BACKWARD="persistent")
    _bench_file(device / f"canonical-mp-{passed[:7]}.json", passed, [training],
                CNNLSTM_FAST_EXPERIMENTAL="1", CNNLSTM_FAST_CUDA_KERNEL="mma-pipelined")
    _bench_file(device / f"canonical-{failed[:7]}.json", failed, [training])
    (device / f"gpu-session-{passed[:7]}.log").write_text("60s gpu tests rc=0 (9 passed)\n"
                                                          "30s experimental tests rc=1\n")
    (device / f"gpu-session-{failed[:7]}.log").write_text("60s gpu tests rc=1 (1 failed)\n")
    kernels = {"cuda-persistent-backward": {"result": "pass"},
               "cuda-mma-pipelined": {"result": "fail"}}
    (device / f"experimental-{passed[:7]}.json").write_text(
        json.dumps({"switch": True, "complete": True, "kernels": kernels}))
    report = _report_script()
    status = {s.kernel.key: s for s in report.kernel_status(report.load(tmp_path))}
    assert status["cuda-backward"].file.name == f"canonical-{passed[:7]}.json"
    assert status["cuda-forward"].commit == passed[:7]
    assert status["cuda-persistent-backward"].file.name == f"canonical-pb-{passed[:7]}.json"
    assert not status["cuda-mma-pipelined"].verified  # timed, but its tests failed
    assert not status["cuda-mma-cluster"].verified and not status["triton-forward"].verified
    text = report.render_kernels(list(status.values()))
    assert "not yet run on a GPU" in text and f"`{passed[:7]}`" in text
    assert "`CNNLSTM_FAST_EXPERIMENTAL=1` `set_kernels(cuda_backward='persistent')`" in text


def test_kernel_status_names_each_pin_by_the_setting_that_sets_it():
    """Result files record the GPU kernel pins under the names of the environment
    variables they were (cnnlstm_fast.env); the status table shows the set_kernels call."""
    from cnnlstm_fast import experimental

    report = _report_script()
    assert report.PIN_ARGUMENTS == {s.record_key: s.argument for s in experimental.SETTINGS}
    assert report.selected_by(()) == "default"
    pdl = (("CNNLSTM_FAST_EXPERIMENTAL", "1"), ("CNNLSTM_FAST_CUDA_PDL", "1"))
    assert report.selected_by(pdl) == "`CNNLSTM_FAST_EXPERIMENTAL=1` `set_kernels(cuda_pdl=True)`"
    for kernel in report.KERNELS:  # every pin the table names is one set_kernels takes
        for key, value in kernel.settings:
            if key in report.PIN_ARGUMENTS:
                setting = next(s for s in experimental.SETTINGS if s.record_key == key)
                assert setting.recorded(setting.check(value == "1" if key in
                                                      report._BOOLEAN_PINS else value)) == value


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("cnnlstm-fast-bench", "cnnlstm_fast.bench:main") == "cnnlstm_fast.bench:main"
    done = subprocess.run([sys.executable, "-m", "cnnlstm_fast.bench", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--suite" in done.stdout


def test_cpu_gemm_and_kernel_options_apply_for_the_run_and_are_recorded(monkeypatch):
    from cnnlstm_fast.backends import cpu

    if cpu.CpuBackend().unavailable_reason() is not None:
        pytest.skip("the cpu backend is unavailable")
    seen = []
    real = bench.run_config

    def spy(*args, **kwargs):
        seen.append((cpu.get_gemm(), cpu.get_kernel()))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_config", spy)
    result = bench.main([*TINY, "--cells", "gru", "--modes", "forward", "--providers", "cpu",
                         "--cpu-gemm", "blas", "--cpu-kernel", "per_step"])
    assert seen and set(seen) == {("blas", "per_step")}
    settings = result["environment"]["cpu_settings"]
    assert (settings["cpu.set_gemm"], settings["cpu.set_kernel"]) == ("blas", "per_step")
    assert (cpu.get_gemm(), cpu.get_kernel()) == ("auto", "auto")  # restored after the run
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY, "--cpu-kernel", "fast"])


def test_gpu_kernel_pin_options_apply_for_the_run_and_are_recorded(monkeypatch, pin_kernels):
    """--cuda-forward, --cuda-backward, --cuda-pdl, --triton-backward (what
    benchmarks/gpu_session.sh passes for its pinned suites): set for the run
    (cnnlstm_fast.experimental.use_kernels), recorded in the environment's cuda_settings
    under the old variables' names, restored after it."""
    from cnnlstm_fast import experimental

    monkeypatch.delenv(experimental.SWITCH, raising=False)
    pin_kernels(cuda_forward="auto", cuda_backward="auto", cuda_pdl=False,
                triton_backward="step")  # the defaults, whatever ran before
    before = experimental.get_kernels()
    seen = []
    real = bench.run_config

    def spy(*args, **kwargs):
        seen.append(experimental.get_kernels())
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_config", spy)
    tiny = [*TINY, "--cells", "gru", "--modes", "forward", "--providers", "reference"]
    result = bench.main([*tiny, "--cuda-forward", "step", "--cuda-backward", "step"])
    assert seen == [{**before, "cuda_forward": "step", "cuda_backward": "step"}]
    assert result["environment"]["cuda_settings"] == {
        "CNNLSTM_FAST_EXPERIMENTAL": None, "CNNLSTM_FAST_CUDA_KERNEL": "step",
        "CNNLSTM_FAST_CUDA_BACKWARD": "step", "CNNLSTM_FAST_CUDA_PDL": None,
        "CNNLSTM_FAST_TRITON_BACKWARD": None}
    assert experimental.get_kernels() == before  # restored after the run
    # an experimental pin without the switch would time the default kernel: refused
    for pin in (["--cuda-pdl"], ["--cuda-forward", "streamed"], ["--triton-backward", "auto"]):
        with pytest.raises(SystemExit):
            bench.parse_args([*tiny, *pin])
    with pytest.raises(SystemExit):
        bench.parse_args([*tiny, "--cuda-forward", "fast"])
    seen.clear()
    monkeypatch.setenv(experimental.SWITCH, "1")
    result = bench.main([*tiny, "--cuda-pdl", "--cuda-forward", "mma-cluster",
                         "--triton-backward", "persistent"])
    assert seen == [{**before, "cuda_forward": "mma-cluster", "cuda_pdl": True,
                     "triton_backward": "persistent"}]
    assert result["environment"]["cuda_settings"] == {
        "CNNLSTM_FAST_EXPERIMENTAL": "1", "CNNLSTM_FAST_CUDA_KERNEL": "mma-cluster",
        "CNNLSTM_FAST_CUDA_BACKWARD": None, "CNNLSTM_FAST_CUDA_PDL": "1",
        "CNNLSTM_FAST_TRITON_BACKWARD": "persistent"}
    assert experimental.get_kernels() == before
