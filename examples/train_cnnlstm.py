"""Train a CNN-LSTM on scikit-learn's handwritten digits, with torch.nn layers or ours.

Each 8x8 digit image is read as a sequence of 8 rows of 8 pixels (T=8, C=8): a 1-D
convolution over the rows, a stacked bidirectional LSTM, a linear classifier
(``cnnlstm_fast.models.CNNLSTM``). The data ships inside scikit-learn, so nothing is
downloaded. The model is built, turned into plain torch.nn layers with
``cnnlstm_fast.unswap`` (the baseline, what a user starts from) and, with ``--swap``,
swapped to ours with ``cnnlstm_fast.swap``; the same seed gives the same weights,
batches and dropout masks in both runs.

    python examples/train_cnnlstm.py --compare --backend cpu --out examples/results
    python examples/train_cnnlstm.py --quick --out /tmp/quick     # what CI runs

Writes ``metrics.json`` (configuration, per-epoch curves, test accuracy and macro
precision/recall/F1, training time per run) and ``curves.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cnnlstm_fast as clf
from cnnlstm_fast.models import CNNLSTM

try:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
except ImportError:  # the progress bar is optional
    Progress = None

NUM_CLASSES = 10


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows the true class, columns the predicted one."""
    index = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def classification_metrics(cm: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 from a confusion matrix.

    A class never predicted has precision 0, one never present recall 0, and a class
    with precision + recall = 0 has F1 0 (scikit-learn's ``zero_division=0``). Macro
    averages run over every class of the matrix.
    """
    cm = cm.double()
    true_pos = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, true_pos / actual.clamp(min=1), 0.0)
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-300), 0.0)
    return {
        "accuracy": (true_pos.sum() / cm.sum().clamp(min=1)).item(),
        "precision": precision.mean().item(),
        "recall": recall.mean().item(),
        "f1": f1.mean().item(),
    }


def load_data(seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits as (N, 8 rows, 8 pixels) in [0, 1]; stratified 70/15/15 train/val/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=dtype) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    index = torch.arange(len(y)).numpy()
    train, rest = train_test_split(index, test_size=0.3, stratify=y, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    return {name: (x[i].to(device), y[i].to(device)) for name, i in (("train", train), ("val", val), ("test", test))}


def build_model(args, swap: bool) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = CNNLSTM(
        8, NUM_CLASSES, conv="1d", conv_channels=(32, 32), kernel_size=3, rnn="lstm",
        hidden_size=args.hidden_size, num_layers=2, bidirectional=True, dropout=0.2,
    )
    clf.unswap(model)  # plain torch.nn layers: the model a user starts from
    if swap:
        clf.swap(model, backend=args.backend)
    return model.to(args.device, args.dtype)


@torch.no_grad()
def evaluate(model, x, y, batch_size: int) -> tuple[float, torch.Tensor]:
    """(mean cross-entropy, confusion matrix) of ``model`` on (x, y)."""
    model.eval()
    total, predictions = 0.0, []
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        total += F.cross_entropy(logits, y[start : start + batch_size], reduction="sum").item()
        predictions.append(logits.argmax(1))
    return total / len(y), confusion_matrix(y.cpu(), torch.cat(predictions).cpu(), NUM_CLASSES)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, data, swap: bool, progress=None) -> dict:
    """Trains one model; returns its configuration, curves, test metrics and timings."""
    model = build_model(args, swap)
    x_train, y_train = data["train"]
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    if args.quick:
        steps_per_epoch = min(steps_per_epoch, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # dropout masks
    name = f"cnnlstm_fast (backend={args.backend})" if swap else "torch.nn"
    task = progress.add_task(name, total=args.epochs * steps_per_epoch, status="") if progress else None
    history = {key: [] for key in ("train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds")}
    for epoch in range(args.epochs):
        model.train()
        _synchronize(args.device)
        start, losses = time.perf_counter(), []
        order = torch.randperm(len(y_train), generator=shuffle).to(args.device)
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            loss = model.loss(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())  # no .item() here: it would sync the GPU every step
            if progress:
                progress.advance(task)
        _synchronize(args.device)
        history["epoch_seconds"].append(time.perf_counter() - start)
        history["train_loss"].append(torch.stack(losses).mean().item())
        if progress:
            progress.update(task, status=f"epoch {epoch + 1}/{args.epochs} train loss {history['train_loss'][-1]:.4f}")
        val_loss, val_cm = evaluate(model, *data["val"], args.batch_size)
        history["val_loss"].append(val_loss)
        history["val_accuracy"].append(classification_metrics(val_cm)["accuracy"])
        history["lr"].append(schedule.get_last_lr()[0])
    test_loss, test_cm = evaluate(model, *data["test"], args.batch_size)
    return {
        "layers": name,
        "recurrent_class": f"{type(model.rnn).__module__}.{type(model.rnn).__qualname__}",
        "train_seconds": sum(history["epoch_seconds"]),
        "history": history,
        "test": {"loss": test_loss, **classification_metrics(test_cm), "confusion_matrix": test_cm.tolist()},
    }


def plot_curves(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (label, run), style in zip(runs.items(), ("-", "--")):
        epochs = range(1, len(run["history"]["train_loss"]) + 1)
        ax_loss.plot(epochs, run["history"]["train_loss"], style, color="C0", label=f"{label}: train")
        ax_loss.plot(epochs, run["history"]["val_loss"], style, color="C1", label=f"{label}: validation")
        ax_acc.plot(epochs, run["history"]["val_accuracy"], style, color="C2", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("CNN-LSTM on scikit-learn digits (rows as time steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--swap", action="store_true", help="train with our layers (cnnlstm_fast.swap)")
    which.add_argument("--compare", action="store_true", help="train with torch.nn, then swapped; same seed")
    parser.add_argument("--backend", default="auto", help="backend of the swapped layers (default: auto)")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 3 batches (CI)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, default=Path("examples/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(args.seed, args.device, args.dtype)
    swaps = (False, True) if args.compare else (args.swap,)
    show = Progress is not None and not args.no_progress
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()) if show else ()
    runs = {}
    with Progress(*columns) if show else contextlib.nullcontext() as progress:
        for swap in swaps:
            run = train(args, data, swap, progress)
            runs[run["layers"]] = run
    report = {
        "dataset": "sklearn.datasets.load_digits, 8 rows x 8 pixels per image",
        "split": {name: len(y) for name, (_, y) in data.items()},
        "device": str(args.device),
        "torch": torch.__version__,
        "config": {k: str(v) if isinstance(v, (Path, torch.device, torch.dtype)) else v for k, v in vars(args).items()},
        "runs": runs,
    }
    if len(runs) == 2:
        a, b = (run["history"] for run in runs.values())
        report["max_curve_difference"] = {
            key: max(abs(u - v) for u, v in zip(a[key], b[key])) for key in ("train_loss", "val_loss", "val_accuracy")
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(runs, args.out / "curves.png")
    for label, run in runs.items():
        test = run["test"]
        print(
            f"{label}: {run['train_seconds']:.1f} s training; test accuracy {test['accuracy']:.4f}, "
            f"precision {test['precision']:.4f}, recall {test['recall']:.4f}, F1 {test['f1']:.4f}"
        )
    if "max_curve_difference" in report:
        print("max |difference| between the curves:", report["max_curve_difference"])
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'curves.png'}")
    return report


if __name__ == "__main__":
    main()
