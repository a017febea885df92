"""examples/train_cnnlstm.py: the reduced (--quick) run CI does, and its metric functions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import module_backends

pytest.importorskip("sklearn", reason="the example's dataset ships with scikit-learn (extra 'examples')")
pytest.importorskip("matplotlib", reason="the example plots with matplotlib (extra 'examples')")

_PATH = Path(__file__).resolve().parents[1] / "examples" / "train_cnnlstm.py"
_spec = importlib.util.spec_from_file_location("train_cnnlstm", _PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def test_confusion_matrix_counts_true_rows_predicted_columns():
    cm = example.confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]


def test_metrics_by_hand():
    # rows true, columns predicted
    cm = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    # precision per class 5/7, 3/4, 4/5; recall 5/6, 3/6, 4/4
    precision = [5 / 7, 3 / 4, 4 / 5]
    recall = [5 / 6, 1 / 2, 1.0]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    got = example.classification_metrics(cm)
    assert got["accuracy"] == pytest.approx(12 / 16)
    assert got["precision"] == pytest.approx(sum(precision) / 3)
    assert got["recall"] == pytest.approx(sum(recall) / 3)
    assert got["f1"] == pytest.approx(sum(f1) / 3)


def test_metrics_zero_division_counts_zero():
    # class 1 never predicted, class 2 never present and never predicted
    cm = torch.tensor([[2, 0, 0], [1, 0, 0], [0, 0, 0]])
    got = example.classification_metrics(cm)
    assert got == pytest.approx({"accuracy": 2 / 3, "precision": (2 / 3) / 3, "recall": 1 / 3, "f1": 0.8 / 3})


def test_metrics_perfect():
    got = example.classification_metrics(torch.diag(torch.tensor([3, 1, 2])))
    assert got == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_quick_run_compares_torch_nn_and_swapped(tmp_path):
    backend = module_backends()[-1]
    report = example.main(["--quick", "--compare", "--backend", backend, "--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["split"] == {"train": 1257, "val": 270, "test": 270}
    assert list(saved["runs"]) == ["torch.nn", f"cnnlstm_fast (backend={backend})"]
    baseline, swapped = saved["runs"].values()
    assert baseline["recurrent_class"] == "torch.nn.modules.rnn.LSTM"
    assert swapped["recurrent_class"] == "cnnlstm_fast.nn.rnn.LSTM"
    for run in (baseline, swapped):
        assert len(run["history"]["train_loss"]) == 2
        assert set(run["test"]) >= {"accuracy", "precision", "recall", "f1", "confusion_matrix"}
        assert sum(map(sum, run["test"]["confusion_matrix"])) == 270
    # same seed: the curves agree up to floating-point noise
    assert max(saved["max_curve_difference"].values()) < 1e-4
    assert report["runs"].keys() == saved["runs"].keys()
