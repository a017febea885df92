"""The things timed side by side: torch.nn (the baseline), our layers with
``backend="auto"`` (what a user who names no backend gets), each of our backends,
torch.compile of the ``reference`` recurrence and FlashRNN. Each provider turns a
:class:`Config` into a step closure on fixed random data, or raises :class:`Skip`
with the reason it cannot run that configuration here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

import cnnlstm_fast

from .suites import DTYPES_TORCH as DTYPES
from . import zoo
from .suites import CELL_LOOP, FRAME, GATES, Config

BASELINE = "torch.nn"
AUTO = "auto"
#: Our layers with ``backend="auto"`` after ``cnnlstm_fast.tune`` on the configuration,
#: in a tuning record of their own (the user's record and ``auto``'s rows untouched).
TUNED = "tuned"
COMPILED = "torch.compile"
FLASHRNN = "flashrnn"
LAYERS = {"lstm": (nn.LSTM, cnnlstm_fast.LSTM), "gru": (nn.GRU, cnnlstm_fast.GRU)}
CELL_MODULES = {"lstm": (nn.LSTMCell, cnnlstm_fast.LSTMCell), "gru": (nn.GRUCell, cnnlstm_fast.GRUCell)}

#: Cost limits, in sequential steps (T x layers x directions). ``reference`` makes a
#: few PyTorch calls per step; torch.compile unrolls the loop, so its compile time
#: grows with the steps (~40 s for 16 steps on a CPU core).
LIMITS = {"reference": 1024, COMPILED: 64}


class Skip(Exception):
    """A provider cannot (or should not) run a configuration; the message says why."""


def default_providers(device_type: str) -> list[str]:
    """torch.nn, ``auto``, our available backends (``torch`` is torch.nn itself, so left
    out), torch.compile on CUDA (on CPU its compile time is too long for a default),
    FlashRNN."""
    ours = [b for b in cnnlstm_fast.available_backends() if b != "torch"]
    return [BASELINE, AUTO, *ours, *([COMPILED] if device_type == "cuda" else []), FLASHRNN]


def known_providers() -> list[str]:
    return [BASELINE, AUTO, TUNED, *cnnlstm_fast.available_backends(), COMPILED, FLASHRNN]


@contextlib.contextmanager
def auto_choices() -> Iterator[list[str]]:
    """Collects the names of the backends that modules asking for ``auto`` resolve to
    while the block runs, from the DEBUG records of ``cnnlstm_fast.backends`` (which
    do not propagate to the root logger meanwhile)."""
    names: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            if getattr(record, "requested", None) == AUTO:
                names.append(record.backend)

    logger = logging.getLogger("cnnlstm_fast.backends")
    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _check_limit(cfg: Config, provider: str, limits: dict[str, int]) -> None:
    limit = limits.get(provider)
    if limit is not None and cfg.recurrent_steps > limit:
        raise Skip(f"{cfg.recurrent_steps} sequential steps (T x layers x directions) "
                   f"> limit {limit} for {provider}; raise it with --limit {provider}=N")


def _flashrnn() -> Callable:
    try:
        from flashrnn import flashrnn
    except Exception as error:  # not installed, or a broken install
        raise Skip(f"flashrnn not importable ({type(error).__name__}: {error})") from None
    return flashrnn


def _layer_step(cfg: Config, module: Callable, dtype: torch.dtype, params) -> Callable[[], None]:
    x = torch.randn(cfg.steps, cfg.batch, cfg.input_size, device=cfg.device, dtype=dtype)
    if cfg.mode == "forward":

        def forward():
            with torch.no_grad():
                module(x)

        return forward
    x.requires_grad_(True)
    dy = torch.randn(cfg.steps, cfg.batch, cfg.hidden_size * cfg.directions,
                     device=cfg.device, dtype=dtype)
    inputs = [x, *params]

    def forward_backward():
        y, _ = module(x)
        torch.autograd.grad(y, inputs, dy)

    return forward_backward


def _flashrnn_step(cfg: Config, dtype: torch.dtype) -> Callable[[], None]:
    """FlashRNN's fused kernel on one layer, one direction, one head of size H: the
    recurrence only (its input is G_x), so it is timed against slightly less work."""
    flashrnn = _flashrnn()
    if cfg.layers != 1 or cfg.directions != 1 or not cfg.device.startswith("cuda"):
        raise Skip("flashrnn: one layer, one direction, CUDA only")
    gates, hidden = GATES[cfg.cell], cfg.hidden_size
    grad = cfg.mode == "forward_backward"
    make = lambda *shape: torch.randn(*shape, device=cfg.device, dtype=dtype, requires_grad=grad)  # noqa: E731
    wx = make(cfg.batch, cfg.steps, gates, 1, hidden)
    r = make(gates, 1, hidden, hidden)
    b = make(gates, 1, hidden)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]

    def run():
        return flashrnn(wx, r, b, function=cfg.cell, backend="cuda_fused", dtype=name)[0]

    if not grad:
        def forward():
            with torch.no_grad():
                run()
        return forward

    def forward_backward():
        y = run()
        torch.autograd.grad(y, [wx, r, b], torch.ones_like(y))

    return forward_backward


def layer_steps(cfg: Config, providers: list[str], limits: dict[str, int]) -> tuple[dict, dict]:
    """(provider -> step closure, provider -> skip reason) for a bare-layer config; every
    module has the baseline's weights."""
    torch_cls, our_cls = LAYERS[cfg.cell]
    dtype = DTYPES[cfg.dtype]
    kwargs = dict(num_layers=cfg.layers, bidirectional=cfg.directions == 2,
                  device=cfg.device, dtype=dtype)
    baseline = torch_cls(cfg.input_size, cfg.hidden_size, **kwargs)
    steps, skipped = {}, {}
    for provider in providers:
        try:
            _check_limit(cfg, provider, limits)
            if provider == TUNED:
                raise Skip(f"{TUNED}: whole models only (--suite models)")
            if provider == BASELINE:
                steps[provider] = _layer_step(cfg, baseline, dtype, list(baseline.parameters()))
            elif provider == FLASHRNN:
                steps[provider] = _flashrnn_step(cfg, dtype)
            else:
                backend = "reference" if provider == COMPILED else provider
                module = our_cls(cfg.input_size, cfg.hidden_size, backend=backend, **kwargs)
                module.load_state_dict(baseline.state_dict())
                run = torch.compile(module) if provider == COMPILED else module
                steps[provider] = _layer_step(cfg, run, dtype, list(module.parameters()))
        except Skip as why:
            skipped[provider] = str(why)
    return steps, skipped


