"""The drop-in contract (types, parameters, state_dict, repr) and backend selection."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import cnnlstm_fast as clf
from cnnlstm_fast import _ext, backends
from cnnlstm_fast.backends import BackendUnavailableError, RecurrenceSpec
from cnnlstm_fast.backends import cpu as cpu_backend
from cnnlstm_fast.backends import tuned
from helpers import assert_close, leaves, make_pair, module_backends, run_and_grad

CLASSES = [
    ("LSTM", dict(input_size=5, hidden_size=6, num_layers=2, bidirectional=True, proj_size=4)),
    ("GRU", dict(input_size=5, hidden_size=6, num_layers=3, bias=False)),
    ("RNN", dict(input_size=5, hidden_size=6, nonlinearity="relu", batch_first=True)),
    ("LSTMCell", dict(input_size=5, hidden_size=6)),
    ("GRUCell", dict(input_size=5, hidden_size=6, bias=False)),
    ("RNNCell", dict(input_size=5, hidden_size=6, nonlinearity="relu")),
]


@pytest.mark.parametrize("cls_name,kwargs", CLASSES, ids=lambda v: str(v))
def test_is_a_torch_module_with_the_same_parameters(cls_name, kwargs):
    torch.manual_seed(3)
    ours = getattr(clf, cls_name)(**kwargs)
    torch.manual_seed(3)
    theirs = getattr(nn, cls_name)(**kwargs)
    assert isinstance(ours, getattr(nn, cls_name))
    ours_params = list(ours.named_parameters())
    theirs_params = list(theirs.named_parameters())
    assert [n for n, _ in ours_params] == [n for n, _ in theirs_params]
    for (name, a), (_, b) in zip(ours_params, theirs_params):
        assert a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: initialisation differs from torch.nn"
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("cls_name,kwargs", CLASSES, ids=lambda v: str(v))
def test_state_dict_both_ways(cls_name, kwargs):
    ours = getattr(clf, cls_name)(**kwargs)
    theirs = getattr(nn, cls_name)(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    fresh = getattr(nn, cls_name)(**kwargs)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for (n, a), (_, b) in zip(fresh.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("cls_name,kwargs", CLASSES, ids=lambda v: str(v))
def test_repr_signature_copy_pickle(cls_name, kwargs):
    ours = getattr(clf, cls_name)(**kwargs, backend="reference")
    theirs = getattr(nn, cls_name)(**kwargs)
    assert repr(ours) == repr(theirs)[:-1] + ", backend='reference')"
    ours_sig = inspect.signature(type(ours))
    assert ours_sig.parameters["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours_sig.parameters["backend"].default == "auto"
    theirs_names = [p for p in inspect.signature(type(theirs)).parameters]
    if theirs_names != ["args", "kwargs"]:  # overloaded constructors show (*args, **kwargs)
        assert [p for p in ours_sig.parameters if p != "backend"] == theirs_names
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is type(ours) and clone.backend == "reference"
        for a, b in zip(clone.parameters(), ours.parameters()):
            assert torch.equal(a, b)


def test_subclass_signatures():
    """A subclass without a constructor of its own shows ours; one with its own shows
    that one (not ours pasted over it)."""

    class Plain(clf.LSTM):
        pass

    class Own(clf.LSTM):
        def __init__(self, width: int, *, depth: int = 2):
            super().__init__(3, width, num_layers=depth)

    assert inspect.signature(Plain) == inspect.signature(clf.LSTM)
    assert list(inspect.signature(Own).parameters) == ["width", "depth"]
    assert Own(4).hidden_size == 4


@pytest.mark.parametrize("backend", module_backends())
def test_parametrized_like_torch_nn(backend):
    """torch.nn.utils.parametrize puts a class of its own on top of a parametrized
    module's: our layers take weight_norm/spectral_norm/orthogonal as torch.nn's do and
    compute the same. (Eval mode: in training spectral_norm runs a power iteration at
    every read of the weight, and torch.nn reads each weight more often than we do.)"""
    from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

    ours, theirs = make_pair("LSTM", backend, input_size=3, hidden_size=4, num_layers=2, proj_size=2)
    for module in (ours, theirs):
        weight_norm(module, "weight_hh_l0")
        spectral_norm(module, "weight_ih_l1")
        orthogonal(module, "weight_hr_l1")
    ours.load_state_dict(theirs.state_dict())
    assert type(ours).__name__ == "ParametrizedLSTM" and isinstance(ours, clf.LSTM)
    assert inspect.signature(type(ours)) == inspect.signature(clf.LSTM)
    ours.eval(), theirs.eval()
    x = torch.randn(5, 2, 3)
    got, want = run_and_grad(ours, (x.clone().requires_grad_(),)), run_and_grad(theirs, (x.clone().requires_grad_(),))
    for a, b in zip(leaves(got[0]), leaves(want[0])):
        assert_close(a, b, 1e-5, 1e-6, what="output")
    assert_close(got[1][0], want[1][0], 1e-5, 1e-6, what="d input")
    for name, grad in want[2].items():
        assert_close(got[2][name], grad, 1e-5, 1e-6, what=f"d {name}")


def test_flatten_parameters_exists_and_keeps_working():
    ours, theirs = make_pair("LSTM", "reference", input_size=3, hidden_size=4)
    ours.flatten_parameters()
    x = torch.randn(2, 2, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-5, atol=1e-6)


def test_torch_backend_is_torch_nn_bit_for_bit():
    ours, theirs = make_pair("LSTM", "torch", input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(6, 2, 3)
    assert torch.equal(ours(x)[0], theirs(x)[0])


def _spec(device="cpu", dtype=torch.float32):
    return RecurrenceSpec("lstm", 4, 0, False, torch.device(device), dtype, 2, 3, False)


def test_registry_and_auto_resolution():
    names = clf.available_backends()
    assert {"reference", "torch"} <= set(names)
    report = backends.backend_report()
    assert report["reference"] is None and report["torch"] is None
    # auto picks from the dispatch table, which ends with torch, and never the slow spec
    chosen = backends.resolve("auto", _spec())
    assert chosen.name in [name for name, _ in backends.AUTO_PREFERENCE["cpu"]]
    assert chosen.name != "reference"
    assert names[-1] == "reference"  # best first: the slow specification comes last
    assert backends.resolve("reference", _spec()).name == "reference"


def _cpu(cell, hidden, batch, steps, needs_grad=False, dtype=torch.float32, proj=0,
         packed=False):
    return RecurrenceSpec(cell, hidden, proj, False, torch.device("cpu"), dtype, batch, steps,
                          packed, needs_grad)


def test_auto_follows_the_measured_rules(monkeypatch):
    """auto takes a backend only where its rule (backed by benchmark results) says it
    beats torch.nn, and torch.nn everywhere else."""
    for device, rules in backends.AUTO_PREFERENCE.items():
        assert rules[-1] == ("torch", None), device
    expect_cpu = backends.backend_report().get("cpu") is None

    def picks(spec):
        return backends.resolve("auto", spec).name == "cpu"

    # With BLAS GEMMs: the rule measured on the Xeon.
    with contextlib.ExitStack() as stack:
        if expect_cpu:
            stack.enter_context(cpu_backend.use_gemm("blas"))
        assert picks(_cpu("gru", 4, 2, 8)) == expect_cpu
        assert not picks(_cpu("gru", 4, 2, 7))  # fewer steps than AUTO_MIN_STEPS: torch.nn
        assert not picks(_spec())  # small LSTM: oneDNN is faster
        assert picks(_cpu("lstm", 1024, 16, 8)) == expect_cpu
        assert not picks(_cpu("gru", 4, 512, 8))
        assert not picks(_cpu("gru", 4, 2, 8, dtype=torch.bfloat16))  # cpu has no bf16

    if not expect_cpu:
        pytest.skip(f"the cpu backend is unavailable ({backends.backend_report()['cpu']}): "
                    "auto never picks it, so the rules of its GEMMs cannot be told apart")
    # cpu.set_gemm("auto") runs our AVX-512 GEMM where the CPU has AVX-512, and BLAS (the
    # rule above) where it has not; which one runs is asked again after each set_gemm,
    # not remembered once.
    for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    avx512 = _ext.load().cpu_gemm_info()["avx512_supported"]
    avx512_only, blas_only = _cpu("lstm", 256, 1, 32), _cpu("lstm", 512, 16, 32, needs_grad=True)
    for setting, rule_is_avx512 in (("auto", avx512), ("blas", False), ("auto", avx512)):
        with cpu_backend.use_gemm(setting):
            rule = "AVX-512" if rule_is_avx512 else "BLAS"
            assert picks(avx512_only) == rule_is_avx512, f"{setting}: expected the {rule} rule"
            assert picks(blas_only) != rule_is_avx512, f"{setting}: expected the {rule} rule"

    # With our AVX-512 GEMM: the rule measured on the AMD EPYC, with glibc's malloc as
    # it comes. A CPU without AVX-512 never runs it: check the rule there as one with it
    # would follow it.
    if not avx512:
        monkeypatch.setattr(backends, "_cpu_gemm_is_avx512", lambda: True)
    # The rows measured on full-rate 512-bit FMA cores (Zen 5), whatever this CPU has;
    # the half-rate ones (Zen 4) at the end.
    monkeypatch.setattr(backends, "_cpu_avx512_full_rate", lambda: True)
    assert picks(_cpu("gru", 256, 256, 32, needs_grad=True))
    assert picks(_cpu("gru", 256, 1, 8)) and not picks(_cpu("gru", 256, 1, 4))  # short-seq
    assert not picks(_cpu("lstm", 256, 1, 1, needs_grad=True))  # one step: the cells' calls
    assert not picks(_cpu("gru", 256, 512, 32))  # beyond the measured batches
    assert picks(_cpu("lstm", 128, 1, 1000))  # small batch, long sequence
    assert picks(_cpu("lstm", 256, 1, 32))  # inference up to batch 16
    assert picks(_cpu("lstm", 1024, 16, 32))
    assert not picks(_cpu("lstm", 256, 32, 32))  # 0.95x-1.0x from batch 32: oneDNN
    assert not picks(_cpu("lstm", 64, 16, 32))  # below the measured hidden sizes
    assert picks(_cpu("lstm", 64, 8, 256))  # the persistent path's small batches
    assert picks(_cpu("lstm", 256, 2, 32, needs_grad=True))  # training at batch <= 2
    assert not picks(_cpu("lstm", 256, 8, 32, needs_grad=True))  # 0.94x-1.0x: torch.nn
    assert picks(_cpu("lstm", 1024, 16, 32, needs_grad=True))
    assert not picks(_cpu("lstm", 512, 16, 32, needs_grad=True))  # 0.94x-1.43x: torch.nn
    assert picks(_cpu("lstm", 256, 64, 128, needs_grad=True))  # 32 MiB of activations
    assert not picks(_cpu("lstm", 256, 128, 32, needs_grad=True))  # 16 MiB: not above
    # packed (unequal lengths): torch.nn's step loop, not oneDNN
    assert picks(_cpu("lstm", 256, 32, 32, packed=True))
    assert picks(_cpu("lstm", 128, 64, 64, needs_grad=True, packed=True))
    assert not picks(_cpu("lstm", 64, 1, 32, packed=True))  # one length: oneDNN runs it
    assert not picks(_cpu("lstm", 256, 200, 32, packed=True))  # beyond the measured batches
    # A malloc that keeps freed memory spares torch.nn its page faults: only the small
    # batches stay with the cpu backend.
    for keeps in [("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824"),
                  ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")]:
        with monkeypatch.context() as env:
            env.setenv(*keeps)
            assert not picks(_cpu("lstm", 256, 64, 128, needs_grad=True)), keeps
            assert not picks(_cpu("lstm", 1024, 16, 32, needs_grad=True)), keeps
            assert picks(_cpu("lstm", 128, 4, 1000, needs_grad=True)), keeps
            assert picks(_cpu("gru", 256, 64, 128, needs_grad=True)), keeps
    # A threshold below glibc's own ceiling (32 MiB) still unmaps torch.nn's buffers; the
    # environment alias and glibc's number formats count too.
    for tunables, keeps in [("glibc.malloc.mmap_threshold=65536", False),
                            ("glibc.malloc.mmap_threshold=lots", False),
                            ("glibc.malloc.mmap_threshold=0x2000000", True),
                            ("glibc.malloc.mmap_threshold=0200000000", True)]:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
        assert picks(_cpu("lstm", 256, 64, 128, needs_grad=True)) != keeps, tunables
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert not picks(_cpu("lstm", 256, 64, 128, needs_grad=True))
    # glibc before 2.35 ignores a threshold above 32 MiB.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    monkeypatch.setattr(backends, "_glibc_version", lambda: (2, 31))
    assert picks(_cpu("lstm", 256, 64, 128, needs_grad=True))
    monkeypatch.setattr(backends, "_glibc_version", lambda: (2, 36))
    assert not picks(_cpu("lstm", 256, 64, 128, needs_grad=True))
    assert not picks(_cpu("lstm", 128, 1, 1000, proj=64))  # projections: unmeasured
    assert not picks(_cpu("rnn_tanh", 128, 1, 1000))
    # float64 keeps the BLAS rule
    assert picks(_cpu("lstm", 1024, 16, 8, dtype=torch.float64))
    # Half-rate 512-bit FMAs (Zen 4): LSTM batch 8-256 measured 0.82x-0.93x, so only
    # batch <= 2, the long sequences and the training rows that rest on torch.nn's page
    # faults keep the cpu backend; the GRU keeps it everywhere.
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(backends, "_cpu_avx512_full_rate", lambda: False)
    assert not picks(_cpu("lstm", 256, 16, 64))  # 0.90x: the stacked BiLSTM's shape
    assert not picks(_cpu("lstm", 1024, 16, 32))  # 0.82x
    assert picks(_cpu("lstm", 256, 2, 32)) and picks(_cpu("lstm", 128, 1, 1000))
    assert not picks(_cpu("lstm", 64, 1, 32))  # below the measured hidden sizes
    assert picks(_cpu("lstm", 128, 8, 1000, needs_grad=True))
    assert not picks(_cpu("lstm", 256, 2, 32, needs_grad=True))  # 0.95x
    assert picks(_cpu("lstm", 256, 64, 128, needs_grad=True))  # 32 MiB of activations
    assert picks(_cpu("lstm", 1024, 16, 32, needs_grad=True))
    assert picks(_cpu("gru", 256, 16, 64)) and picks(_cpu("lstm", 256, 32, 32, packed=True))


def test_the_fma_rate_is_measured_once_and_kept(monkeypatch):
    """``avx512_full_rate`` comes from the extension's timing (fma512_ratio ~2 on full-rate
    cores, ~1 on Zen 4), taken once per process: the same ratio at every ask."""
    module = _ext.load()
    if module is None:
        pytest.skip("the extension is not built")
    first = module.cpu_gemm_info()["fma512_ratio"]
    assert module.cpu_gemm_info()["fma512_ratio"] == first
    if not module.cpu_gemm_info()["avx512_supported"]:
        assert first == 0.0 and not backends._cpu_avx512_full_rate()
        return
    assert 0.5 < first < 3.0, first  # 16 lanes against 8, at the same or half the rate
    assert backends._cpu_avx512_full_rate() == (first >= backends._FULL_RATE_RATIO)


def test_short_calls_resolve_to_torch_without_a_spec(caplog, monkeypatch):
    """The cells (one step a call) and calls shorter than AUTO_MIN_STEPS run torch.nn's
    forward under auto, decided before any spec is built (a cell's call is ~45 us at batch
    1, hidden 256: the rules' cost would show); named backends still run."""
    seen = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, spec: seen.append(spec) or real(name, spec))
    with caplog.at_level(logging.DEBUG, logger="cnnlstm_fast.backends"):
        clf.LSTMCell(3, 4)(torch.randn(2, 3))
        clf.GRU(3, 4)(torch.randn(backends.AUTO_MIN_STEPS["cpu"] - 1, 2, 3))
        clf.GRUCell(3, 4, backend="torch")(torch.randn(2, 3))
        clf.GRUCell(3, 4, backend="reference")(torch.randn(2, 3))
    assert len(seen) == 1 and seen[0].steps == 1  # only the named reference asked the rules
    assert [(r.requested, r.backend) for r in caplog.records] == [
        ("auto", "torch"), ("auto", "torch"), ("torch", "torch"), ("reference", "reference")]
    assert "1 step(s) on cpu, fewer than any other backend's rule takes" in caplog.records[0].getMessage()


