"""cnnlstm_fast.tune: the fastest backend per call signature, measured on this machine,
recorded on disk and followed by ``auto``; tuning on first use; explain; the record's
keying, its failures (corrupt, unwritable), concurrent writers and determinism."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cnnlstm_fast as clf
from cnnlstm_fast import backends
from cnnlstm_fast.backends import tuned
from cnnlstm_fast.models import CNNLSTM

tune_module = importlib.import_module("cnnlstm_fast.tune")  # clf.tune is the function

needs_cpu = pytest.mark.skipif(backends.backend_report().get("cpu") is not None,
                               reason="cpu backend (the _C extension) not built")

STEPS = backends.AUTO_MIN_STEPS["cpu"] + 1  # long enough for auto's rules to be asked


@pytest.fixture(autouse=True)
def record(tmp_path, monkeypatch):
    """An empty record of the test's own, and tuning off, before and after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tuned.reset()
    clf.set_tuning(False)
    yield tmp_path / "cache" / "cnnlstm_fast"
    clf.set_tuning(False)
    tuned.reset()


@pytest.fixture
def fake_times(monkeypatch):
    """Timing replaced by fixed medians (``times[name]``, ms); every candidate still runs
    once. In the whole-model check ``times["whole:<name>"]`` where given, and its
    "tuned" configuration (the per-layer choices) times as the fastest unless ``times``
    says otherwise. Returns (times, the signatures timed in
    order; the whole-model check's steps are not among them)."""
    times = {"torch": 2.0, "cpu": 3.0, "reference": 1.0}
    timed = []

    def fake(steps, device):
        if "tuned" not in steps:
            timed.append(tuple(steps))
        for step in steps.values():
            step()
        whole = "tuned" in steps  # the whole-model check: "whole:<name>" first
        got = {n: times.get(f"whole:{n}" if whole else n, times.get(n, min(times.values())))
               for n in steps}
        return {n: {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "reps": 1}
                for n, ms in got.items()}, {}

    monkeypatch.setattr(tune_module, "_time", fake)
    return times, timed


@pytest.fixture
def reference_candidate(monkeypatch):
    """The reference backend as a candidate beside torch.nn: never a rule's pick, so a
    tuned choice of it shows."""
    monkeypatch.setattr(tune_module, "candidates", lambda spec: ["torch", "reference"])


def _explain_row(model, *inputs) -> dict:
    (row,) = clf.explain(model, *inputs).rows
    return row


