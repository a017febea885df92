"""The tuning record: per call signature, the backend :func:`cnnlstm_fast.tune` measured
fastest on this machine. ``auto`` asks it before its rules (``_resolve`` in
``backends/__init__.py``): one dict lookup, none while the record is empty.

A call's signature (:func:`signature`) is what the choice depends on: the device (type and
name), a layer or a cell, the cell type, dtype, training or inference, batch, steps
rounded up to a power of two, input, hidden and projection sizes, layers, directions,
packed or padded.

The record persists as one JSON file per key (:func:`cache_key`: the file format, this
package's version, torch's version and the CPU), ``tuning-<hash of the key>.json`` in
:func:`cache_dir`: an upgrade of either package or another machine starts untuned, and
other keys' files stay until ``python -m cnnlstm_fast.tune --clear``. A write takes an
advisory lock (``fcntl``, where the platform has it), merges what other processes wrote
meanwhile, and replaces the file atomically (a temporary file, then ``os.replace``):
no reader sees a torn file. A file that cannot be read or written gives a warning and
no error; the choices measured stay in memory for the process, and an unreadable file
is moved aside (``.corrupt``) before a new record replaces it.

Not consulted under ``torch.use_deterministic_algorithms(True)`` (no timing-driven
choice) nor while torch.compile traces (the graph takes ``auto``'s rules).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .._version import __version__
from .base import RecurrenceSpec

FORMAT = 1

#: The signature's fields, in the order of :func:`signature`'s tuple.
FIELDS = ("device", "module", "cell", "dtype", "mode", "batch", "steps", "input_size",
          "hidden_size", "proj_size", "layers", "directions", "packed")

#: Called at the start of every forward of our layers and cells, with (module, input,
#: hx), while :func:`cnnlstm_fast.tune`, :func:`cnnlstm_fast.explain` or tuning on first
#: use (:func:`cnnlstm_fast.set_tuning`) watch the calls; None otherwise.
on_call: Callable | None = None

#: Whether the record holds a choice other than torch.nn for calls shorter than
#: ``AUTO_MIN_STEPS`` (``resolve_early`` then leaves those to :func:`lookup`); None until
#: the record is read.
short_calls: bool | None = None

_choices: dict[tuple, tuple[str, str]] | None = None  # signature -> (backend, why); None: unread
_entries: dict[str, dict] = {}  # the record's entries by key text (file + this process)
_unsaved: set[str] = set()  # keys of _entries measured here and not written yet
_device_names: dict[torch.device, str] = {}
_min_steps: dict[str, int] = {}  # AUTO_MIN_STEPS, given by backends/__init__.py


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cnnlstm_fast``, else ``~/.cache/cnnlstm_fast``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "cnnlstm_fast"


def cache_key() -> dict:
    """What a record file is valid for: the choices change with our kernels, torch's and
    the CPU (GPUs are named in each signature)."""
    from ..env import cpu_name  # env imports this package

    return {"format": FORMAT, "cnnlstm_fast": __version__, "torch": torch.__version__,
            "cpu": cpu_name(), "cpu_count": os.cpu_count()}


def cache_path() -> Path:
    digest = hashlib.sha256(json.dumps(cache_key(), sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"tuning-{digest[:16]}.json"


def device_name(device: torch.device) -> str:
    """``type:name``, e.g. ``cuda:NVIDIA H100 80GB HBM3``; remembered per device."""
    name = _device_names.get(device)
    if name is None:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        elif device.type == "cpu":
            from ..env import cpu_name

            name = cpu_name()
        else:
            name = str(device)
        name = _device_names[device] = f"{device.type}:{name}"
    return name


def steps_bucket(steps: int) -> int:
    """``steps`` rounded up to a power of two (0 stays 0)."""
    return 1 << (steps - 1).bit_length() if steps > 0 else 0


def signature(spec: RecurrenceSpec) -> tuple:
    """The record's key of a call (the fields of :data:`FIELDS`)."""
    kind, input_size, layers, directions = spec.layer
    return (device_name(spec.device), kind, spec.cell, spec.dtype, spec.needs_grad, spec.batch,
            steps_bucket(spec.steps), input_size, spec.hidden_size, spec.proj_size, layers,
            directions, spec.variable_lengths)