@pytest.mark.parametrize("changes,faster", [
    ({}, True),  # bf16 LSTM B=16 T=1024 H=768 inference: 2.3x-3.1x measured
    (dict(cell="gru", batch=32), True),
    (dict(needs_grad=True), False),  # training: the backward is per-step, slower
    (dict(batch=64), False),
    (dict(hidden_size=2048), False),  # the tensor-core kernel does not fit: per-step path
    (dict(hidden_size=767), False),
    (dict(steps=10), False),
    (dict(variable_lengths=True), False),
    (dict(proj_size=128), False),
    (dict(dtype=torch.float32), False),
    (dict(dtype=torch.float16), False),  # cuDNN's persistent fp16 LSTM at B=16
    (dict(dtype=torch.float16, batch=2), True),
    (dict(dtype=torch.float16, cell="gru"), True),
    (dict(dtype=torch.float16, cell="gru", hidden_size=128), False),
    (dict(cell="rnn_tanh"), False),
])
def test_cuda_rule_follows_the_h100_measurements(changes, faster):
    spec = RecurrenceSpec("lstm", 768, 0, False, torch.device("cuda"), torch.bfloat16, 16, 1024,
                          False)
    spec = dataclasses.replace(spec, **changes)
    rule = dict(backends.AUTO_PREFERENCE["cuda"])["cuda"]
    assert rule(spec) is faster