def _models():
    try:
        from cnnlstm_fast import models
        return models.CNNLSTM
    except Exception as error:
        raise Skip(f"cnnlstm_fast.models.CNNLSTM not importable ({type(error).__name__}: {error})") from None


def model_input(cfg: Config) -> torch.Tensor:
    if cfg.model in zoo.MODELS:
        return zoo.example_input(cfg, DTYPES[cfg.dtype])
    shape = (cfg.batch, cfg.steps, cfg.input_size)
    if cfg.model == "cnnlstm-2d":
        shape += (FRAME, FRAME)
    return torch.randn(*shape, device=cfg.device, dtype=DTYPES[cfg.dtype])


def build_model(cfg: Config, backend: str) -> nn.Module:
    """CNNLSTM with ``backend``; a zoo model (torch.nn layers) swapped to ``backend``
    (``torch``: left on torch.nn, the baseline)."""
    if cfg.model in zoo.MODELS:
        model = zoo.build(cfg, DTYPES[cfg.dtype])
        return model if backend == "torch" else cnnlstm_fast.swap(model, backend=backend)
    cnnlstm = _models()
    return cnnlstm(cfg.input_size, 10, conv=cfg.model.split("-")[1], rnn=cfg.cell,
                   hidden_size=cfg.hidden_size, num_layers=cfg.layers,
                   bidirectional=cfg.directions == 2, backend=backend).to(
        device=cfg.device, dtype=DTYPES[cfg.dtype])


def _model_step(cfg: Config, model: nn.Module) -> Callable[[], None]:
    x = model_input(cfg)
    if cfg.mode == "forward":
        model.eval()

        def forward():
            with torch.no_grad():
                model(x)

        return forward
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step():
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def _tuned_model_step(cfg: Config, model: nn.Module) -> Callable[[], None]:
    """``model`` (``backend="auto"``) tuned on ``cfg``'s input and mode by
    ``cnnlstm_fast.tune`` (whole-model check included) in a record of its own, written
    to a temporary directory; its step runs with that record in place of the process's."""
    import tempfile

    from cnnlstm_fast.backends import tuned

    step = _model_step(cfg, model)  # sets train() or eval()
    x = model_input(cfg)
    with tempfile.TemporaryDirectory() as cache, _cache_home(cache), \
            tuned.swapped(tuned.EMPTY), torch.set_grad_enabled(cfg.mode != "forward"):
        cnnlstm_fast.tune(model, x)
        record = tuned.snapshot()

    def run():
        with tuned.swapped(record):
            step()

    return run