def describe(sig: tuple) -> str:
    """A signature as one line (the device left out), e.g.
    ``lstm B16 T<=64 I128 H256 L3 D2 float32 inference``."""
    (_, kind, cell, dtype, training, batch, steps, input_size, hidden, proj, layers,
     directions, packed) = sig
    text = f"{cell}{'-cell' if kind == 'cell' else ''} B{batch} T<={steps} I{input_size} H{hidden}"
    text += f" P{proj}" if proj else ""
    text += f" L{layers} D{directions}" if kind == "seq" else ""
    text += f" {str(dtype).removeprefix('torch.')} {'training' if training else 'inference'}"
    return text + (" packed" if packed else "")


def _key_text(sig: tuple) -> str:
    return f"{sig[0]} | {describe(sig)}"


def _to_json(sig: tuple) -> dict:
    fields = dict(zip(FIELDS, sig))
    fields["dtype"] = str(fields["dtype"]).removeprefix("torch.")
    fields["mode"] = "training" if fields["mode"] else "inference"
    return fields


def _from_json(fields: dict) -> tuple:
    """The signature tuple of a stored one; ValueError/KeyError/TypeError where it is not."""
    dtype = getattr(torch, fields["dtype"], None)
    if not isinstance(dtype, torch.dtype) or fields["mode"] not in ("training", "inference"):
        raise ValueError(f"bad signature {fields}")
    values = {**fields, "dtype": dtype, "mode": fields["mode"] == "training"}
    sig = tuple(values[name] for name in FIELDS)
    for name in ("batch", "steps", "input_size", "hidden_size", "proj_size", "layers", "directions"):
        if not isinstance(values[name], int):
            raise TypeError(f"signature field {name!r} is not an integer: {values[name]!r}")
    return sig


def _why(entry: dict) -> str:
    times = sorted(entry["times_ms"].items(), key=lambda item: item[1])
    measured = ", ".join(f"{name} {ms:.3g} ms" for name, ms in times) or "the only candidate"
    whole = entry.get("whole_model")
    if whole:  # the per-layer choice replaced after timing the whole model
        model = ", ".join(f"{name} {ms:.3g} ms" for name, ms in
                          sorted(whole.items(), key=lambda item: item[1]))
        measured += f"; the whole model: {model}"
    return f"tuned on this machine ({measured}; {entry.get('measured', 'undated')})"


def lookup(spec: RecurrenceSpec) -> tuple[str, str] | None:
    """(backend name, why) the record holds for ``spec``'s call, or None."""
    if torch.compiler.is_compiling():
        return None
    choices = _choices if _choices is not None else load()
    if not choices or not spec.layer or torch.are_deterministic_algorithms_enabled():
        return None
    return choices.get(signature(spec))


def load() -> dict:
    """Reads the record of this key from disk (once; :func:`reset` forgets it)."""
    global _choices, _entries
    _entries = _read(cache_path()) or {}
    _rebuild()
    return _choices


def entries() -> dict[str, dict]:
    """The record as this process holds it: entries by signature text."""
    if _choices is None:
        load()
    return dict(_entries)


