"""examples/: the reduced (--quick) runs CI does, and the training example's metric functions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cnnlstm_fast as clf
from helpers import assert_close, module_backends

pytest.importorskip("sklearn", reason="the example's dataset ships with scikit-learn (extra 'examples')")
pytest.importorskip("matplotlib", reason="the example plots with matplotlib (extra 'examples')")

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example(name: str):
    """examples/<name>.py as a module (registered first: its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example("train_cnnlstm")


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


def test_quick_search_runs_torch_nn_and_swapped_on_both_datasets(tmp_path):
    # a subprocess, as a user runs it: the swap and Optuna's logging stay out of this process
    pytest.importorskip("optuna", reason="the search example uses Optuna (extra 'examples')")
    pytest.importorskip("sktime", reason="the search example's datasets ship with sktime (extra 'examples')")
    backend = module_backends()[-1]  # pinned: with "auto", torch.nn's LSTM may run some calls
    subprocess.run([sys.executable, str(_EXAMPLES / "search_cnnlstm.py"), "--quick", "--threads", "1", "--device", "cpu",
                    "--backend", backend, "--out", str(tmp_path)], check=True, timeout=600)
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["datasets"]) == ["basic_motions", "japanese_vowels"]
    for name, result in report["datasets"].items():
        assert (tmp_path / f"search_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert list(result["runs"]) == ["torch.nn", f"cnnlstm_fast (backend={backend})"]
        assert result["same_trial_params"]
        baseline, swapped = result["runs"].values()
        assert baseline["recurrent_class"] == "torch.nn.modules.rnn.LSTM"
        assert swapped["recurrent_class"] == "cnnlstm_fast.nn.rnn.LSTM"
        # the logged backend choices: torch.nn's own layers never reach ours
        assert baseline["backends"] == {}
        assert set(swapped["backends"]) == {f"training: {backend}", f"inference: {backend}"}
        for run in (baseline, swapped):
            assert len(run["trials"]) == 2 and run["search_seconds"] > 0
            assert len(run["best"]["curves"]["val_loss"]) == result["epochs"] == 2
            for scores in (run["test"], run["ensemble_test"]):
                for metric in ("accuracy", "precision", "recall", "f1"):
                    assert 0.0 <= scores[metric] <= 1.0, (name, run["layers"], metric, scores[metric])
                assert sum(map(sum, scores["confusion_matrix"])) == result["sizes"]["test"]
        # the same seeds and parameters: the two runs' first trial agrees up to rounding
        first = [run["trials"][0]["cv_loss"] for run in (baseline, swapped)]
        assert first[0] == pytest.approx(first[1], rel=1e-4)
    assert report["datasets"]["japanese_vowels"]["packed"]
    assert report["datasets"]["japanese_vowels"]["steps"][0] < report["datasets"]["japanese_vowels"]["steps"][1]
    assert not report["datasets"]["basic_motions"]["packed"]


@pytest.mark.parametrize("layers", ["torch.nn", "ours"])
def test_search_model_gives_each_padded_sequence_what_it_gives_the_sequence_alone(layers):
    pytest.importorskip("optuna", reason="the search example uses Optuna (extra 'examples')")
    pytest.importorskip("sktime", reason="the search example's datasets ship with sktime (extra 'examples')")
    search = _load_example("search_cnnlstm")
    torch.manual_seed(0)
    model = search.SequenceCNNLSTM(3, 4, conv_channels=(5, 5), kernel_size=5, hidden_size=6, num_layers=2,
                                   bidirectional=True)
    clf.unswap(model)
    if layers == "ours":
        clf.swap(model, backend=module_backends()[-1])
    model.eval()  # BatchNorm's running statistics: each step on its own
    lengths = torch.tensor([7, 3, 5, 1])  # unsorted, one of length 1
    x = torch.randn(4, 7, 3) * (torch.arange(7) < lengths[:, None]).unsqueeze(2)
    with torch.no_grad():
        batched = model(x, lengths)
        for i, n in enumerate(lengths.tolist()):
            assert_close(batched[i], model(x[i : i + 1, :n])[0], rtol=1e-5, atol=1e-6, what=f"sequence {i}")