def test_tune_records_the_fastest_and_auto_follows_it(fake_times, reference_candidate, monkeypatch):
    layer = clf.GRU(3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(STEPS, 2, 3)
    torch_nn = torch.nn.GRU(3, 5, num_layers=2, bidirectional=True)
    torch_nn.load_state_dict(layer.state_dict())
    assert _explain_row(layer, x)["backend"] != "reference"  # the rules never take it

    table = clf.tune(layer, x)
    (row,) = table.rows
    assert row["choice"] == "reference" and row["layer"] == "GRU"
    assert row["signature"] == "gru B2 T<=16 I3 H5 L2 D2 float32 training"
    assert row["median ms"] == "reference 1, torch 2"
    assert row["rules"] in ("torch", "cpu")
    assert "reference" in str(table) and str(tuned.cache_path()) in str(table)

    ran = []
    real = backends.get_backend("reference").forward
    monkeypatch.setattr(backends.get_backend("reference"), "forward",
                        lambda *a, **k: ran.append(1) or real(*a, **k))
    got, want = layer(x), torch_nn(x)
    assert ran, "auto did not run the tuned backend"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    row = _explain_row(layer, x)
    assert row["backend"] == "reference"
    assert row["why"].startswith("tuned on this machine (reference 1 ms, torch 2 ms")


def test_the_rules_pick_stays_within_the_noise(fake_times, reference_candidate):
    """A candidate must beat the rules' pick by more than TIE_MARGIN to replace it."""
    times, _ = fake_times
    layer, x = clf.LSTM(3, 4), torch.randn(STEPS, 2, 3)
    with torch.no_grad():
        assert _explain_row(layer, x)["backend"] == "torch"  # small hidden: oneDNN
        times.update(torch=1.0, reference=0.99)
        assert clf.tune(layer, x).rows[0]["choice"] == "torch"
        times.update(reference=0.9)
        assert clf.tune(layer, x).rows[0]["choice"] == "reference"


@needs_cpu
def test_tune_times_the_real_candidates_and_leaves_the_model_as_it_was():
    """Real timing on a small CNN-LSTM in training: the table holds both backends' times,
    the record on disk the choice; parameters' gradients and the random number stream
    are what the call gives without tuning (the timed calls are forked off)."""
    model = CNNLSTM(3, 2, conv_channels=(4,), hidden_size=8, dropout=0.5).train()
    x = torch.randn(2, STEPS, 3)
    torch.manual_seed(1)
    model(x)
    after_plain = torch.get_rng_state()
    torch.manual_seed(1)
    table = clf.tune(model, x)
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert all(p.grad is None for p in model.parameters())
    (row,) = table.rows
    assert row["layer"] == "rnn" and row["signature"].endswith("training")
    (entry,) = json.loads(tuned.cache_path().read_text())["entries"].values()
    assert entry["choice"] == row["choice"] in entry["times_ms"]
    # a candidate is timed, or its warm-up was too slow to be worth it
    # (CNNLSTM's rnn is bidirectional: with two threads or more its directions order too)
    variants = {"cpu:side_by_side"} if torch.get_num_threads() >= 2 else set()
    assert {*entry["times_ms"], *entry["not_timed"]} == {"cpu", "torch", *variants}
    assert all("warm-up" in why for why in entry["not_timed"].values())
    assert entry["reps"] >= tune_module.MIN_REPS


def test_candidates_are_timed_on_inputs_laid_out_as_the_call_s():
    """A conv's output permuted to (T, B, C) runs another path than a contiguous input:
    the timed inputs keep the call's strides (and requires_grad)."""
    x = torch.randn(2, 3, STEPS).permute(2, 0, 1).requires_grad_()
    h = torch.randn(1, 2, 4)
    fresh_x, fresh_h = tune_module._fresh((x, h))
    assert fresh_x.stride() == x.stride() and fresh_x.requires_grad and fresh_x.is_leaf
    assert not torch.equal(fresh_x, x) and not fresh_h.requires_grad


def test_first_use_tuning_times_each_new_signature_once(fake_times):
    """A call of a signature the record lacks is timed; the same bucket of steps is not
    again; another bucket, dtype, batch, mode or device is."""
    times, timed = fake_times
    clf.set_tuning(True)
    assert clf.get_tuning()
    layer = clf.LSTM(3, 4)

    def call(steps=STEPS, batch=2, dtype=torch.float32):
        layer.to(dtype)(torch.randn(steps, batch, 3, dtype=dtype))

    call()
    assert len(timed) == 1
    assert len(json.loads(tuned.cache_path().read_text())["entries"]) == 1  # written at once
    call(steps=16)  # the same power-of-two bucket (9..16)
    assert len(timed) == 1
    for change in (dict(steps=17), dict(batch=3), dict(dtype=torch.float64)):
        call(**change)
    with torch.no_grad():
        call()
    assert len(timed) == 5
    tuned._device_names[torch.device("cpu")] = "cpu:another CPU"
    try:
        call()
    finally:
        tuned._device_names.clear()
    assert len(timed) == 6
    clf.set_tuning(False)
    call(steps=33)
    assert len(timed) == 6


def test_a_new_torch_version_starts_untuned(fake_times, reference_candidate, monkeypatch):
    layer, x = clf.GRU(3, 4), torch.randn(STEPS, 1, 3)
    clf.tune(layer, x)
    first = tuned.cache_path()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "99.0.0")
        tuned.reset()  # as a new process
        assert tuned.cache_path() != first
        assert _explain_row(layer, x)["backend"] != "reference"
    assert first.exists()  # the other version's record stays until --clear
    tuned.reset()
    assert _explain_row(layer, x)["backend"] == "reference"