def remember(sig: tuple, choice: str, times: dict[str, dict], not_timed: dict[str, str]) -> dict:
    """Puts a measurement in the record of this process (:func:`save` writes it) and
    returns its entry. ``times``: name -> timing summary (``median_ms``, ``p20_ms``,
    ``p80_ms``, ``reps``); ``not_timed``: name -> why it was not."""
    if _choices is None:
        load()
    entry = {
        "signature": _to_json(sig),
        "choice": choice,
        "times_ms": {name: t["median_ms"] for name, t in times.items()},
        "spread_ms": {name: [t["p20_ms"], t["p80_ms"]] for name, t in times.items()},
        "reps": max((t.get("reps") or 0 for t in times.values()), default=0),
        "not_timed": not_timed,
        "threads": torch.get_num_threads(),
        "measured": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    key = _key_text(sig)
    _entries[key] = entry
    _unsaved.add(key)
    _rebuild()
    return entry


def override(sig: tuple, choice: str, whole_model_ms: dict[str, float]) -> dict:
    """Replaces the choice :func:`remember` made for ``sig`` after the whole model was
    timed (``whole_model_ms``: each configuration's median, ``"tuned"`` the per-layer
    choices); the layer's own times stay in the entry. Returns the entry."""
    if _choices is None:
        load()
    key = _key_text(sig)
    entry = dict(_entries[key], choice=choice, whole_model=dict(whole_model_ms))
    _entries[key] = entry
    _unsaved.add(key)
    _rebuild()
    return entry


#: A record not read yet (:func:`swapped`): the first lookup reads the file at
#: :func:`cache_path`.
EMPTY = (None, {}, None, set())


def snapshot() -> tuple:
    """The record as this process holds it now (for :func:`swapped`)."""
    return _choices, dict(_entries), short_calls, set(_unsaved)


def _restore(state: tuple) -> None:
    global _choices, _entries, short_calls
    _choices, _entries, short_calls = state[0], dict(state[1]), state[2]
    _unsaved.clear()
    _unsaved.update(state[3])


@contextlib.contextmanager
def swapped(state: tuple) -> Iterator[None]:
    """Runs the block with the record ``state`` (:func:`snapshot`) in place of this
    process's, which is back afterwards: the benchmark's ``tuned`` provider times a model
    tuned in a record of its own beside ``auto`` on the user's record."""
    saved = snapshot()
    _restore(state)
    try:
        yield
    finally:
        _restore(saved)


def reset() -> None:
    """Forgets the record held in memory; the next lookup reads the file again."""
    global _choices, _entries, short_calls
    _choices, _entries, short_calls = None, {}, None
    _unsaved.clear()


def _rebuild() -> None:
    global _choices, short_calls
    choices, short = {}, False
    for entry in _entries.values():
        sig = _from_json(entry["signature"])
        choices[sig] = (entry["choice"], _why(entry))
        device_type, fewest_steps = sig[0].split(":", 1)[0], sig[6] // 2 + 1
        short |= entry["choice"] != "torch" and fewest_steps < _min_steps.get(device_type, 0)
    _choices, short_calls = choices, short


def _warn(message: str) -> None:
    warnings.warn(f"cnnlstm_fast tuning record: {message}", UserWarning, stacklevel=3)


def _read(path: Path, quiet: bool = False) -> dict[str, dict] | None:
    """The entries of the record file at ``path``: {} where there is none, None (with a
    warning unless ``quiet``) where it cannot be read or is not a record of this key."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        if not quiet:
            _warn(f"cannot read {path} ({error}); auto follows its rules")
        return None
    try:
        data = json.loads(text)
        if data.get("key") != cache_key():
            raise ValueError("its key is not this version's and machine's")
        found = data["entries"]
        for entry in found.values():
            _from_json(entry["signature"])
            if not isinstance(entry["choice"], str) or not isinstance(entry["times_ms"], dict):
                raise TypeError(f"bad entry {entry}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        if not quiet:
            _warn(f"{path} is not a readable record ({error}); auto follows its rules, and "
                  "the file is moved aside (.corrupt) when a new record is written")
        return None
    return found


def save() -> Path | None:
    """Writes this process's measurements into the record file, over what it holds for
    the same signatures and beside what other processes wrote; the path, or None (with a
    warning) where it could not be written (the measurements then stay unsaved)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            on_disk = _read(path, quiet=True)
            if on_disk is None:
                aside = path.with_name(path.name + ".corrupt")
                os.replace(path, aside)
                _warn(f"moved the unreadable {path} to {aside}")
                on_disk = {}
            merged = {**on_disk, **{key: _entries[key] for key in _unsaved}}
            _write_atomic(path, {"format": FORMAT, "key": cache_key(), "entries": merged})
    except OSError as error:
        _warn(f"cannot write {path} ({error}); the choices measured hold in this process "
              "only (XDG_CACHE_HOME chooses the directory)")
        return None
    _entries.update(merged)
    _unsaved.clear()
    _rebuild()
    return path


def _write_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<path>.lock`` (none where there is no fcntl: the
    last writer's merge wins there)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_files() -> list[Path]:
    """Every file of the record in :func:`cache_dir`, of any key."""
    directory = cache_dir()
    return sorted(directory.glob("tuning-*")) if directory.is_dir() else []


def clear() -> list[Path]:
    """Deletes the record's files of every key and forgets the record in memory; returns
    the paths deleted."""
    removed = []
    for path in record_files():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    reset()
    return removed
