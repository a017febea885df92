"""``python -m cnnlstm_fast.tune --show | --clear``: the tuning record of this machine."""

from __future__ import annotations

import argparse

from ..backends import tuned
from . import Table


def show() -> Table:
    """The record of this version and machine: one row per signature."""
    path = tuned.cache_path()
    table = Table(f"tuning record {path}{'' if path.exists() else ' (none yet)'}",
                  ("device", "signature", "median ms", "choice", "threads", "measured"))
    for entry in tuned.entries().values():
        sig = tuned._from_json(entry["signature"])
        times = ", ".join(f"{name} {ms:.3g}" for name, ms in
                          sorted(entry["times_ms"].items(), key=lambda item: item[1]))
        table.rows.append({"device": sig[0], "signature": tuned.describe(sig),
                           "median ms": times or "only candidate", "choice": entry["choice"],
                           "threads": entry.get("threads", ""),
                           "measured": entry.get("measured", "")})
    key = tuned.cache_key()
    table.notes.append("key: " + ", ".join(f"{name} {value}" for name, value in key.items()))
    others = [p for p in tuned.record_files() if p.suffix == ".json" and p != path]
    if others:
        table.notes.append(f"{len(others)} record file(s) of other versions or machines in "
                           f"{tuned.cache_dir()} (--clear deletes them)")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cnnlstm_fast.tune",
        description="The record of the backends cnnlstm_fast.tune measured fastest on this "
                    "machine (docs/tuning.md).")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--show", action="store_true", help="print the record of this version "
                        "and machine, and where it is")
    action.add_argument("--clear", action="store_true", help="delete the record files of every "
                        "version in the cache directory")
    args = parser.parse_args(argv)
    if args.show:
        print(show())
    else:
        removed = tuned.clear()
        print(f"deleted {len(removed)} file(s) from {tuned.cache_dir()}")
        for path in removed:
            print(f"  {path.name}")


if __name__ == "__main__":
    main()