def test_modules_tell_auto_whether_backward_is_needed(monkeypatch):
    seen = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, spec: seen.append(spec) or real(name, spec))
    layer = clf.GRU(3, 4)
    steps = backends.AUTO_MIN_STEPS["cpu"]  # shorter calls never ask the rules
    layer(torch.randn(steps, 1, 3))
    with torch.no_grad():
        layer(torch.randn(steps, 1, 3))
    layer.requires_grad_(False)
    layer(torch.randn(steps, 1, 3))
    layer(torch.randn(steps, 1, 3, requires_grad=True))
    # the third call has the second's facts (no backward needed, same shapes): the
    # module reuses that resolution instead of asking again
    assert [s.needs_grad for s in seen] == [True, False, True]


def test_a_module_resolves_again_when_what_auto_reads_changes(monkeypatch):
    """A module keeps its last call's resolution while the call's facts and
    ``backends.generation()`` stay the same, and asks again when either changes: shapes,
    grad mode, states' dtypes, the process default, the tuning record, the cpu GEMM."""
    seen = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, spec: seen.append(spec) or real(name, spec))
    layer = clf.LSTM(3, 4)
    steps = backends.AUTO_MIN_STEPS["cpu"]
    x = torch.randn(steps, 2, 3)

    def asks(*args) -> bool:
        before = len(seen)
        layer(*args)
        return len(seen) > before

    assert asks(x) and not asks(x) and not asks(torch.randn(steps, 2, 3))
    assert asks(torch.randn(steps + 1, 2, 3)) and asks(x)  # other steps, then back
    with torch.no_grad():
        assert asks(x) and not asks(x)
    state = (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    assert asks(x, state) and not asks(x, state)
    with clf.use_backend("reference"):
        assert asks(x) and seen[-1] is not None and not asks(x)
    assert asks(x)  # the default went back
    tuned.reset()  # a record read again is another record
    assert asks(x) and not asks(x)
    if backends._unavailable("cpu") is None:
        with cpu_backend.use_gemm("blas"):
            assert asks(x)
        assert asks(x)
    layer.backend = "reference"
    assert asks(x)
    with caplog_free_debug():
        assert asks(x) and asks(x)  # a DEBUG log of the choices sees every call
    # a copy or a pickle resolves afresh: the resolution is this process's
    assert not asks(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        before = len(seen)
        clone(x)
        assert len(seen) == before + 1


@contextlib.contextmanager
def caplog_free_debug():
    logger = logging.getLogger("cnnlstm_fast.backends")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(level)


def test_each_choice_is_logged_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="cnnlstm_fast.backends"):
        clf.GRU(3, 4, backend="reference")(torch.randn(2, 1, 3))
        with torch.no_grad():
            clf.LSTM(3, 4)(torch.randn(9, 2, 3))
    first, second = caplog.records
    assert (first.requested, first.backend) == ("reference", "reference")
    assert first.getMessage() == (
        "backend 'reference' -> 'reference': gru hidden 4, batch 1, 2 steps, torch.float32 "
        "on cpu, training")
    assert second.requested == "auto" and second.backend in clf.available_backends()
    assert second.getMessage().endswith("lstm hidden 4, batch 2, 9 steps, torch.float32 on cpu, inference")


def test_set_backend_and_use_backend():
    m = clf.GRU(3, 4)
    assert clf.get_default() == "auto"
    with clf.use_backend("reference"):
        assert clf.get_default() == "reference"
        assert backends.resolve(m.backend, _spec()).name == "reference"
        # a module's own choice wins over the process default
        assert backends.resolve("torch", _spec()).name == "torch"
    assert clf.get_default() == "auto"
    clf.set_backend("reference")
    try:
        assert backends.resolve("auto", _spec()).name == "reference"
    finally:
        clf.set_backend("auto")
    with pytest.raises(ValueError, match="got 'fast'"):
        clf.set_backend("fast")


def test_env_variable_sets_process_default():
    code = "import cnnlstm_fast as c; print(c.get_default())"
    env = {**os.environ, "CNNLSTM_FAST_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    env["CNNLSTM_FAST_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "got 'bogus'" in out.stderr


class _CpuOnlyFloat32(backends.Backend):
    name = "test-only"
    supports = "CPU tensors of dtype float32"

    def unsupported_reason(self, spec):
        if spec.dtype != torch.float32:
            return f"dtype {spec.dtype}"
        return None


def test_explicit_backend_that_cannot_run_input_says_what_it_supports():
    backends.register(_CpuOnlyFloat32())
    try:
        m = clf.LSTM(3, 4, backend="test-only").double()
        with pytest.raises(BackendUnavailableError, match=r"dtype torch.float64.*CPU tensors of dtype float32"):
            m(torch.randn(2, 1, 3, dtype=torch.float64))
        # auto never picks it silently: it is not in the dispatch table
        assert backends.resolve("auto", _spec(dtype=torch.float64)).name != "test-only"
    finally:
        backends._REGISTRY.pop("test-only")


def test_changing_backend_after_construction():
    ours, theirs = make_pair("GRU", "torch", input_size=3, hidden_size=4)
    ours.backend = "reference"
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-5, atol=1e-6)


AUTOCAST_CASES = [
    ("LSTM", dict(input_size=4, hidden_size=5, num_layers=2), (6, 3, 4)),
    ("GRU", dict(input_size=4, hidden_size=5), (6, 3, 4)),
    ("RNN", dict(input_size=4, hidden_size=5, bidirectional=True), (6, 3, 4)),
    ("LSTMCell", dict(input_size=4, hidden_size=5), (3, 4)),
    ("GRUCell", dict(input_size=4, hidden_size=5), (3, 4)),
    ("RNNCell", dict(input_size=4, hidden_size=5), (3, 4)),
]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cls_name,kwargs,shape", AUTOCAST_CASES + [
    ("LSTM", dict(input_size=4, hidden_size=5, proj_size=3), (6, 3, 4)),
    ("LSTM", dict(input_size=4, hidden_size=5, proj_size=3, num_layers=2, bidirectional=True), (6, 3, 4)),
], ids=lambda v: str(v))
def test_cpu_autocast_output_dtype_and_values_follow_torch(cls_name, kwargs, shape, packed):
    """Every output's dtype (y, h_n and c_n) and value under CPU autocast, packed input
    and proj_size included: torch.nn's LSTM returns float32 for packed input and c_n in
    float32 with proj_size (its ATen loop, not oneDNN), bfloat16 elsewhere."""
    if packed and len(shape) != 3:
        pytest.skip("cells take no packed input")
    ours, theirs = make_pair(cls_name, "reference", **kwargs)
    x = torch.randn(*shape)
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [shape[0], shape[0] - 2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = theirs(x), ours(x)

    def flat(out):  # y (a PackedSequence's data), then each state
        if isinstance(out, torch.Tensor):
            return [out]
        y, states = out
        y = y.data if isinstance(y, PackedSequence) else y
        return [y, *(states if isinstance(states, tuple) else (states,))]

    for k, (e, g) in enumerate(zip(flat(expected), flat(got), strict=True)):
        assert g.dtype == e.dtype, f"output {k}"
        torch.testing.assert_close(g.float(), e.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("lengths", [[1], [5, 5, 5], [9, 7, 7, 4, 1], list(range(130, 0, -1))],
                         ids=lambda v: f"{len(v)}-rows")
def test_packed_index_built_on_the_device_matches_the_host_one(lengths):
    """The index a CUDA graph capture builds (aranges per run of equal batch sizes) is
    the one eager builds on the host (tested here with CPU tensors for both)."""
    from cnnlstm_fast.nn.rnn import _packed_index

    batch_sizes = torch.nn.utils.rnn.pack_padded_sequence(
        torch.zeros(max(lengths), len(lengths), 1), torch.tensor(lengths)).batch_sizes
    cpu = torch.device("cpu")
    host = _packed_index(batch_sizes, cpu, on_device=False)
    assert torch.equal(_packed_index(batch_sizes, cpu, on_device=True), host)
    assert len(host) == sum(lengths) and host.unique().numel() == len(host)


@pytest.mark.parametrize("backend", module_backends())
@pytest.mark.parametrize("cls_name,shape", [("LSTM", (5, 0, 3)), ("GRU", (5, 0, 3)), ("RNN", (5, 0, 3)),
                                            ("LSTMCell", (0, 3)), ("GRUCell", (0, 3))])
def test_empty_batch_like_torch_nn(cls_name, shape, backend):
    """torch.nn takes a batch of 0 (empty outputs, zero weight gradients); so must we,
    in training and inference (the cpu kernels failed on it in training)."""
    ours, theirs = make_pair(cls_name, backend, input_size=3, hidden_size=4)
    for grad in (True, False):
        results = []
        for module in (ours, theirs):
            module.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(grad):
                outs = leaves(module(torch.randn(*shape, requires_grad=grad)))
                if grad:
                    sum(o.sum() for o in outs).backward()
            results.append(([o.shape for o in outs],
                            [None if p.grad is None else p.grad.clone() for p in module.parameters()]))
        assert results[0][0] == results[1][0]
        for a, b in zip(results[0][1], results[1][1]):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize("backend", module_backends())
@pytest.mark.parametrize("cls_name,shape", [("LSTM", (5, 2, 3)), ("GRU", (5, 2, 3)), ("LSTMCell", (2, 3))])
def test_meta_device_infers_shapes_like_torch_nn(cls_name, shape, backend):
    """A forward on the meta device (shape and memory estimates before any weight exists)
    gives torch.nn's output shapes; it failed in our autocast check before."""
    kwargs = dict(input_size=3, hidden_size=4, device="meta")
    if "Cell" not in cls_name:
        kwargs.update(num_layers=2, bidirectional=True)
    ours = getattr(clf, cls_name)(**kwargs, backend=backend)
    theirs = getattr(nn, cls_name)(**kwargs)
    x = torch.randn(*shape, device="meta")
    got, want = leaves(ours(x)), leaves(theirs(x))
    assert [(t.shape, t.device.type) for t in got] == [(t.shape, t.device.type) for t in want]