def test_a_record_of_another_key_is_not_followed(fake_times, reference_candidate):
    layer, x = clf.GRU(3, 4), torch.randn(STEPS, 1, 3)
    clf.tune(layer, x)
    data = json.loads(tuned.cache_path().read_text())
    data["key"]["torch"] = "0.0.1"
    tuned.cache_path().write_text(json.dumps(data))
    tuned.reset()
    with pytest.warns(UserWarning, match="its key is not this version's"):
        assert _explain_row(layer, x)["backend"] != "reference"


def test_a_corrupt_record_warns_and_is_moved_aside(fake_times, reference_candidate):
    layer, x = clf.GRU(3, 4), torch.randn(STEPS, 1, 3)
    path = tuned.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "entr')
    with pytest.warns(UserWarning, match="is not a readable record"):
        assert _explain_row(layer, x)["backend"] != "reference"
    with pytest.warns(UserWarning, match="moved the unreadable"):
        clf.tune(layer, x)
    assert path.with_name(path.name + ".corrupt").read_text() == '{"format": 1, "entr'
    assert len(json.loads(path.read_text())["entries"]) == 1
    assert _explain_row(layer, x)["backend"] == "reference"


def test_an_unwritable_record_warns_and_keeps_the_choices_in_memory(
        fake_times, reference_candidate, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    layer, x = clf.GRU(3, 4), torch.randn(STEPS, 1, 3)
    with pytest.warns(UserWarning) as caught:
        clf.tune(layer, x)
    messages = [str(w.message) for w in caught]
    assert any("cannot read" in m and "Not a directory" in m for m in messages), messages
    assert any("cannot write" in m and "hold in this process only" in m for m in messages), messages
    assert _explain_row(layer, x)["backend"] == "reference"


def _write_entries(cache: str, writer: int, count: int) -> None:
    os.environ["XDG_CACHE_HOME"] = cache
    tuned.reset()
    for n in range(count):
        sig = ("cpu:test", "seq", "lstm", torch.float32, False, 1000 * writer + n, 16, 3, 4, 0,
               1, 1, False)
        tuned.remember(sig, "torch", {}, {})
        assert tuned.save() is not None


def test_concurrent_writers_lose_nothing_and_never_tear_the_file(record):
    """Processes writing at once: every reader parse succeeds, every entry lands."""
    cache = os.environ["XDG_CACHE_HOME"]
    path = tuned.cache_path()
    context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    writers = [context.Process(target=_write_entries, args=(cache, w, 15)) for w in range(4)]
    for process in writers:
        process.start()
    reads = 0
    while any(p.is_alive() for p in writers):
        if path.exists():
            json.loads(path.read_text())  # a torn file would fail here
            reads += 1
    for process in writers:
        process.join()
        assert process.exitcode == 0
    assert len(json.loads(path.read_text())["entries"]) == 60
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_no_timing_driven_choice_under_deterministic_algorithms(fake_times, reference_candidate):
    times, timed = fake_times
    layer, x = clf.GRU(3, 4), torch.randn(STEPS, 1, 3)
    clf.tune(layer, x)
    assert _explain_row(layer, x)["backend"] == "reference"
    assert len(timed) == 1
    torch.use_deterministic_algorithms(True)
    try:
        table = clf.explain(layer, x)
        assert table.rows[0]["backend"] != "reference"
        assert "not consulted" in " ".join(table.notes)
        with pytest.warns(UserWarning, match="no timing-driven choice"):
            clf.tune(clf.GRU(3, 5), x)
        clf.set_tuning(True)
        clf.GRU(3, 6)(x)
        assert len(timed) == 1
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_tuned_short_call_leaves_the_cheap_path(fake_times, reference_candidate):
    """Cells (one step a call) go straight to torch.nn under auto's rules; a tuned
    choice for them is followed."""
    cell, x = clf.LSTMCell(3, 4), torch.randn(2, 3)
    assert _explain_row(cell, x)["why"].startswith("auto: 1 step(s) on cpu")
    table = clf.tune(cell, x)
    assert table.rows[0]["signature"] == "lstm-cell B2 T<=1 I3 H4 float32 training"
    assert tuned.short_calls
    assert _explain_row(cell, x)["backend"] == "reference"
    layer = clf.LSTM(3, 4)  # a short call of another signature: the rules still
    assert _explain_row(layer, torch.randn(2, 2, 3))["backend"] == "torch"


def test_a_tuned_backend_that_cannot_run_falls_back_to_the_rules(fake_times, monkeypatch):
    monkeypatch.setattr(tune_module, "candidates", lambda spec: ["torch", "cuda"])
    fake_times[0]["cuda"] = 0.5
    monkeypatch.setattr(tune_module, "_time", lambda steps, device: (
        {"cuda": {"median_ms": 0.5, "p20_ms": 0.5, "p80_ms": 0.5, "reps": 1}}, {}))
    layer, x = clf.GRU(3, 4), torch.randn(STEPS, 1, 3)
    assert clf.tune(layer, x).rows[0]["choice"] == "cuda"
    assert _explain_row(layer, x)["backend"] in ("torch", "cpu")  # no CUDA here


def test_fullgraph_compile_with_a_record_and_tuning_on(fake_times, reference_candidate):
    """torch.compile traces the record's lookup and the calls' watcher without a graph
    break; the graph takes auto's rules (no timing-driven choice inside a graph)."""
    layer, x = clf.GRU(3, 4), torch.randn(STEPS, 1, 3)
    clf.tune(layer, x)
    clf.set_tuning(True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)[0]
    torch.testing.assert_close(got, torch.nn.GRU.forward(layer, x)[0], rtol=1e-5, atol=1e-6)
    assert len(fake_times[1]) == 1  # nothing timed while tracing


def test_a_layer_behind_conv_to_sequence_is_tuned(fake_times, reference_candidate):
    """ConvToSequence may resolve its rnn's backend without calling the rnn's forward
    (its fused hand-off): the layer is still timed and follows the record."""
    block = clf.ConvToSequence(clf.LSTM(4, 5, batch_first=True), norm=torch.nn.BatchNorm1d(4),
                               activation="relu")
    x = torch.randn(2, 4, STEPS)
    (row,) = clf.tune(block, x).rows
    assert row["layer"] == "rnn" and row["choice"] == "reference"
    assert _explain_row(block, x)["backend"] == "reference"


def test_explain_says_why_for_each_layer():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = clf.LSTM(3, 4)
            self.pinned = clf.GRU(4, 4, backend="reference")
            self.decoder = clf.GRUCell(4, 4)

        def forward(self, x):
            y, _ = self.encoder(x)
            y, _ = self.pinned(y)
            h = None
            for t in range(y.shape[0]):
                h = self.decoder(y[t], h)
            return h

    rows = {row["layer"]: row for row in clf.explain(Model(), torch.randn(STEPS, 2, 3)).rows}
    assert list(rows) == ["encoder", "pinned", "decoder"]  # the cell's calls once
    assert rows["pinned"]["why"] == "named by the module"
    assert rows["decoder"]["backend"] == "torch" and "1 step(s)" in rows["decoder"]["why"]
    encoder = rows["encoder"]
    if encoder["backend"] == "cpu":
        assert encoder["why"] == "auto's rule _cpu_beats_torch: measured faster than torch.nn here"
    else:  # the cpu backend unavailable, or its rule (BLAS GEMMs) not taking it
        assert encoder["why"].startswith("auto's rules: torch.nn (cpu: "), encoder["why"]
    with clf.use_backend("reference"):
        rows = clf.explain(Model(), torch.randn(STEPS, 2, 3)).rows
    assert rows[0]["why"].startswith("the process default")


def test_tune_skips_pinned_layers_and_says_so(fake_times):
    table = clf.tune(clf.GRU(3, 4, backend="torch"), torch.randn(STEPS, 1, 3))
    assert table.rows[0]["choice"] == "backend='torch': not tuned"
    assert not fake_times[1]
    with pytest.warns(UserWarning, match="no cnnlstm_fast layers"):
        clf.tune(torch.nn.GRU(3, 4), torch.randn(STEPS, 1, 3))


def test_show_and_clear(fake_times, reference_candidate, capsys):
    from cnnlstm_fast.tune.__main__ import main

    clf.tune(clf.GRU(3, 4), torch.randn(STEPS, 1, 3))
    main(["--show"])
    out = capsys.readouterr().out
    assert str(tuned.cache_path()) in out and "gru B1 T<=16 I3 H4 L1 D1 float32 training" in out
    assert "reference 1, torch 2" in out
    main(["--clear"])
    assert "deleted 2 file(s)" in capsys.readouterr().out  # the record and its lock
    assert not tuned.record_files()
    assert _explain_row(clf.GRU(3, 4), torch.randn(STEPS, 1, 3))["backend"] != "reference"


def test_the_environment_report_names_the_record(fake_times, reference_candidate):
    from cnnlstm_fast import env

    clf.tune(clf.GRU(3, 4), torch.randn(STEPS, 1, 3))
    report = env.collect()["tuning"]
    assert report["record"] == str(tuned.cache_path()) and report["signatures"] == 1
    assert "tuning record" in env.format_report(env.collect())


def _python(code: str, cache, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code] if isinstance(code, list) else
                          [sys.executable, "-c", textwrap.dedent(code)],
                          env={**os.environ, "XDG_CACHE_HOME": str(cache), **env},
                          capture_output=True, text=True, timeout=300)


