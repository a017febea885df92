"""``auto``'s static rules as data: the table ``rules.json`` beside this module.

Each row says, for one device type and one backend, where that backend measured faster
than torch.nn (its ``when`` conditions), and cites the committed result files it comes
from (``evidence``); ``tests/test_rules_table.py`` checks every row against those files.
``min_steps`` gives, per device type, the fewest steps a call must have before any row is
asked (:data:`cnnlstm_fast.backends.AUTO_MIN_STEPS`). The conditions a row may hold, all
of which must hold (a missing one, or a null bound, takes anything; bounds inclusive):

``cells``, ``modes`` (``inference``, ``training``), ``dtypes``: lists of names;
``batch``, ``hidden``, ``steps``: ``[low, high]``; ``gemm``: the cpu backend's float32
GEMM (``avx512`` where the call is float32 and our AVX-512 GEMM is in use, else
``blas``); ``packed``, ``projection``: true or false; ``hidden_multiple_of``: an integer;
``saved_bytes_above``: an LSTM's saved activations (steps x batch x 4 x hidden float32)
above this many bytes; ``avx512_full_rate``: whether this CPU's cores run a 512-bit FMA
at the rate of a 256-bit one (full-width units: AMD Zen 5, Intel server cores with two
FMA-512 ports) rather than at half of it (AMD Zen 4's double-pumped units); timed once per
process (``_C.cpu_gemm_info()['fma512_ratio']`` >= 1.5), only where every other condition
held; ``malloc_keeps_freed``: whether this process's malloc keeps large freed blocks (read
from the environment, last).

The same matching (:meth:`Rows.match`) serves ``auto`` (facts from a call's
``RecurrenceSpec``) and the test (facts from a result file's rows), so the table is
checked as it is applied.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import RecurrenceSpec

TABLE_PATH = Path(__file__).with_name("rules.json")

CONDITIONS = frozenset({"cells", "modes", "dtypes", "batch", "hidden", "steps", "gemm",
                        "packed", "projection", "hidden_multiple_of", "saved_bytes_above",
                        "avx512_full_rate", "malloc_keeps_freed"})


@dataclass(slots=True)
class Facts:
    """What the rows' conditions read about one call (or one measured row)."""

    cell: str
    mode: str  # "inference" or "training"
    dtype: str  # "float32", ...
    batch: int
    hidden: int
    steps: int
    packed: bool
    projection: bool
    gemm: str | None  # "avx512" or "blas" on CPU, else None


_ANY = (-(1 << 62), 1 << 62)
_MODES = ("inference", "training")


def _bounds(when: Mapping, name: str) -> tuple[int, int]:
    low, high = when.get(name, (None, None))
    return (_ANY[0] if low is None else low, _ANY[1] if high is None else high)


