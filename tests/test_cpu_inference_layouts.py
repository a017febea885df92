"""The cpu backend's inference path (recurrence_forward_from_input and its directions op)
on random module configurations and input layouts, against torch.nn: padded time-major
or batch-first, a conv output permuted to the sequence layout (strided features), packed
(with and without h0), with every cell, projection, no bias, both dtypes, one or two
threads, both directions orders and every cpu kernel setting. The inference path reads
each of these where it lies (packed rows stay packed, both directions write into one
output), so a wrong row offset or stride shows up here as a mismatch."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import cnnlstm_fast as clf
from cnnlstm_fast.backends import cpu as cpu_backend
from cnnlstm_fast.backends import get_backend

from helpers import assert_close

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.unavailable_reason() is not None,
                                reason=f"cpu backend: {CPU.unavailable_reason()}")

FORMS = ["padded", "conv", "packed", "packed_h0"]


def _case(seed: int) -> dict:
    rng = random.Random(seed)
    cell = rng.choice(["LSTM", "GRU", "RNN"])
    hidden = rng.choice([1, 7, 32, 64, 65, 130])
    case = dict(
        cell=cell, hidden=hidden, input=rng.choice([1, 3, 17, 64]), layers=rng.choice([1, 2, 3]),
        bidirectional=rng.random() < 0.6, batch_first=rng.random() < 0.5,
        bias=rng.random() < 0.8, batch=rng.choice([1, 2, 5, 16, 17]),
        steps=rng.choice([1, 2, 9, 40]),
        proj=rng.choice([0, 3]) if cell == "LSTM" and hidden > 3 else 0,
        dtype=rng.choice([torch.float32, torch.float64]), form=FORMS[seed % len(FORMS)],
        threads=rng.choice([1, 2]), order=rng.choice(list(cpu_backend.DIRECTIONS)),
        kernel=rng.choice(["auto", "per_step", "persistent"]),
        nonlinearity=rng.choice(["tanh", "relu"]),
    )
    case["lengths"] = [rng.randint(1, case["steps"]) for _ in range(case["batch"])]
    return case


@pytest.mark.parametrize("seed", range(32))
def test_inference_matches_torch_nn_on_every_input_layout(seed):
    c = _case(seed)
    kw = dict(num_layers=c["layers"], bidirectional=c["bidirectional"],
              batch_first=c["batch_first"], bias=c["bias"])
    if c["proj"]:
        kw["proj_size"] = c["proj"]
    if c["cell"] == "RNN":
        kw["nonlinearity"] = c["nonlinearity"]
    torch.manual_seed(seed)
    theirs = getattr(torch.nn, c["cell"])(c["input"], c["hidden"], **kw).to(c["dtype"]).eval()
    ours = getattr(clf, c["cell"])(c["input"], c["hidden"], **kw, backend="cpu")
    ours = ours.to(c["dtype"]).eval()
    ours.load_state_dict(theirs.state_dict())
    B, T, I = c["batch"], c["steps"], c["input"]
    if c["form"] == "conv":  # a conv's (B, C, T) output handed over as a view
        raw = torch.randn(B, I, T, dtype=c["dtype"])
        x = raw.transpose(1, 2) if c["batch_first"] else raw.permute(2, 0, 1)
        assert x.stride(-1) == T  # strided features (contiguous again only where T is 1)
    else:
        x = torch.randn(*((B, T) if c["batch_first"] else (T, B)), I, dtype=c["dtype"])
    args = (x,)
    if c["form"].startswith("packed"):
        args = (pack_padded_sequence(x, torch.tensor(c["lengths"]), batch_first=c["batch_first"],
                                     enforce_sorted=False),)
        if c["form"] == "packed_h0":
            states = c["layers"] * (2 if c["bidirectional"] else 1)
            h0 = torch.randn(states, B, c["proj"] or c["hidden"], dtype=c["dtype"])
            c0 = torch.randn(states, B, c["hidden"], dtype=c["dtype"])
            args += ((h0, c0) if c["cell"] == "LSTM" else h0,)
    before = torch.get_num_threads()
    torch.set_num_threads(c["threads"])
    try:
        with torch.no_grad(), cpu_backend.use_directions(c["order"]), \
                cpu_backend.use_kernel(c["kernel"]):
            got, want = ours(*args), theirs(*args)
    finally:
        torch.set_num_threads(before)

    def flat(out):
        y = out[0].data if isinstance(out[0], torch.nn.utils.rnn.PackedSequence) else out[0]
        return [y, *(out[1] if isinstance(out[1], tuple) else (out[1],))]

    tol = dict(rtol=1e-5, atol=1e-5) if c["dtype"] == torch.float32 else \
        dict(rtol=1e-10, atol=1e-10)
    for i, (a, b) in enumerate(zip(flat(got), flat(want))):
        assert_close(a, b, **tol, what=f"output {i} of {c}")
