"""Hyperparameter search with k-fold cross-validation for a CNN-LSTM, torch.nn layers vs swapped.

What users of CNN-LSTMs spend their compute on: an Optuna study over the architecture
(LSTM depth ``num_layers``, width ``hidden_size`` and conv channels, ``bidirectional``,
``dropout``), each trial scored by stratified k-fold cross-validation; then the best
parameters retrained on the whole training split and scored on the held-out test split,
next to an ensemble of the best trial's k fold models (their class probabilities
averaged). Two multivariate time-series datasets that ship inside sktime's wheel, so
nothing is downloaded:

- ``basic_motions``: accelerometer and gyroscope (6 channels, 100 steps), 4 activities,
  40 training and 40 test recordings (equal lengths).
- ``japanese_vowels``: 12 LPC cepstrum coefficients per frame, 9 speakers, 270 training
  and 370 test utterances of 7 to 29 frames: padded, and packed
  (``pack_padded_sequence``) through the LSTM, so the recurrent layers see a
  ``PackedSequence``.

Each dataset is searched twice with the same seeds: once with plain torch.nn layers
(``cnnlstm_fast.unswap``, the model a user starts from), once after
``cnnlstm_fast.swap(model, backend=...)``. The two studies run trial by trial in turn,
each swapped trial on the parameters the torch.nn trial drew (``enqueue_trial``), so both
time the same work, and every fold model starts from the same weights in both.

    python examples/search_cnnlstm.py --threads 1 --out examples/results/search
    python examples/search_cnnlstm.py --quick --out /tmp/quick     # what CI runs

Writes ``results.json`` (machine, configuration; per dataset and run: every trial's
parameters, cross-validated loss and accuracy and seconds, the search's wall time, the
best trial's learning curves, the retrained model's test accuracy and macro
precision/recall/F1, the ensemble's, and which backends ran the recurrent layers) and
one ``search_<dataset>.png`` per dataset to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import optuna
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold, train_test_split
from sktime.datasets import load_basic_motions, load_japanese_vowels
from torch.nn.utils.rnn import pack_padded_sequence

import cnnlstm_fast as clf
from cnnlstm_fast.models import CNNLSTM

matplotlib.use("Agg")  # files only, no display

BASELINE = "torch.nn"


@dataclass
class Split:
    """Zero-padded sequences (N, T, C), each one's length (N,) and class indices (N,)."""

    x: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor

    def __getitem__(self, index) -> Split:
        return Split(self.x[index], self.lengths[index], self.y[index])

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    description: str
    classes: list[str]
    train: Split
    test: Split
    packed: bool  # lengths differ: the model packs its sequences
    batch_size: int
    epochs: int


def _pad(sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T_max, C) zero-padded float32 and the lengths (N,) of (T_i, C) arrays."""
    lengths = torch.tensor([len(s) for s in sequences])
    x = torch.zeros(len(sequences), int(lengths.max()), sequences[0].shape[1])
    for i, s in enumerate(sequences):
        x[i, : len(s)] = torch.from_numpy(s)
    return x, lengths


def _sequences(name: str, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """sktime's ``split`` of dataset ``name``: a list of (T_i, C) float32 arrays, labels."""
    if name == "basic_motions":
        x, y = load_basic_motions(split=split, return_type="numpy3D")  # (N, C, T)
        return list(x.transpose(0, 2, 1).astype(np.float32)), y
    # unequal lengths come as a nested DataFrame: one pandas Series per cell
    frame, y = load_japanese_vowels(split=split, return_type="nested_univ")
    columns = [frame[c] for c in frame.columns]
    sequences = [np.stack([col.iloc[i].to_numpy() for col in columns], axis=1).astype(np.float32)
                 for i in range(len(frame))]
    return sequences, y