class Rows:
    """Rows of one device's table compiled for matching: indexed by (cell, training,
    gemm), each row's other conditions as plain values, so a call costs a dict lookup and
    a few comparisons per row of its key. ``auto`` (:func:`takes`) and
    tests/test_rules_table.py (:meth:`first`) match through :meth:`match`."""

    def __init__(self, device: str, rows) -> None:
        self.device = device
        self.rows = tuple(rows)
        self._index: dict[tuple, list] = {}
        for row in self.rows:
            when = row["when"]
            dtypes = when.get("dtypes")
            compiled = (row, *_bounds(when, "batch"), *_bounds(when, "hidden"),
                        *_bounds(when, "steps"),
                        None if dtypes is None else frozenset(getattr(torch, d) for d in dtypes),
                        when.get("packed"), when.get("projection"),
                        when.get("hidden_multiple_of", 1), when.get("saved_bytes_above"),
                        when.get("avx512_full_rate"), when.get("malloc_keeps_freed"))
            gemms = (when["gemm"],) if "gemm" in when else ("avx512", "blas", None)
            for cell in when.get("cells", ("lstm", "gru", "rnn_tanh", "rnn_relu")):
                for mode in when.get("modes", _MODES):
                    for gemm in gemms:
                        key = (cell, mode == "training", gemm)
                        self._index.setdefault(key, []).append(compiled)

    def match(self, cell: str, training: bool, gemm: str | None, dtype: torch.dtype,
              batch: int, hidden: int, steps: int, packed: bool, projection: bool,
              avx512_full_rate: Callable[[], bool],
              malloc_keeps_freed: Callable[[], bool]) -> dict | None:
        """The first row (in table order) whose every condition holds, else None.
        ``avx512_full_rate`` and ``malloc_keeps_freed`` are called only for a row that
        asks, after its other conditions held: they cost more than the rest."""
        candidates = self._index.get((cell, training, gemm))
        if not candidates:
            return None
        for (row, blo, bhi, hlo, hhi, slo, shi, dtypes, want_packed, want_projection,
             multiple, saved, full_rate, malloc) in candidates:
            if not (blo <= batch <= bhi and hlo <= hidden <= hhi and slo <= steps <= shi):
                continue
            if dtypes is not None and dtype not in dtypes:
                continue
            if want_packed is not None and want_packed != packed:
                continue
            if want_projection is not None and want_projection != projection:
                continue
            if hidden % multiple:
                continue
            # an LSTM's saved activations: steps x batch x 4 gates x hidden, float32
            if saved is not None and (cell != "lstm" or steps * batch * 16 * hidden <= saved):
                continue
            if full_rate is not None and avx512_full_rate() != full_rate:
                continue
            if malloc is not None and malloc_keeps_freed() != malloc:
                continue
            return row
        return None

    def first(self, facts: Facts, avx512_full_rate: Callable[[], bool],
              malloc_keeps_freed: Callable[[], bool]) -> dict | None:
        """:meth:`match` for ``facts``."""
        return self.match(facts.cell, facts.mode == "training", facts.gemm,
                          getattr(torch, facts.dtype), facts.batch, facts.hidden,
                          facts.steps, facts.packed, facts.projection, avx512_full_rate,
                          malloc_keeps_freed)


def load(path: Path = TABLE_PATH) -> dict:
    """The table, checked for the shape this module reads (a ValueError names the row
    and the field otherwise)."""
    table = json.loads(path.read_text())
    seen = set()
    for row in table["rules"]:
        where = f"{path.name}: row {row.get('id')!r}"
        for key in ("id", "device", "choice", "against", "when", "evidence"):
            if key not in row:
                raise ValueError(f"{where} has no {key!r}")
        unknown = set(row["when"]) - CONDITIONS
        if unknown:
            raise ValueError(f"{where}: unknown conditions {sorted(unknown)}; the conditions "
                             f"are {sorted(CONDITIONS)}")
        if row["id"] in seen:
            raise ValueError(f"{where}: the id is used twice")
        seen.add(row["id"])
    return table


TABLE = load()

#: Per device type, the fewest steps a call must have for ``auto`` to ask any row.
MIN_STEPS: dict[str, int] = {entry["device"]: entry["steps"] for entry in TABLE["min_steps"]}


def rows_for(device: str, backend: str) -> Rows:
    """The rows under which ``auto`` picks ``backend`` on ``device``, in table order."""
    return Rows(device, (row for row in TABLE["rules"]
                         if row["device"] == device and row["choice"] == backend))


def takes(rows: Rows, spec: RecurrenceSpec, cpu_gemm_is_avx512: Callable[[], bool],
          avx512_full_rate: Callable[[], bool],
          malloc_keeps_freed: Callable[[], bool]) -> dict | None:
    """The first of ``rows`` that matches ``spec``'s call (on ``rows.device``: the caller
    checked the device), else None; None for calls of fewer than the device's
    :data:`MIN_STEPS` steps. The GEMM is asked only for float32 calls on CPU."""
    device = rows.device
    if spec.steps < MIN_STEPS.get(device, 0):
        return None
    gemm = None
    if device == "cpu":
        gemm = "avx512" if spec.dtype == torch.float32 and cpu_gemm_is_avx512() else "blas"
    return rows.match(spec.cell, spec.needs_grad, gemm, spec.dtype, spec.batch,
                      spec.hidden_size, spec.steps, bool(spec.variable_lengths),
                      bool(spec.proj_size), avx512_full_rate, malloc_keeps_freed)
