"""Shared test utilities: model pairs, inputs, and comparisons that explain failures."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import cnnlstm_fast as clf
from cnnlstm_fast import backends


def module_backends() -> list[str]:
    """Recurrence backends the module-level parity matrix runs on this machine.

    Triton runs its own (tiny) tests: under the CPU interpreter the full matrix
    would take far too long."""
    report = backends.backend_report()
    return [n for n in ("reference", "cpu") if report.get(n, "missing") is None]


def assert_close(actual, expected, rtol, atol, what=""):
    """torch.testing.assert_close that names the tensor and reports the worst element."""
    if isinstance(expected, PackedSequence):
        assert isinstance(actual, PackedSequence), f"{what}: expected a PackedSequence"
        assert torch.equal(actual.batch_sizes, expected.batch_sizes), f"{what}: batch_sizes"
        actual, expected = actual.data, expected.data
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs()
    if diff.numel():
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        detail = (
            f"{what}: max |diff| {diff.max().item():.3e} at {idx} "
            f"(got {actual[idx].item():.6g}, expected {expected[idx].item():.6g})"
        )
    else:
        detail = what
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=detail)


def errors_vs_exact(names, actual, exact) -> dict[str, float]:
    """Max |error| of each tensor against its exact (fp64) value, relative to
    max(1, max |exact|); pairs with a None are left out."""
    return {
        name: ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1)).item()
        for name, a, e in zip(names, actual, exact)
        if a is not None and e is not None
    }


def assert_as_accurate_as(names, ours, reference, exact):
    """Each tensor of ``ours`` at most twice as far from ``exact`` (fp64) as the same
    tensor of ``reference`` (the fp32 reference), plus the rtol 1e-5 of docs/design.md#testing: for
    sums over many steps and rows, two fp32 summation orders differ by more than any
    fixed tolerance between them allows."""
    for name, a in zip(names, ours):
        assert a is None or torch.isfinite(a).all(), f"{name}: non-finite values"
    got, ref = errors_vs_exact(names, ours, exact), errors_vs_exact(names, reference, exact)
    worse = {k: (got[k], ref[k]) for k in got if got[k] > 2 * ref[k] + 1e-5}
    assert not worse, f"errors vs fp64 (ours, fp32 reference): {worse}"


def make_pair(cls_name: str, backend: str, dtype=torch.float32, **kwargs):
    """(our module, torch.nn module) with identical weights."""
    ours = getattr(clf, cls_name)(**kwargs, backend=backend).to(dtype)
    theirs = getattr(nn, cls_name)(**kwargs).to(dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def make_packed(lengths, batch, input_size, dtype, enforce_sorted):
    steps = max(lengths)
    padded = torch.randn(steps, batch, input_size, dtype=dtype)
    return pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=enforce_sorted)


def leaves(obj) -> list[torch.Tensor]:
    """Tensors in a (nested) output, PackedSequence data included."""
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in leaves(o)]
    return []


def run_and_grad(module, inputs, outputs_seed=1234):
    """Runs ``module(*inputs)``, backpropagates fixed random cotangents and returns
    (outputs, grads of the input tensors, grads of the parameters by name)."""
    for t in leaves(inputs):
        t.grad = None
    module.zero_grad(set_to_none=True)
    out = module(*inputs)
    outs = leaves(out)
    gen = torch.Generator().manual_seed(outputs_seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    in_grads = [t.grad for t in leaves(inputs)]
    param_grads = {n: p.grad for n, p in module.named_parameters()}
    return out, in_grads, param_grads


def clone_inputs(inputs):
    """Deep copies of the inputs as fresh leaves requiring grad."""

    def one(x):
        if x is None:
            return None
        if isinstance(x, PackedSequence):
            data = x.data.detach().clone().requires_grad_(True)
            return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        if isinstance(x, tuple):
            return tuple(one(v) for v in x)
        return x.detach().clone().requires_grad_(True)

    return tuple(one(x) for x in inputs)


def spy_on_rows_ops(monkeypatch) -> list[str]:
    """Routes the module's cached-buffer ops (pad_rows, pack_rows, cat_features) through
    a recorder; returns the list their names are appended to, one per call."""
    import cnnlstm_fast.nn.rnn as rnn_module
    from cnnlstm_fast.backends import compiled

    ops, calls = compiled.ops(), []

    class Spy:
        def __getattr__(self, name):
            return lambda *a: calls.append(name) or getattr(ops, name)(*a)

    monkeypatch.setattr(rnn_module, "_ROWS_OPS", [Spy()])
    return calls