def test_the_choices_survive_a_restart(record):
    """One process tunes; the next starts with the record (auto follows it, and
    ``python -m cnnlstm_fast.tune --show`` lists it); CNNLSTM_FAST_TUNE=1 turns tuning
    on first use on at import."""
    cache = record.parent
    tuned_run = _python("""
        import torch, cnnlstm_fast as clf
        torch.manual_seed(0)
        layer = clf.GRU(3, 4)
        with torch.no_grad():
            print(clf.tune(layer, torch.randn(9, 2, 3)).rows[0]["choice"])
    """, cache)
    assert tuned_run.returncode == 0, tuned_run.stderr
    choice = tuned_run.stdout.strip().splitlines()[-1]
    next_run = _python("""
        import torch, cnnlstm_fast as clf
        with torch.no_grad():
            row = clf.explain(clf.GRU(3, 4), torch.randn(9, 2, 3)).rows[0]
        print(row["backend"], "|", row["why"], "|", clf.get_tuning())
    """, cache, CNNLSTM_FAST_TUNE="1")
    assert next_run.returncode == 0, next_run.stderr
    backend, why, tuning = next_run.stdout.strip().split(" | ")
    assert backend == choice and why.startswith("tuned on this machine") and tuning == "True"
    shown = _python(["-m", "cnnlstm_fast.tune", "--show"], cache)
    assert shown.returncode == 0 and "Warning" not in shown.stderr, shown.stderr
    assert "gru B2 T<=16 I3 H4 L1 D1 float32 inference" in shown.stdout


