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