DATASETS = {
    "basic_motions": {"description": "BasicMotions: 6-axis accelerometer and gyroscope, 100 steps, 4 activities",
                      "batch_size": 8, "epochs": 40},
    "japanese_vowels": {"description": "JapaneseVowels: 12 LPC cepstra per frame, 7-29 frames, 9 speakers",
                        "batch_size": 32, "epochs": 30},
}


def load_dataset(name: str, quick: bool, seed: int) -> Dataset:
    """sktime's train/test split, each channel standardised with the training split's
    mean and standard deviation over the real (unpadded) steps. ``quick``: a stratified
    subset of at most 8 sequences per class in each split."""
    splits = {}
    for split in ("train", "test"):
        sequences, labels = _sequences(name, split)
        if quick and len(labels) > 8 * len(set(labels)):
            keep, _ = train_test_split(np.arange(len(labels)), train_size=8 * len(set(labels)),
                                       stratify=labels, random_state=seed)
            sequences, labels = [sequences[i] for i in keep], labels[keep]
        splits[split] = (sequences, labels)
    steps = np.concatenate(splits["train"][0])
    mean, std = steps.mean(0), steps.std(0) + 1e-8
    classes = sorted(set(splits["train"][1]))
    index = {c: i for i, c in enumerate(classes)}
    tensors = {}
    for split, (sequences, labels) in splits.items():
        x, lengths = _pad([(s - mean) / std for s in sequences])
        tensors[split] = Split(x, lengths, torch.tensor([index[c] for c in labels]))
    packed = bool((tensors["train"].lengths != tensors["train"].lengths[0]).any())
    return Dataset(name, DATASETS[name]["description"], classes, tensors["train"], tensors["test"], packed,
                   DATASETS[name]["batch_size"], DATASETS[name]["epochs"])


class SequenceCNNLSTM(CNNLSTM):
    """``CNNLSTM`` whose forward also takes each sequence's length.

    With ``lengths``, the padded steps are zeroed after every conv block (so a
    convolution at a sequence's end sees zeros, as its own ``padding="same"`` would) and
    the LSTM runs on the packed sequence: its final hidden state is each sequence's own
    last step, not a padded one. BatchNorm's batch statistics still count the padded
    steps. Pooling is the last layer's final hidden state (no attention)."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            return super().forward(x)
        mask = (torch.arange(x.size(1), device=x.device) < lengths.to(x.device)[:, None]).unsqueeze(1)
        features = x.transpose(1, 2)
        for layer in self.cnn:
            features = layer(features)
            if isinstance(layer, torch.nn.ReLU):
                features = features * mask
        packed = pack_padded_sequence(features.transpose(1, 2), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, (h_n, _) = self.rnn(packed)
        directions = 2 if self.rnn.bidirectional else 1
        return self.head(self.dropout(h_n[-directions:].transpose(0, 1).flatten(1)))


def suggest(trial) -> dict:
    """The search space: LSTM depth and width, conv width, directions, dropout."""
    return {
        "num_layers": trial.suggest_int("num_layers", 1, 3),
        "hidden_size": trial.suggest_categorical("hidden_size", [32, 64, 128]),
        "conv_channels": trial.suggest_categorical("conv_channels", [16, 32, 64]),
        "bidirectional": trial.suggest_categorical("bidirectional", [False, True]),
        # rounded: the stepped float comes back as e.g. 0.30000000000000004
        "dropout": round(trial.suggest_float("dropout", 0.0, 0.5, step=0.1), 2),
    }


def build_model(params: dict, data: Dataset, backend: str | None, seed: int) -> torch.nn.Module:
    """The CNN-LSTM of ``params`` with torch.nn layers, swapped to ``backend`` unless None."""
    torch.manual_seed(seed)
    model = SequenceCNNLSTM(
        data.train.x.size(2), len(data.classes), conv="1d",
        conv_channels=(params["conv_channels"],) * 2, kernel_size=5, rnn="lstm",
        hidden_size=params["hidden_size"], num_layers=params["num_layers"],
        bidirectional=params["bidirectional"], dropout=params["dropout"],
    )
    clf.unswap(model)  # plain torch.nn layers: the model a user starts from
    if backend is not None:
        clf.swap(model, backend=backend)
    return model


def _batches(split: Split, batch_size: int, packed: bool, device, order=None):
    """(x, lengths or None, y) batches on ``device``, padding trimmed to the batch's longest."""
    order = torch.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        batch = split[order[start : start + batch_size]]
        steps = int(batch.lengths.max())
        lengths = batch.lengths if packed else None
        yield batch.x[:, :steps].to(device), lengths, batch.y.to(device)