def test_a_bad_tuning_switch_warns_and_stays_off(record):
    run = _python("import cnnlstm_fast as clf; print(clf.get_tuning())", record.parent,
                  CNNLSTM_FAST_TUNE="yes")
    assert run.returncode == 0 and run.stdout.strip() == "False"
    assert "CNNLSTM_FAST_TUNE must be 0 or 1, got 'yes'" in run.stderr


@needs_cpu
def test_a_bidirectional_layer_tunes_the_directions_order_and_auto_runs_the_choice(
        fake_times, monkeypatch):
    """With two threads or more a bidirectional layer's candidates include the cpu
    backend's other directions order (cpu:side_by_side); a recorded variant runs as
    that variant (the directions ops), and a variant this version lacks leaves the
    choice to the rules."""
    from cnnlstm_fast.backends import cpu

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer, x = clf.LSTM(3, 5, bidirectional=True), torch.randn(STEPS, 2, 3)
        spec = layer._call_spec(x)
        assert "cpu:side_by_side" in tune_module.candidates(spec)
        assert not any(":" in n for n in tune_module.candidates(
            clf.LSTM(3, 5)._call_spec(x)))  # one direction: nothing to order
        fake_times[0].update({"cpu": 3.0, "cpu:side_by_side": 0.5})
        (row,) = clf.tune(layer, x).rows
        assert row["choice"] == "cpu:side_by_side"
        calls = []
        real = cpu.CpuBackend.forward_directions
        monkeypatch.setattr(cpu.CpuBackend, "forward_directions",
                            lambda self, *a: calls.append(self.name) or real(self, *a))
        torch_nn = torch.nn.LSTM(3, 5, bidirectional=True)
        torch_nn.load_state_dict(layer.state_dict())
        got = layer(x)
        assert calls == ["cpu:side_by_side"]
        torch.testing.assert_close(got[0], torch_nn(x)[0], rtol=1e-5, atol=1e-6)
        assert cpu.get_directions() == "one_after_the_other"  # the process setting untouched
        assert _explain_row(layer, x)["backend"] == "cpu:side_by_side"
        # a record naming a variant this version does not have: the rules decide
        sig = tuned.signature(spec)
        tuned.remember(sig, "cpu:sideways", {}, {})
        assert _explain_row(layer, x)["backend"] in ("torch", "cpu")
    finally:
        torch.set_num_threads(before)
    assert backends.get_backend("cpu:side_by_side").directions == "side_by_side"
    with pytest.raises(ValueError, match="backend 'cpu' variant must be one of "
                                         "'one_after_the_other', 'side_by_side', got 'x'"):
        backends.get_backend("cpu:x")
    with pytest.raises(ValueError, match="backend 'torch' has no variants, got 'x'"):
        backends.get_backend("torch:x")


