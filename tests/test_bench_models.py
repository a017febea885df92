"""The whole-model bench suite (cnnlstm_fast/bench/zoo.py): each model, swapped onto our
layers, computes what the torch.nn model computes, so the suite times the same function
on both sides. Tiny shapes here; the suite's own are in zoo.SHAPES."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cnnlstm_fast.bench import providers, suites, zoo
from helpers import module_backends

SMALL = {"deepconvlstm": dict(batch=3, steps=20), "crnn": dict(batch=2, steps=5),
         "lrcn": dict(batch=2, steps=3), "textrnn": dict(batch=5, steps=12),
         "seq2seq": dict(batch=3, steps=6), "stacked": dict(batch=2, steps=7)}


def _small_config(shape: dict, cell: str) -> suites.Config:
    cfg = suites.Config(cell=cell, **shape)
    return dataclasses.replace(cfg, **SMALL[cfg.model], hidden_size=8,
                               input_size=cfg.input_size if cfg.model != "textrnn" else 6)


@pytest.mark.parametrize("backend", [*module_backends(), "auto"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shape", suites.shapes("models", "cpu"), ids=lambda s: s["model"])
def test_each_swapped_model_computes_what_the_torch_nn_model_does(shape, cell, backend):
    cfg = _small_config(shape, cell)
    theirs = providers.build_model(cfg, "torch")
    ours = providers.build_model(cfg, backend)
    assert any(type(m).__module__.startswith("cnnlstm_fast") for m in ours.modules()), \
        "nothing was swapped: the suite would time torch.nn against itself"
    ours.load_state_dict(theirs.state_dict())
    x = providers.model_input(cfg)
    for module in (theirs, ours):
        module.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    grads = []
    for module in (theirs, ours):
        module.train()
        torch.manual_seed(0)  # the same dropout masks
        module.zero_grad()
        module(x).square().mean().backward()
        grads.append([p.grad for p in module.parameters()])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_models_suite_has_every_model_on_each_device():
    for device in ("cpu", "cuda"):
        names = {shape["model"] for shape in suites.shapes("models", device)}
        assert names == set(zoo.MODELS), f"{device}: {names}"


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_the_tuned_provider_tunes_in_a_record_of_its_own(tmp_path, monkeypatch, mode):
    """``tuned``: the model tuned on the configuration (cnnlstm_fast.tune) in a record of
    its own; its step follows that record while the process's record (what ``auto``
    follows) stays as it was, empty here; a bare layer or a cell is skipped."""
    from cnnlstm_fast.backends import tuned

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tuned.reset()
    shape = next(s for s in suites.shapes("models", "cpu") if s["model"] == "stacked")
    cfg = dataclasses.replace(_small_config(shape, "gru"), mode=mode, steps=20)  # past the
    # short calls auto leaves to torch.nn without asking the record
    steps, skipped = providers.config_steps(cfg, [providers.TUNED, providers.AUTO],
                                            providers.LIMITS)
    assert not skipped and set(steps) == {providers.TUNED, providers.AUTO}
    assert tuned.entries() == {} and not list(tmp_path.rglob("*.json"))
    with providers.auto_choices() as names:
        steps[providers.TUNED]()
    assert names and tuned.entries() == {}
    # the tuned record was followed: explain's reason for each call says "tuned"
    import logging

    whys = []

    class Collect(logging.Handler):
        def emit(self, record):
            whys.append(str(getattr(record, "why", "")))

    logger = logging.getLogger("cnnlstm_fast.backends")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        steps[providers.TUNED]()
        tuned_whys, whys[:] = list(whys), []
        steps[providers.AUTO]()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert tuned_whys and all("tuned on this machine" in w for w in tuned_whys)
    assert whys and not any("tuned on this machine" in w for w in whys)
    layer = suites.Config(cell="gru", batch=2, steps=4, input_size=3, hidden_size=4)
    _, skipped = providers.config_steps(layer, [providers.TUNED], providers.LIMITS)
    assert "whole models only" in skipped[providers.TUNED]
