"""``auto``'s table of rules (cnnlstm_fast/backends/rules.json) against the committed
result files each row cites.

For every row: each cited file exists, exactly the declared number of its measured rows
fall in the row's conditions (matched by the same code ``auto`` runs, ``Rows.match``,
with the facts the file records: device, cell, mode, dtype, sizes, the cpu GEMM in use,
the malloc settings), and in each of them the backend the row chooses measured at least
``min_ratio`` times faster than the one it is chosen over. Rows whose claim no file
measures say so (``"evidence": "none"``) and why. The checker is shown to fail on a row
the files contradict.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch  # noqa: F401  (before the package, as everywhere)

from cnnlstm_fast import backends
from cnnlstm_fast.backends import rules

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = {"torch": "torch.nn"}  # backend name -> provider name in the result files
# benchmarks/packed_lstm_rule.py's lines
_PACKED_LINE = re.compile(r"B(\d+) H(\d+) T(\d+) (inference|training): torch\.nn ([\d.]+) ms, "
                          r"cpu ([\d.]+) ms, [\d.]+x")


def _glibc(platform: str | None) -> tuple[int, ...]:
    found = re.search(r"glibc(\d+)\.(\d+)", platform or "")
    return (int(found.group(1)), int(found.group(2))) if found else ()


def _recorded(assume: dict, name: str, recorded):
    """A fact as the file records it, else as the evidence entry assumes it; both given
    and different is an error in the table."""
    if recorded is not None and name in assume and assume[name] != recorded:
        raise AssertionError(f"the entry assumes {name}={assume[name]!r}, the file records "
                             f"{recorded!r}")
    return recorded if recorded is not None else assume.get(name)


def _measured(entry: dict, choice: str, against: str):
    """(facts, device, malloc_keeps_freed or None, gemm in use, avx512_full_rate or None,
    against_ms / choice_ms) for every
    single-layer, single-direction row of the cited file that measured both backends."""
    path = ROOT / entry["file"]
    assert path.is_file(), f"{entry['file']} is cited but not committed"
    assume = entry.get("assume", {})
    where = entry.get("where", {})
    out = []
    if path.suffix == ".txt":
        for line in path.read_text().splitlines():
            found = _PACKED_LINE.fullmatch(line.strip())
            if not found:
                continue
            batch, hidden, steps, mode, torch_ms, cpu_ms = found.groups()
            ms = {"torch": float(torch_ms), "cpu": float(cpu_ms)}
            facts = rules.Facts(assume["cell"], mode, assume["dtype"], int(batch), int(hidden),
                                int(steps), assume["packed"], False, None)
            out.append((facts, assume["device"], assume.get("malloc_keeps_freed"),
                        assume.get("gemm"), assume.get("avx512_full_rate"),
                        ms[against] / ms[choice]))
        assert out, f"{entry['file']}: no measured lines read"
        return out
    data = json.loads(path.read_text())
    environment = data.get("environment", {})
    extension = environment.get("extension") or {}
    gemm_info = extension.get("cpu_gemm") or {}
    in_use = _recorded(assume, "gemm", gemm_info.get("in_use"))
    ratio = gemm_info.get("fma512_ratio")
    full_rate = _recorded(assume, "avx512_full_rate", None if ratio is None else
                          ratio >= backends._FULL_RATE_RATIO)
    settings = environment.get("cpu_settings")
    malloc = _recorded(assume, "malloc_keeps_freed", None if settings is None else
                       backends._malloc_keeps(settings, _glibc(environment.get("platform"))))
    by_config: dict[str, dict[str, dict]] = {}
    for row in data["results"]:
        if row["layers"] != 1 or row["directions"] != 1:
            continue
        if any(row.get(key) != value for key, value in where.items()):
            continue
        by_config.setdefault(row["config"], {})[row["provider"]] = row
    for providers in by_config.values():
        mine, theirs = providers.get(PROVIDERS.get(choice, choice)), providers.get(
            PROVIDERS.get(against, against))
        if mine is None or theirs is None:
            continue
        steps = 1 if mine.get("model") == "cell" else mine["steps"]  # a cell: 1 step a call
        facts = rules.Facts(mine["cell"],
                            "training" if mine["mode"] == "forward_backward" else "inference",
                            mine["dtype"], mine["batch"], mine["hidden_size"], steps,
                            bool(assume.get("packed", False)), False, None)
        out.append((facts, mine["device"], malloc, in_use, full_rate,
                    theirs["median_ms"] / mine["median_ms"]))
    return out


def _gemm(facts: rules.Facts, device: str, in_use: str | None) -> str | None:
    if device != "cpu":
        return None
    return "avx512" if facts.dtype == "float32" and in_use == "avx512" else "blas"


def check_row(row: dict, min_steps: dict[str, int]) -> list[str]:
    """What the cited files contradict in ``row`` (empty: nothing)."""
    problems = []
    matcher = rules.Rows(row["device"], [row])
    for entry in row["evidence"]:
        inside = []
        for facts, device, malloc, in_use, full_rate, ratio in _measured(
                entry, row["choice"], row["against"]):
            if device != row["device"] or facts.steps < min_steps.get(device, 0):
                continue
            facts.gemm = _gemm(facts, device, in_use)
            if facts.gemm is None and device == "cpu" and "gemm" in row["when"]:
                problems.append(f"{entry['file']}: records no cpu GEMM and assumes none")
                continue

            def malloc_keeps_freed(malloc=malloc):
                if malloc is None:
                    raise AssertionError(f"{entry['file']}: records no malloc settings and "
                                         "assumes none, and the row asks")
                return malloc

            def avx512_full_rate(full_rate=full_rate):
                if full_rate is None:
                    raise AssertionError(f"{entry['file']}: records no fma512_ratio and "
                                         "assumes no avx512_full_rate, and the row asks")
                return full_rate

            if matcher.first(facts, avx512_full_rate, malloc_keeps_freed) is not None:
                inside.append((facts, ratio))
        if len(inside) != entry["rows"]:
            problems.append(f"{entry['file']}: {len(inside)} measured rows fall in the row's "
                            f"conditions, the table says {entry['rows']}")
        for facts, ratio in inside:
            if ratio < row.get("min_ratio", 1.0):
                problems.append(
                    f"{entry['file']}: {facts.cell} B{facts.batch} T{facts.steps} "
                    f"H{facts.hidden} {facts.dtype} {facts.mode}: {row['choice']} measured "
                    f"{ratio:.2f}x {row['against']}, below {row.get('min_ratio', 1.0)}")
    return problems


def _cited(rows):
    return [row for row in rows if row["evidence"] != "none"]


@pytest.mark.parametrize("row", _cited(rules.TABLE["rules"]), ids=lambda row: row["id"])
def test_each_rule_agrees_with_its_result_files(row):
    assert row["evidence"], f"{row['id']}: cites no file; say 'none' and why in its note"
    assert check_row(row, rules.MIN_STEPS) == []


def _as_row(entry: dict) -> dict:
    """A min_steps entry as a row: calls of fewer steps than it."""
    return {**entry, "when": {"steps": [None, entry["steps"] - 1]}}


@pytest.mark.parametrize("entry", _cited(rules.TABLE["min_steps"]), ids=lambda e: e["id"])
def test_each_min_steps_entry_agrees_with_its_result_files(entry):
    assert check_row(_as_row(entry), {}) == []


def test_rows_without_evidence_say_why():
    every = rules.TABLE["rules"] + rules.TABLE["min_steps"]
    for row in every:
        assert row["evidence"] == "none" or isinstance(row["evidence"], list), row["id"]
        if row["evidence"] == "none":
            assert len(row.get("note", "")) > 40, f"{row['id']}: no evidence and no why"
    # listed in the report of the change that made the table; a new one is a decision
    assert [row["id"] for row in every if row["evidence"] == "none"] == ["cuda-short-calls"]


def test_the_checker_catches_a_row_its_files_contradict():
    """LSTM training at batch 8-64, T=32: the AMD EPYC measured 0.88x-1.0x (torch.nn
    faster), so a row claiming the cpu backend there fails; so does a wrong row count."""
    row = {"id": "wrong", "device": "cpu", "choice": "cpu", "against": "torch",
           "min_ratio": 1.0,
           "when": {"gemm": "avx512", "cells": ["lstm"], "modes": ["training"],
                    "batch": [8, 64], "steps": [None, 32]},
           "evidence": [{"file": "benchmarks/results/cpu-amd-epyc/batch-sweep.json",
                         "rows": 4}]}
    problems = check_row(row, rules.MIN_STEPS)
    assert len(problems) == 4 and all("below 1.0" in p for p in problems), problems
    miscounted = copy.deepcopy(rules.TABLE["rules"][0])
    miscounted["evidence"][0]["rows"] += 1
    assert any("measured rows fall in" in p for p in check_row(miscounted, rules.MIN_STEPS))
    assumed = copy.deepcopy(row)
    assumed["evidence"][0]["assume"] = {"gemm": "blas"}  # the file records avx512
    with pytest.raises(AssertionError, match="assumes gemm='blas', the file records 'avx512'"):
        check_row(assumed, rules.MIN_STEPS)


def test_auto_reads_the_table():
    assert backends.AUTO_MIN_STEPS == {e["device"]: e["steps"] for e in rules.TABLE["min_steps"]}
    ids = [row["id"] for row in backends._CPU_ROWS.rows + backends._CUDA_ROWS.rows]
    assert ids == [row["id"] for row in rules.TABLE["rules"]]


def test_load_rejects_unknown_conditions(tmp_path):
    table = copy.deepcopy(rules.TABLE)
    table["rules"][0]["when"]["batchsize"] = [1, 2]
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"row 'cpu-avx512-gru': unknown conditions "
                                         r"\['batchsize'\]"):
        rules.load(path)


#: What one core running 512-bit FMAs at half rate (16 float FMAs, 32 flops, a cycle:
#: AMD Zen 4's double-pumped units) reaches at 4 GHz, in TFLOP/s.
_HALF_RATE_CORE_TFLOPS = 32 * 4.0e9 / 1e12


def test_files_assumed_full_rate_measured_above_a_half_rate_core():
    """The AVX-512 LSTM rows rest on files measured before the bench recorded
    ``fma512_ratio``; each such entry assumes ``avx512_full_rate``. The assumption is
    checked against the peak each file does record (the best square GEMM): per thread
    above what a half-rate core reaches at 4 GHz."""
    checked = 0
    for row in rules.TABLE["rules"]:
        for entry in row["evidence"] if row["evidence"] != "none" else ():
            if not entry.get("assume", {}).get("avx512_full_rate"):
                continue
            data = json.loads((ROOT / entry["file"]).read_text())
            per_thread = data["peak_tflops"]["float32"] / data["threads"]
            assert per_thread > _HALF_RATE_CORE_TFLOPS, (entry["file"], per_thread)
            checked += 1
    assert checked >= 6


def test_the_fma_rate_is_asked_last_and_only_by_rows_that_ask():
    row = {"id": "r", "device": "cpu", "choice": "cpu", "against": "torch", "evidence": "none",
           "when": {"gemm": "avx512", "cells": ["lstm"], "batch": [None, 16],
                    "avx512_full_rate": True}}
    plain = dict(row, id="p", when={"gemm": "avx512", "cells": ["gru"]})
    rows = rules.Rows("cpu", [row, plain])
    asked = []

    def full_rate(answer):
        return lambda: asked.append(answer) or answer

    def never():
        raise AssertionError("asked")

    facts = rules.Facts("lstm", "inference", "float32", 8, 256, 64, False, False, "avx512")
    assert rules.Rows.first(rows, facts, full_rate(True), never) is row
    assert rules.Rows.first(rows, facts, full_rate(False), never) is None
    assert asked == [True, False]
    facts.batch = 32  # outside the row's batches: the rate is not asked
    assert rows.first(facts, never, never) is None
    facts.cell = "gru"
    assert rows.first(facts, never, never) is plain