@torch.no_grad()
def predict(model, split: Split, data: Dataset, device) -> torch.Tensor:
    """Class probabilities (N, classes) of ``model`` on ``split``."""
    model.eval()
    return torch.cat([torch.softmax(model(x, lengths).float(), 1).cpu()
                      for x, lengths, _ in _batches(split, 256, data.packed, device)])


def scores(probabilities: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """Cross-entropy, accuracy, macro precision/recall/F1 and the confusion matrix."""
    predicted = probabilities.argmax(1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        y.numpy(), predicted, labels=range(num_classes), average="macro", zero_division=0)
    return {
        "loss": F.nll_loss(probabilities.clamp(min=1e-12).log(), y).item(),
        "accuracy": float((predicted == y.numpy()).mean()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion_matrix": confusion_matrix(y.numpy(), predicted, labels=range(num_classes)).tolist(),
    }


def fit(model, train: Split, data: Dataset, args, seed: int, validation: Split | None = None) -> dict:
    """Trains ``model`` for ``data.epochs`` epochs (AdamW, one-cycle schedule, gradient
    clipping); per-epoch training loss, and validation loss and accuracy if given."""
    model.to(args.device)
    steps_per_epoch = math.ceil(len(train) / data.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=data.epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    curves = collections.defaultdict(list)
    for _ in range(data.epochs):
        model.train()
        losses = []
        for x, lengths, y in _batches(train, data.batch_size, data.packed, args.device,
                                      torch.randperm(len(train), generator=shuffle)):
            loss = model.loss(model(x, lengths), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
        curves["train_loss"].append(torch.stack(losses).mean().item())
        if validation is not None:
            val = scores(predict(model, validation, data, args.device), validation.y, len(data.classes))
            curves["val_loss"].append(val["loss"])
            curves["val_accuracy"].append(val["accuracy"])
    return dict(curves)


def backends_used(model, data: Dataset, device) -> dict[str, int]:
    """Which backend ran each recurrent call of one training and one inference batch,
    from the DEBUG records of the ``cnnlstm_fast.backends`` logger ({} for torch.nn's
    own layers, which never reach it)."""
    counts: collections.Counter = collections.Counter()

    class Count(logging.Handler):
        def emit(self, record):
            mode = "training" if torch.is_grad_enabled() else "inference"
            counts[f"{mode}: {getattr(record, 'backend', '?')}"] += 1

    logger, handler = logging.getLogger("cnnlstm_fast.backends"), Count(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        x, lengths, y = next(_batches(data.train, data.batch_size, data.packed, device))
        model.train()
        model.loss(model(x, lengths), y).backward()
        model.zero_grad(set_to_none=True)
        predict(model, data.test[: data.batch_size], data, device)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return dict(sorted(counts.items()))


class Search:
    """One Optuna study over ``data``'s training split, minimising the k-fold mean
    validation cross-entropy, with torch.nn layers (``backend`` None) or swapped ones;
    :meth:`trial` runs one trial, :meth:`finish` retrains the best parameters and tests."""

    def __init__(self, data: Dataset, args, backend: str | None):
        self.data, self.args, self.backend = data, args, backend
        self.label = BASELINE if backend is None else f"cnnlstm_fast (backend={backend})"
        self.folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(
            data.train.x[:, 0, 0].numpy(), data.train.y.numpy()))
        # TPE guides the trials after the first few (random) ones; the seed fixes its draws
        sampler = optuna.samplers.TPESampler(n_startup_trials=min(5, args.trials), seed=args.seed)
        self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.trials: list[dict] = []
        self.best: dict = {"cv_loss": math.inf}
        self.seconds = 0.0

    def trial(self, params: dict | None = None) -> dict:
        """Runs one trial, of ``params`` if given, else of the sampler's; returns its params."""
        if params is not None:
            self.study.enqueue_trial(params)
        start = time.perf_counter()
        self.study.optimize(self._objective, n_trials=1)
        self.seconds += time.perf_counter() - start
        return self.trials[-1]["params"]

    def _objective(self, trial) -> float:
        params, data, args = suggest(trial), self.data, self.args
        start = time.perf_counter()
        models, curves = [], []
        for fold, (train_index, val_index) in enumerate(self.folds):
            seed = args.seed + 1000 * trial.number + fold
            model = build_model(params, data, self.backend, seed)
            curves.append(fit(model, data.train[train_index], data, args, seed, data.train[val_index]))
            models.append(model)
        record = {"number": trial.number, "params": params,
                  "cv_loss": float(np.mean([c["val_loss"][-1] for c in curves])),
                  "cv_accuracy": float(np.mean([c["val_accuracy"][-1] for c in curves])),
                  "seconds": time.perf_counter() - start}
        self.trials.append(record)
        print(f"  [{data.name}, {self.label}] trial {trial.number + 1}/{args.trials}: {params} "
              f"CV loss {record['cv_loss']:.4f}, accuracy {record['cv_accuracy']:.4f} "
              f"({record['seconds']:.1f} s)", flush=True)
        if record["cv_loss"] < self.best["cv_loss"]:
            # the best trial's fold models make the ensemble
            mean_curves = {key: np.mean([c[key] for c in curves], 0).tolist() for key in curves[0]}
            self.best = {**record, "curves": mean_curves, "models": models}
        return record["cv_loss"]

    def finish(self) -> dict:
        """The best parameters retrained on the whole training split; test scores of that
        model and of the best trial's fold models' averaged probabilities."""
        data, args = self.data, self.args
        model = build_model(self.best["params"], data, self.backend, args.seed)
        start = time.perf_counter()
        curves = fit(model, data.train, data, args, args.seed)
        retrain_seconds = time.perf_counter() - start
        test = scores(predict(model, data.test, data, args.device), data.test.y, len(data.classes))
        ensemble = torch.stack([predict(m, data.test, data, args.device) for m in self.best["models"]]).mean(0)
        return {
            "layers": self.label,
            "recurrent_class": f"{type(model.rnn).__module__}.{type(model.rnn).__qualname__}",
            # after the test: its training batch moves BatchNorm's running statistics
            "backends": backends_used(model, data, args.device),
            "search_seconds": self.seconds,
            "trials": self.trials,
            "best": {k: v for k, v in self.best.items() if k != "models"},
            "retrain_seconds": retrain_seconds,
            "retrain_train_loss": curves["train_loss"],
            "test": test,
            "ensemble_test": scores(ensemble, data.test.y, len(data.classes)),
        }


def plot(report: dict, path: Path) -> None:
    """Optimisation history, the best trial's learning curves and the search times."""
    runs = report["runs"]
    fig, (history, curves, seconds) = plt.subplots(1, 3, figsize=(14, 4), width_ratios=(3, 3, 2))
    for (label, run), style, color in zip(runs.items(), ("o-", "x--"), ("C0", "C1")):
        values = [t["cv_loss"] for t in run["trials"]]
        numbers = [t["number"] + 1 for t in run["trials"]]
        history.plot(numbers, values, style[0], color=color, alpha=0.6, label=f"{label}: trial")
        history.plot(numbers, np.minimum.accumulate(values), style[1:], color=color, label=f"{label}: best so far")
        epochs = range(1, len(run["best"]["curves"]["train_loss"]) + 1)
        curves.plot(epochs, run["best"]["curves"]["train_loss"], style[1:], color=color, label=f"{label}: train")
        curves.plot(epochs, run["best"]["curves"]["val_loss"], style[1:], color=color, alpha=0.5,
                    label=f"{label}: validation")
    labels = list(runs)
    bars = seconds.bar(range(len(labels)), [runs[k]["search_seconds"] for k in labels], color=("C0", "C1"))
    seconds.bar_label(bars, [f"{runs[k]['search_seconds']:.1f} s\ntest accuracy {runs[k]['test']['accuracy']:.3f}"
                             for k in labels], fontsize=8)
    seconds.margins(y=0.2)
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    seconds.set_xticks(range(len(labels)), [k.replace(" (", "\n(") for k in labels], fontsize=8)
    history.set(xlabel="trial", ylabel="k-fold mean validation cross-entropy", title="optimisation history",
                yscale="log")
    curves.set(xlabel="epoch", ylabel="cross-entropy (mean over folds)", title="best trial's learning curves",
               yscale="log")
    seconds.set(ylabel="seconds", title=f"search wall time ({len(runs[labels[0]]['trials'])} trials)")
    for ax in (history, curves):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(report["description"])
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _processor() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument("--backend", default="auto", help="backend of the swapped layers (default: auto)")
    parser.add_argument("--quick", action="store_true",
                        help="2 trials, 2 folds, 2 epochs, at most 8 sequences per class (CI)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--epochs", type=int, help="epochs per fit (default: per dataset, 40 and 30)")
    parser.add_argument("--batch-size", type=int, help="default: per dataset, 8 and 32")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("examples/results/search"))
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.folds, args.epochs = 2, 2, 2
    args.device = torch.device(args.device)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    report = {
        "machine": {"processor": _processor(), "cpus": os.cpu_count(), "device": str(args.device),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
        "datasets": {},
    }
    for name in args.datasets:
        data = load_dataset(name, args.quick, args.seed)
        if args.epochs:
            data.epochs = args.epochs
        if args.batch_size:
            data.batch_size = args.batch_size
        print(f"{data.description}: {len(data.train)} training, {len(data.test)} test sequences", flush=True)
        # trial by trial, each swapped trial on the parameters the torch.nn one drew: both
        # studies do the same work, and a change in the machine's load falls on both
        searches = Search(data, args, None), Search(data, args, args.backend)
        for _ in range(args.trials):
            searches[1].trial(searches[0].trial())
        baseline, swapped = (s.finish() for s in searches)
        lengths = data.train.lengths
        result = report["datasets"][name] = {
            "description": data.description,
            "classes": data.classes,
            "sizes": {"train": len(data.train), "test": len(data.test)},
            "steps": [int(lengths.min()), int(lengths.max())],
            "packed": data.packed,
            "epochs": data.epochs,
            "batch_size": data.batch_size,
            "runs": {run["layers"]: run for run in (baseline, swapped)},
            "same_trial_params": [t["params"] for t in baseline["trials"]] == [t["params"] for t in swapped["trials"]],
            "search_speedup": baseline["search_seconds"] / swapped["search_seconds"],
        }
        plot(result, args.out / f"search_{name}.png")
        for label, run in result["runs"].items():
            test, ensemble = run["test"], run["ensemble_test"]
            print(f"{name}, {label}: search {run['search_seconds']:.1f} s; test accuracy {test['accuracy']:.4f}, "
                  f"precision {test['precision']:.4f}, recall {test['recall']:.4f}, F1 {test['f1']:.4f}; "
                  f"{args.folds}-fold ensemble accuracy {ensemble['accuracy']:.4f}; backends {run['backends']}")
        print(f"{name}: torch.nn / swapped search time {result['search_speedup']:.2f}x", flush=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