@contextlib.contextmanager
def _cache_home(path: str) -> Iterator[None]:
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = before


def model_flops(cfg: Config) -> int:
    """FLOPs of one forward (x3 for a training step) counted by FlopCounterMode on the
    model with the ``reference`` backend, whose every matmul is a visible aten op."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(dataclasses.replace(cfg, device="cpu", dtype="float32"), "reference").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(model_input(dataclasses.replace(cfg, device="cpu", dtype="float32")))
    return counter.get_total_flops() * (3 if cfg.mode == "forward_backward" else 1)


def _cell_loop_step(cfg: Config, cell: nn.Module, dtype: torch.dtype, params) -> Callable[[], None]:
    """The cell called once per step from Python, its state carried (a decoder's loop),
    timed as a layer: the loop returns (outputs, last state)."""

    def loop(inputs):
        state, outs = None, []
        for t in range(cfg.steps):
            state = cell(inputs[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs), state

    return _layer_step(cfg, loop, dtype, params)


def cell_steps(cfg: Config, providers: list[str], limits: dict[str, int]) -> tuple[dict, dict]:
    """As :func:`layer_steps` for a cell loop (``cfg.model == "cell"``): nn.LSTMCell /
    nn.GRUCell against ours, called once per step."""
    if cfg.layers != 1 or cfg.directions != 1:
        return {}, {p: "a cell loop has one layer and one direction" for p in providers}
    torch_cls, our_cls = CELL_MODULES[cfg.cell]
    dtype = DTYPES[cfg.dtype]
    baseline = torch_cls(cfg.input_size, cfg.hidden_size, device=cfg.device, dtype=dtype)
    steps, skipped = {}, {}
    for provider in providers:
        try:
            _check_limit(cfg, provider, limits)
            if provider in (COMPILED, FLASHRNN, TUNED):
                raise Skip(f"{provider}: not a cell")
            cell = baseline
            if provider != BASELINE:
                cell = our_cls(cfg.input_size, cfg.hidden_size, backend=provider,
                               device=cfg.device, dtype=dtype)
                cell.load_state_dict(baseline.state_dict())
            steps[provider] = _cell_loop_step(cfg, cell, dtype, list(cell.parameters()))
        except Skip as why:
            skipped[provider] = str(why)
    return steps, skipped


def config_steps(cfg: Config, providers: list[str], limits: dict[str, int]) -> tuple[dict, dict]:
    """(provider -> step closure, provider -> skip reason) for any configuration."""
    if cfg.model == CELL_LOOP:
        return cell_steps(cfg, providers, limits)
    return (model_steps if cfg.model else layer_steps)(cfg, providers, limits)


def model_steps(cfg: Config, providers: list[str], limits: dict[str, int]) -> tuple[dict, dict]:
    """As :func:`layer_steps` for a whole CNN-LSTM; the baseline is backend="torch"
    (torch.nn layers). A training step is forward, loss, backward and an SGD step."""
    steps, skipped = {}, {}
    try:
        baseline = build_model(cfg, "torch")
    except Skip as why:
        return {}, {p: str(why) for p in providers}
    for provider in providers:
        try:
            _check_limit(cfg, provider, limits)
            if provider in (COMPILED, FLASHRNN):
                raise Skip(f"{provider}: not a CNNLSTM backend")
            if provider == BASELINE:
                model = baseline
            else:
                model = build_model(cfg, AUTO if provider == TUNED else provider)
                model.load_state_dict(baseline.state_dict())
            steps[provider] = (_tuned_model_step(cfg, model) if provider == TUNED
                               else _model_step(cfg, model))
        except Skip as why:
            skipped[provider] = str(why)
    return steps, skipped


def step_for(cfg: Config, provider: str, limits: dict[str, int] = LIMITS) -> Callable[[], None]:
    """One provider's warmed-up step on ``cfg`` (the pytest-benchmark suite's unit);
    raises :class:`Skip` when it cannot run it."""
    steps, skipped = config_steps(cfg, [provider], limits)
    if provider in skipped:
        raise Skip(skipped[provider])
    step = steps[provider]
    try:
        step()
    except Exception as error:
        raise Skip(f"{type(error).__name__}: {error}") from None
    return step
