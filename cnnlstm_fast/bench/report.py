"""Output of a benchmark run: the terminal table (rich), JSON and CSV result files,
PNG speedup charts (matplotlib) and the change against an earlier run."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

COLUMNS = (
    ("cell", "cell", "{}"), ("B", "batch", "{}"), ("T", "steps", "{}"), ("I", "input_size", "{}"),
    ("H", "hidden_size", "{}"), ("L", "layers", "{}"), ("dir", "directions", "{}"),
    ("dtype", "dtype", "{}"), ("mode", "mode", "{}"), ("provider", "provider", "{}"),
    ("median ms", "median_ms", "{:.3f}"), ("p20", "p20_ms", "{:.3f}"), ("p80", "p80_ms", "{:.3f}"),
    ("speedup", "speedup", "{:.2f}x"), ("us/step", "us_per_step", "{:.1f}"),
    ("floor us", "floor_us_per_step", "{:.2f}"), ("x floor", "x_floor", "{:.1f}x"),
    ("TFLOP/s", "tflops", "{:.3g}"), ("% peak", "pct_peak", "{:.1f}"), ("peak MiB", "peak_mib", "{:.1f}"),
)

OPTIONAL = ("floor_us_per_step", "x_floor")  # columns shown only where a row has them


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "cell" and row.get("model"):
        return f"{row['model']}-{value}"
    if key == "provider" and row.get("picked"):
        return f"{value} ({row['picked']})"
    return "-" if value is None else fmt.format(value)


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=220)  # logs: no squeezing


def print_table(rows: list[dict], title: str, notes: list[str]) -> None:
    from rich.table import Table

    table = Table(title=title)
    # the floor is measured on CUDA only: no empty floor columns on CPU
    columns = [c for c in COLUMNS
               if c[1] not in OPTIONAL or any(r.get(c[1]) is not None for r in rows)]
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for _, key, fmt in columns))
    console = _console()
    console.print(table)
    for note in notes:
        console.print(f"note: {note}", highlight=False)


def auto_notes(rows: list[dict]) -> list[str]:
    """The configurations where ``auto`` measured slower than torch.nn with the two
    runs' p20-p80 ranges apart (the project's bar: never slower once auto picks)."""
    base = {r["config"]: r for r in rows if r["provider"] == "torch.nn"}
    slower = [f"{r['config']} ({r['picked']}, {r['speedup']:.2f}x)" for r in rows
              if r["provider"] == "auto" and r["config"] in base
              and r["p20_ms"] > base[r["config"]]["p80_ms"]]
    if not slower:
        return []
    return [f"auto slower than torch.nn beyond the p20-p80 spread in {len(slower)} config(s): "
            + "; ".join(slower)]


def skip_notes(skipped: list[dict]) -> list[str]:
    """One line per (provider, reason), with how many configurations it hit."""
    counts = defaultdict(int)
    for item in skipped:
        counts[(item["provider"], item["reason"])] += 1
    return [f"{provider} skipped in {n} config(s): {reason}" for (provider, reason), n in counts.items()]


def write_json(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["provider"])
        writer.writeheader()
        writer.writerows(rows)


_PANEL_KEYS = ("model", "cell", "mode", "batch", "steps", "input_size", "hidden_size", "layers",
               "directions")


def plot(rows: list[dict], directory: str) -> list[str]:
    """One PNG per swept variable and dtype: speedup vs torch.nn against the swept value,
    one line per provider, one panel per combination of the values not swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for row in rows:
        if row.get("sweep") and row.get("speedup") is not None:
            groups[(row["sweep"], row["dtype"])].append(row)
    written = []
    for (sweep, dtype), group in sorted(groups.items()):
        # one panel per combination of what is not swept (a suite may sweep from several
        # bases, e.g. short-seq: batch 1 and 16, layers and cell loops)
        fixed = [k for k in _PANEL_KEYS if k != sweep and not (sweep == "hidden_size" and k == "input_size")]
        panel_of = lambda r: tuple(r.get(k) for k in fixed)  # noqa: E731
        panels = sorted({panel_of(r) for r in group}, key=str)
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            lines = defaultdict(list)
            for r in group:
                if panel_of(r) == panel:
                    lines[r["provider"]].append((r[sweep], r["speedup"]))
            for provider, points in sorted(lines.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.axhline(1.0, color="grey", lw=0.8)
            title = " ".join(f"{k}={v}" for k, v in zip(fixed, panel) if v not in (None, ""))
            ax.set_title(f"{title} {dtype}", fontsize="small")
            ax.set(xlabel=sweep, ylabel="speedup vs torch.nn")
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"speedup-{sweep}-{dtype}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("model", "cell", "batch", "steps", "input_size", "hidden_size",
                                      "layers", "directions", "dtype", "mode", "provider"))


def compare(old: dict, rows: list[dict]) -> list[dict]:
    """Rows present in both runs: old and new median and the relative change."""
    before = {_key(r): r for r in old["results"]}
    changes = []
    for row in rows:
        prev = before.get(_key(row))
        if prev is not None:
            changes.append({**row, "old_ms": prev["median_ms"],
                            "change": row["median_ms"] / prev["median_ms"] - 1,
                            "old_speedup": prev.get("speedup")})
    return changes


def print_compare(changes: list[dict], old: dict) -> None:
    from rich.table import Table

    env = old.get("environment", {})
    table = Table(title=f"change against {old.get('device')} at {env.get('git_commit')} "
                        "(negative: faster now)")
    for header in ("config", "provider", "old ms", "new ms", "change", "old speedup", "new speedup"):
        table.add_column(header, justify="right")
    for c in changes:
        style = "green" if c["change"] < -0.05 else "red" if c["change"] > 0.05 else None
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        table.add_row(c["config"], c["provider"], f"{c['old_ms']:.3f}", f"{c['median_ms']:.3f}",
                      f"{100 * c['change']:+.1f}%", fmt(c["old_speedup"]), fmt(c["speedup"]), style=style)
    _console().print(table)
