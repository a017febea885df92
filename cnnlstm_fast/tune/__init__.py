"""Measure the backends on this machine and keep the fastest per layer signature:
cnnlstm_fast's ``torch.backends.cudnn.benchmark`` (docs/tuning.md).

- :func:`tune` runs a model once on example inputs and times every candidate backend
  on each of its recurrent layers' calls, on random inputs shaped and laid out as that
  call's (its batch sizes too, where packed); ``auto``
  then takes the fastest for calls of the same signature (``backends/tuned.py``), in
  this process and, through the record on disk, in the next ones.
- :func:`set_tuning` (or ``CNNLSTM_FAST_TUNE=1``) does the same on first use: the first
  call of each signature the record lacks is measured before it runs.
- :func:`explain` shows what ``auto`` picks for each layer of a model and why, without
  measuring anything.
- ``python -m cnnlstm_fast.tune --show`` prints the record, ``--clear`` deletes it.

A call is timed as the benchmark times (``cnnlstm_fast/bench/timing.py``): warm-up, then
on CPU the candidates interleaved repetition by repetition with the median kept, on
CUDA interleaved CUDA events. Training calls (grad enabled and something requiring
grad) are timed forward and backward, inference calls forward. Candidates are the
available backends that support the call (:func:`candidates`). Under
``torch.use_deterministic_algorithms(True)`` nothing is timed and the record is not
consulted: no timing-driven choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from ..backends import tuned
from ..backends.base import RecurrenceSpec

__all__ = ["ENV_VAR", "Table", "candidates", "explain", "get_tuning", "set_tuning", "tune"]

#: ``1`` turns tuning on first use on at import (:func:`set_tuning`); ``0`` or unset: off.
ENV_VAR = "CNNLSTM_FAST_TUNE"

#: Per signature: the timed repetitions' budget (all candidates together, estimated
#: from the warm-up) and the bounds of the repetitions per candidate.
BUDGET_S = 1.0
MIN_REPS, MAX_REPS = 5, 50
#: A candidate whose second warm-up call took this many times the fastest one's is not
#: timed.
PRUNE_FACTOR = 3.0
#: The rules' pick stays where its median is within this fraction of the fastest's:
#: closer than that is noise on a shared machine, not a reason to leave the rules.
TIE_MARGIN = 0.03

_log = logging.getLogger(__name__)
_lock = threading.Lock()  # one measurement at a time (threads of nn.DataParallel)
_busy = threading.local()  # set while this thread measures: its own calls pass the hook


@dataclasses.dataclass
class Table:
    """What :func:`tune` or :func:`explain` found, one row per layer and signature:
    ``rows`` of dicts keyed by ``columns``; ``str()`` (and the REPL) show it as text."""

    title: str
    columns: tuple[str, ...]
    rows: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        cells = [list(self.columns)] + [[str(row.get(c, "")) for c in self.columns] for row in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(self.columns))]
        lines = [self.title]
        for n, line in enumerate(cells):
            lines.append("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip())
            if n == 0:
                lines.append("  ".join("-" * width for width in widths))
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    __repr__ = __str__

    def print(self) -> None:
        print(self)


def candidates(spec: RecurrenceSpec) -> list[str]:
    """The backends timed for ``spec``'s call: the available ones that support it, except
    ``reference`` (the executable specification, never a speed candidate) and Triton on
    CPU tensors (its interpreter, a test vehicle), each followed by the variants it
    offers for the call (``Backend.variants``: ``cpu:side_by_side`` for a bidirectional
    layer, ``backends/cpu.py: set_directions``)."""
    names = []
    for name in backends.available_backends():
        if name == "reference" or (name == "triton" and spec.device.type != "cuda"):
            continue
        backend = backends.get_backend(name)
        if backend.unsupported_reason(spec) is None:
            names.append(name)
            names += [f"{name}:{variant}" for variant in backend.variants(spec)]
    return names


def tune(model: nn.Module, *example_inputs, **example_kwargs) -> Table:
    """Runs ``model(*example_inputs, **example_kwargs)`` once and, at each call of its
    layers and cells that use ``backend="auto"``, times every candidate backend on
    inputs like that call's (forward, and backward when grad is enabled at the call) and
    records the fastest for the call's signature, which ``auto`` then follows; each
    signature is timed once a run. The record is written to disk (``python -m cnnlstm_fast.tune
    --show``). Returns the table: layer, signature, the candidates' median times,
    choice, and what ``auto``'s rules alone would pick. The timing leaves no trace on
    the model: the parameters' ``.grad`` and the random number state are what the call
    alone leaves.

    Tune inference under ``torch.no_grad()`` and training with grad enabled (a call
    each): they are different signatures."""
    layers = _our_layers(model)
    if torch.are_deterministic_algorithms_enabled():
        warnings.warn("cnnlstm_fast.tune: torch.use_deterministic_algorithms(True) is set, so "
                      "no timing-driven choice is made: auto follows its rules (shown)",
                      UserWarning, stacklevel=2)
        return explain(model, *example_inputs, **example_kwargs)
    if not layers:
        warnings.warn("cnnlstm_fast.tune: the model has no cnnlstm_fast layers to tune "
                      "(cnnlstm_fast.swap(model) puts them in)", UserWarning, stacklevel=2)
    tuner = _Tuner(layers, force=True)
    start = time.perf_counter()
    with _watching(tuner):
        model(*example_inputs, **example_kwargs)
    check = _whole_model_check(model, tuner, example_inputs, example_kwargs)
    seconds = time.perf_counter() - start
    path = tuned.save() if tuner.measured else None
    devices = sorted({sig[0] for sig in tuner.measured})
    table = Table(
        f"cnnlstm_fast.tune: {len(tuner.measured)} signature(s) timed in {seconds:.1f} s on "
        f"{', '.join(devices) or 'no device'} ({torch.get_num_threads()} threads)",
        ("layer", "signature", "median ms", "choice", "rules"), tuner.rows)
    if check is not None:
        table.notes.append(check)
    if path is not None:
        table.notes.append(f"record: {path}")
    return table


def _whole_model_check(model: nn.Module, tuner: "_Tuner", args, kwargs) -> str | None:
    """Times the whole model (forward, and backward where it trains) with the per-layer
    choices against every layer on one backend, for each backend the layers were timed
    on. Where one backend for all layers is faster than the per-layer choices by more
    than TIE_MARGIN (a layer's time alone does not show what it costs its neighbours:
    caches, threads, copies between layouts), every signature of the run takes it. The
    model's parameters' ``.grad``, its buffers (BatchNorm's running statistics) and the
    random number state are left as they were. Returns the table's note, or None where
    there was nothing to compare."""
    if not tuner.measured:
        return None
    choices = {entry["choice"] for entry in tuner.measured.values()}
    # each backend the layers were timed on, for all layers; not the one every layer
    # chose already (that is the per-layer configuration itself)
    names = sorted({n for entry in tuner.measured.values() for n in entry["times_ms"]
                    if ":" not in n} - (choices if len(choices) == 1 else set()))
    if not names:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    training = torch.is_grad_enabled() and bool(params)
    tensors = _tensors((args, tuple(kwargs.values())))
    device = tensors[0].device if tensors else (params[0].device if params else torch.device("cpu"))
    grads: list[torch.Tensor] = []

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            with contextlib.nullcontext() if name == "tuned" else backends.use_backend(name):
                out = model(*args, **kwargs)
            if training:
                outs = [t for t in _tensors(out) if t.requires_grad]
                if not grads:
                    grads.extend(torch.randn_like(t) for t in outs)
                if outs:
                    torch.autograd.grad(outs, params, grads, allow_unused=True)
        return run

    buffers = [b.detach().clone() for b in model.buffers()]
    _busy.active = True
    try:
        with _lock, torch.random.fork_rng(
                [device.index or 0] if device.type == "cuda" else []):
            times, not_timed = _time({n: step(n) for n in ("tuned", *names)}, device)
    finally:
        _busy.active = False
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    if "tuned" not in times:
        return "whole-model check: not timed (" + "; ".join(
            f"{n}: {why}" for n, why in not_timed.items()) + ")"
    medians = {n: t["median_ms"] for n, t in times.items()}
    shown = ", ".join(f"{n} {ms:.3g} ms" for n, ms in sorted(medians.items(), key=lambda i: i[1]))
    best = min(medians, key=medians.get)
    if best == "tuned" or medians[best] * (1 + TIE_MARGIN) >= medians["tuned"]:
        return f"whole-model check ({'training' if training else 'inference'}): {shown} " \
               "(tuned: the per-layer choices) -> the per-layer choices stay"
    for sig in tuner.measured:
        tuner.measured[sig] = tuned.override(sig, best, medians)
    for row in tuner.rows:
        if row.get("median ms") and row["choice"] != best:  # a layer timed here
            row["choice"] = f"{best} (whole model)"
    return f"whole-model check ({'training' if training else 'inference'}): {shown} " \
           f"(tuned: the per-layer choices) -> {best} for every layer tuned here"


def explain(model: nn.Module, *example_inputs, **example_kwargs) -> Table:
    """Runs ``model(*example_inputs, **example_kwargs)`` once and shows, per layer and
    signature of its calls, the backend each call resolved to and why (named, the
    process default, the tuning record, the rule of ``auto`` that took it, or why none
    did). Measures nothing; tuning on first use is paused meanwhile."""
    explainer = _Explainer(_our_layers(model))
    logger = logging.getLogger(backends.__name__)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(explainer)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        with _watching(explainer):
            model(*example_inputs, **example_kwargs)
    finally:
        logger.removeHandler(explainer)
        logger.setLevel(level)
        logger.propagate = propagate
    table = Table("cnnlstm_fast.explain: the backend of each layer's calls",
                  ("layer", "signature", "backend", "why"), explainer.table_rows)
    if not explainer.names:
        table.notes.append("the model has no cnnlstm_fast layers (cnnlstm_fast.swap(model) "
                           "puts them in)")
    if torch.are_deterministic_algorithms_enabled():
        table.notes.append("torch.use_deterministic_algorithms(True): the tuning record is "
                           "not consulted")
    if backends.get_default() != "auto":
        table.notes.append(f"the process default backend is {backends.get_default()!r}")
    return table


def set_tuning(enabled: bool) -> None:
    """Tuning on first use, as ``torch.backends.cudnn.benchmark``: while on, the first
    call of each signature that the record lacks, of a layer or cell using
    ``backend="auto"``, is timed with every candidate before it runs (a one-time cost of
    about a second per signature on CPU, docs/tuning.md) and the record on disk is
    updated. Off by default; ``CNNLSTM_FAST_TUNE=1`` turns it on at import."""
    global _first_use
    _first_use = _Tuner({}, force=False) if enabled else None
    tuned.on_call = _first_use


def get_tuning() -> bool:
    """Whether tuning on first use is on (:func:`set_tuning`)."""
    return _first_use is not None


def _our_layers(model: nn.Module) -> dict[nn.Module, str]:
    """Our layers and cells in ``model`` -> their qualified names (the class name for
    the model itself)."""
    from ..nn.rnn import _BackendMixin

    return {m: name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, _BackendMixin)}


@contextlib.contextmanager
def _watching(hook: Callable) -> Iterator[None]:
    """``hook`` watches the calls for the block (then the previous watcher again)."""
    previous, tuned.on_call = tuned.on_call, hook
    try:
        yield
    finally:
        tuned.on_call = previous


class _Tuner:
    """The calls' watcher while tuning: times the candidates on each call whose
    signature this run has not timed yet (``force``: :func:`tune`) or the record lacks
    (tuning on first use), and records the fastest."""

    def __init__(self, names: dict[nn.Module, str], force: bool):
        self.names, self.force = names, force
        self.measured: dict[tuple, dict] = {}
        self.rows: list[dict] = []
        self._shown: set[tuple] = set()

    def __call__(self, module: nn.Module, input, hx) -> None:
        if (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or getattr(_busy, "active", False) or torch.are_deterministic_algorithms_enabled()):
            return
        spec = _spec_of(module, input, hx)
        if spec is None:
            return
        sig = tuned.signature(spec) if spec.device.type != "meta" else None
        if module.backend != "auto" or sig is None:
            self._row(module, sig, spec, None, f"backend={module.backend!r}: not tuned")
            return
        if not self.force and backends.get_default() != "auto":
            return  # auto resolves through the process default: the record is not asked
        entry = self.measured.get(sig)
        if entry is None and (self.force or tuned.lookup(spec) is None):
            with _lock:
                entry = self.measured[sig] = _measure(module, input, hx, spec, sig)
                if not self.force:
                    tuned.save()
        if entry is not None:
            self._row(module, sig, spec, entry, entry["choice"])

    def _row(self, module, sig, spec, entry, choice) -> None:
        name = self.names.get(module, type(module).__name__)
        if not self.force or (name, sig) in self._shown:
            return
        self._shown.add((name, sig))
        times = "" if entry is None else _format_times(entry)
        self.rows.append({"layer": name, "signature": "" if sig is None else tuned.describe(sig),
                          "median ms": times, "choice": choice, "rules": _rules_pick(spec)})


def _format_times(entry: dict) -> str:
    parts = [f"{name} {ms:.3g}" for name, ms in sorted(entry["times_ms"].items(), key=lambda i: i[1])]
    parts += [f"{name} ({why})" for name, why in entry["not_timed"].items()]
    return ", ".join(parts) or "only candidate"


class _Explainer(logging.Handler):
    """The calls' watcher of :func:`explain`: notes the layer whose call is resolving
    and collects the backends logger's record of its choice."""

    def __init__(self, names: dict[nn.Module, str]):
        super().__init__(logging.DEBUG)
        self.names = names
        self.current: tuple | None = None
        self.table_rows: list[dict] = []
        self._shown: set[tuple] = set()

    def __call__(self, module: nn.Module, input, hx) -> None:
        if torch.compiler.is_compiling():
            return
        spec = _spec_of(module, input, hx)
        sig = None if spec is None or spec.device.type == "meta" else tuned.signature(spec)
        self.current = (self.names.get(module, type(module).__name__), sig)

    def emit(self, record: logging.LogRecord) -> None:
        if self.current is None or self.current in self._shown:
            return
        self._shown.add(self.current)
        name, sig = self.current
        self.table_rows.append({"layer": name,
                                "signature": "" if sig is None else tuned.describe(sig),
                                "backend": record.backend, "why": getattr(record, "why", "")})


def _spec_of(module: nn.Module, input, hx) -> RecurrenceSpec | None:
    """The spec of the call, or None where the input is one forward will refuse."""
    try:
        return module._call_spec(input, hx)
    except Exception:  # forward raises torch.nn's error for it
        return None


def _measure(module: nn.Module, input, hx, spec: RecurrenceSpec, sig: tuple) -> dict:
    """Times the candidates on this call and records the fastest; the record's entry."""
    names = candidates(spec)
    start = time.perf_counter()
    times, not_timed = {}, {}
    if len(names) > 1:
        _busy.active = True
        try:  # the model's random number stream as if nothing had been timed
            with torch.random.fork_rng([spec.device.index or 0] if spec.device.type == "cuda" else []):
                grads: list[torch.Tensor] = []
                steps = {name: _step(module, name, input, hx, spec.needs_grad, grads) for name in names}
                times, not_timed = _time(steps, spec.device)
        finally:
            _busy.active = False
    if times:
        choice = min(times, key=lambda name: times[name]["median_ms"])
        rules = _rules_pick(spec)
        if rules in times and times[rules]["median_ms"] <= (1 + TIE_MARGIN) * times[choice]["median_ms"]:
            choice = rules
    else:
        choice = names[0] if len(names) == 1 else "torch"
    entry = tuned.remember(sig, choice, times, not_timed)
    _log.info("tuned %s on %s in %.2f s: %s -> %s", tuned.describe(sig), sig[0],
              time.perf_counter() - start, _format_times(entry), choice)
    return entry


def _rules_pick(spec: RecurrenceSpec) -> str:
    """What ``auto`` picks for ``spec`` without the record (an error's text where the
    process default cannot run it)."""
    try:
        return backends._resolve("auto", spec, record=False)[0].name
    except backends.BackendUnavailableError as error:
        return f"error: {error}"


def _step(module: nn.Module, name: str, input, hx, training: bool,
          grads: list[torch.Tensor]) -> Callable[[], None]:
    """One call of ``module`` with backend ``name`` on random inputs shaped as the
    call's (ConvToSequence's fused path shows an input without values); with
    ``training`` also its backward, into fresh gradients (the parameters' ``.grad``
    untouched) from one set of random output gradients."""
    x, h = _fresh(input), _fresh(hx)
    wrt = [p for p in module.parameters() if p.requires_grad]
    wrt += [t for t in _tensors((x, h)) if t.requires_grad]

    def run() -> None:
        with backends.use_backend(name):
            out = module.forward(x, h)
        if training and wrt:
            outs = [t for t in _tensors(out) if t.requires_grad]
            if not grads:
                grads.extend(torch.randn_like(t) for t in outs)
            torch.autograd.grad(outs, wrt, grads, allow_unused=True)

    return run


def _fresh(obj):
    """Random tensors in place of ``obj``'s floating-point ones, with their strides (a
    conv's output permuted to (T, B, C) takes another path than a contiguous input)
    where they are dense, each requiring grad as the one it replaces (a PackedSequence
    keeps its batch sizes and orders)."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            return obj
        return torch.randn_like(obj).requires_grad_(obj.requires_grad)
    if isinstance(obj, PackedSequence):
        return obj._replace(data=_fresh(obj.data))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fresh(item) for item in obj)
    return obj


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _time(steps: dict[str, Callable[[], None]], device: torch.device) -> tuple[dict, dict]:
    """(name -> timing summary, name -> why not timed): two warm-up calls each (the
    first pays one-time costs: oneDNN's primitives, packed weights, fresh memory; a
    candidate that fails, or whose second and third calls take PRUNE_FACTOR times the
    fastest's second, is dropped), then the timing module's interleaved CPU timing or
    interleaved CUDA events, as many repetitions as BUDGET_S holds by the warm-up's
    times."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm, not_timed = {}, {}
    for name, step in steps.items():
        try:
            for _ in range(2):
                start = time.perf_counter()
                step()
                sync()
                warm[name] = time.perf_counter() - start
        except Exception as error:  # a backend's "cannot run this input", an OOM, ...
            message = str(error).splitlines()[0] if str(error) else ""
            not_timed[name] = f"{type(error).__name__}: {message}"
    if not warm:
        return {}, not_timed
    fastest = min(warm.values())
    for name in [n for n, s in warm.items() if s > PRUNE_FACTOR * fastest]:
        start = time.perf_counter()  # one more: oneDNN's first backward spans two calls
        steps[name]()
        sync()
        warm[name] = time.perf_counter() - start
        if warm[name] > PRUNE_FACTOR * fastest:
            not_timed[name] = f"warm-up {warm.pop(name) * 1e3:.3g} ms > {PRUNE_FACTOR:g}x the fastest"
    timed = {name: steps[name] for name in warm}
    reps = max(MIN_REPS, min(MAX_REPS, int(BUDGET_S / sum(warm.values()))))
    if device.type == "cuda":
        return _time_cuda(timed, reps), not_timed
    from ..bench.timing import time_cpu

    return time_cpu(timed, reps, BUDGET_S, warmup=0), not_timed


def _time_cuda(steps: dict[str, Callable[[], None]], reps: int) -> dict[str, dict]:
    """CUDA events around each call, the candidates interleaved (rotated order)."""
    from ..bench.timing import summary

    names = list(steps)
    events = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            steps[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: {**summary([s.elapsed_time(e) for s, e in pairs]), "reps": len(pairs)}
            for name, pairs in events.items()}


_first_use: _Tuner | None = None

_setting = os.environ.get(ENV_VAR, "")
if _setting == "1":
    set_tuning(True)
elif _setting not in ("", "0"):
    warnings.warn(f"{ENV_VAR} must be 0 or 1, got {_setting!r}; tuning on first use stays off",
                  UserWarning, stacklevel=2)