def test_the_whole_model_check_replaces_per_layer_choices_that_lose_together(
        fake_times, reference_candidate):
    """Each layer timed alone prefers the reference backend, but the whole model with
    those choices is slower than with torch.nn everywhere: every signature of the run
    takes torch.nn, the table and explain say why; the model's buffers (BatchNorm's
    running statistics), .grad and the random number state are as the call leaves them."""
    times, _ = fake_times
    times.update({"whole:tuned": 5.0, "whole:torch": 4.0})
    model = CNNLSTM(3, 2, conv_channels=(4,), hidden_size=8, dropout=0.5).train()
    x = torch.randn(2, STEPS, 3)
    torch.manual_seed(1)
    model(x)
    after_plain = torch.get_rng_state()
    model = CNNLSTM(3, 2, conv_channels=(4,), hidden_size=8, dropout=0.5).train()
    before = [b.clone() for b in model.buffers()]
    torch.manual_seed(1)
    table = clf.tune(model, x)
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert all(p.grad is None for p in model.parameters())
    # the call itself updates the running statistics once, as model(x) does; the whole
    # model's timed calls leave no trace
    model_once = CNNLSTM(3, 2, conv_channels=(4,), hidden_size=8, dropout=0.5).train()
    model_once.load_state_dict({**model.state_dict(), **dict(zip(
        [n for n, _ in model.named_buffers()], before))})
    torch.manual_seed(1)
    model_once(x)
    for got, want in zip(model.buffers(), model_once.buffers()):
        # not bit for bit: the call in tune ran the fused conv-to-sequence path (its
        # norm folded), model_once the plain one (torch.nn took the rnn); the timed calls
        # would have moved the statistics by far more (momentum 0.1 per call)
        torch.testing.assert_close(got, want)
    (row,) = table.rows
    assert row["choice"] == "torch (whole model)"
    note = next(n for n in table.notes if n.startswith("whole-model check"))
    assert "torch 4 ms, tuned 5 ms" in note and note.endswith("-> torch for every layer tuned here")
    (entry,) = json.loads(tuned.cache_path().read_text())["entries"].values()
    # reference, which every layer chose, is the per-layer configuration ("tuned")
    assert entry["choice"] == "torch" and entry["whole_model"] == {"tuned": 5.0, "torch": 4.0}
    assert _explain_row(model, x)["why"].endswith(
        f"the whole model: torch 4 ms, tuned 5 ms; {entry['measured']})")


def test_the_whole_model_check_keeps_choices_that_hold_up(fake_times, reference_candidate):
    times, _ = fake_times
    times.update({"whole:tuned": 1.0, "whole:torch": 1.02})  # within TIE_MARGIN: they stay
    layer, x = clf.GRU(3, 4, bidirectional=True), torch.randn(STEPS, 2, 3)
    table = clf.tune(layer, x)
    assert table.rows[0]["choice"] == "reference"
    note = next(n for n in table.notes if n.startswith("whole-model check"))
    assert note.endswith("-> the per-layer choices stay")
