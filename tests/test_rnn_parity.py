"""Module-level parity with torch.nn: outputs and every gradient, over the whole matrix
of constructor options and input kinds, for each recurrence backend on this machine."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import assert_close, clone_inputs, make_packed, make_pair, module_backends, run_and_grad

BACKENDS = module_backends()

# (module class, extra constructor kwargs)
CELLS = [
    ("LSTM", {}),
    ("LSTM", {"proj_size": 3}),
    ("GRU", {}),
    ("RNN", {"nonlinearity": "tanh"}),
    ("RNN", {"nonlinearity": "relu"}),
]
INPUT_KINDS = ["batched", "unbatched", "packed_sorted", "packed_unsorted"]

I, H, B, T = 5, 7, 3, 4
RTOL, ATOL = 1e-5, 2e-6


def _input_and_hx(cls_name, kind, batch_first, with_hx, module, dtype=torch.float32):
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    layers = module.num_layers * directions
    if kind == "batched":
        x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
        hx_batch = (B,)
    elif kind == "unbatched":
        x = torch.randn(T, I, dtype=dtype)
        hx_batch = ()
    else:
        # lengths include 1 and a tie; unsorted order exercises the hx permutation
        lengths = [T, 1, T - 1] if kind == "packed_unsorted" else [T, T - 1, 1]
        x = make_packed(lengths, B, I, dtype, enforce_sorted=kind == "packed_sorted")
        hx_batch = (B,)
    if not with_hx:
        return x, None
    h = torch.randn(layers, *hx_batch, out_size, dtype=dtype)
    if cls_name != "LSTM":
        return x, h
    return x, (h, torch.randn(layers, *hx_batch, module.hidden_size, dtype=dtype))


def _compare(ours, theirs, inputs, rtol=RTOL, atol=ATOL):
    out_t, in_grads_t, p_grads_t = run_and_grad(theirs, clone_inputs(inputs))
    out_o, in_grads_o, p_grads_o = run_and_grad(ours, clone_inputs(inputs))
    out_t_flat = [out_t[0], *([out_t[1]] if isinstance(out_t[1], torch.Tensor) else out_t[1])]
    out_o_flat = [out_o[0], *([out_o[1]] if isinstance(out_o[1], torch.Tensor) else out_o[1])]
    for k, (a, e) in enumerate(zip(out_o_flat, out_t_flat, strict=True)):
        assert_close(a, e, rtol, atol, what=f"output {k}")
    for k, (a, e) in enumerate(zip(in_grads_o, in_grads_t, strict=True)):
        assert_close(a, e, rtol, atol, what=f"grad of input {k}")
    assert p_grads_o.keys() == p_grads_t.keys()
    for name in p_grads_t:
        assert_close(p_grads_o[name], p_grads_t[name], rtol, atol, what=f"grad of {name}")


MATRIX = list(
    itertools.product(
        range(len(CELLS)), [1, 2, 3, 4], [True, False], [False, True], [False, True], INPUT_KINDS
    )
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cell,layers,bias,batch_first,bidirectional,kind",
    MATRIX,
    ids=[
        f"{CELLS[c][0]}{'-proj' if CELLS[c][1].get('proj_size') else ''}"
        f"{'-' + CELLS[c][1]['nonlinearity'] if 'nonlinearity' in CELLS[c][1] else ''}"
        f"-L{layers}-{'bias' if bias else 'nobias'}-{'bf' if bf else 'tf'}-{'bi' if bi else 'uni'}-{kind}"
        for c, layers, bias, bf, bi, kind in MATRIX
    ],
)
def test_parity_with_torch_nn(backend, cell, layers, bias, batch_first, bidirectional, kind):
    cls_name, extra = CELLS[cell]
    ours, theirs = make_pair(
        cls_name,
        backend,
        input_size=I,
        hidden_size=H,
        num_layers=layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        **extra,
    )
    # hx given on odd layer counts, None on even: both paths meet every other option.
    x, hx = _input_and_hx(cls_name, kind, batch_first, layers % 2 == 1, ours)
    _compare(ours, theirs, (x, hx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,extra", CELLS, ids=lambda v: str(v))
@pytest.mark.parametrize("with_hx", [False, True])
def test_hx_given_and_none(backend, cls_name, extra, with_hx):
    ours, theirs = make_pair(cls_name, backend, input_size=I, hidden_size=H, num_layers=2,
                             bidirectional=True, **extra)
    for kind in INPUT_KINDS:
        x, hx = _input_and_hx(cls_name, kind, False, with_hx, ours)
        _compare(ours, theirs, (x, hx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,extra", CELLS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["batched", "packed_unsorted"])
def test_dropout_masks_match_torch(backend, cls_name, extra, kind):
    """With the same seed, inter-layer dropout draws the same masks as torch.nn on CPU."""
    ours, theirs = make_pair(cls_name, backend, input_size=I, hidden_size=H, num_layers=3,
                             dropout=0.4, bidirectional=True, **extra)
    ours.train()
    theirs.train()
    x, hx = _input_and_hx(cls_name, kind, False, True, ours)
    torch.manual_seed(7)
    out_t, _, grads_t = run_and_grad(theirs, clone_inputs((x, hx)))
    torch.manual_seed(7)
    out_o, _, grads_o = run_and_grad(ours, clone_inputs((x, hx)))
    assert_close(out_o[0], out_t[0], RTOL, ATOL, what="output")
    for name in grads_t:
        assert_close(grads_o[name], grads_t[name], RTOL, ATOL, what=f"grad of {name}")
    # eval mode: no dropout at all
    ours.eval()
    theirs.eval()
    _compare(ours, theirs, (x, hx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,extra", CELLS, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "steps,batch,input_size,hidden", [(1, 1, 1, 1), (1, 5, 3, 4), (9, 1, 2, 13), (6, 11, 17, 5)]
)
def test_odd_shapes(backend, cls_name, extra, steps, batch, input_size, hidden):
    extra = dict(extra)
    if "proj_size" in extra:
        if hidden == 1:
            pytest.skip("proj_size must be smaller than hidden_size")
        extra["proj_size"] = min(extra["proj_size"], hidden - 1)
    ours, theirs = make_pair(cls_name, backend, input_size=input_size, hidden_size=hidden,
                             bidirectional=True, **extra)
    x = torch.randn(steps, batch, input_size)
    _compare(ours, theirs, (x, None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,extra", CELLS, ids=lambda v: str(v))
def test_packed_all_lengths_one_and_batch_one(backend, cls_name, extra):
    ours, theirs = make_pair(cls_name, backend, input_size=I, hidden_size=H, num_layers=2,
                             bidirectional=True, **extra)
    for lengths in ([1, 1, 1], [1], [5]):
        x = make_packed(lengths, len(lengths), I, torch.float32, enforce_sorted=False)
        _compare(ours, theirs, (x, None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,extra", CELLS, ids=lambda v: str(v))
def test_float64(backend, cls_name, extra):
    ours, theirs = make_pair(cls_name, backend, dtype=torch.float64, input_size=I, hidden_size=H,
                             num_layers=2, bidirectional=True, **extra)
    for kind in INPUT_KINDS:
        x, hx = _input_and_hx(cls_name, kind, False, True, ours, dtype=torch.float64)
        _compare(ours, theirs, (x, hx), rtol=1e-10, atol=1e-12)


CELL_CLASSES = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "tanh"}),
                ("RNNCell", {"nonlinearity": "relu"})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,extra", CELL_CLASSES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_cells(backend, cls_name, extra, bias, batched, with_hx):
    ours, theirs = make_pair(cls_name, backend, input_size=I, hidden_size=H, bias=bias, **extra)
    shape = (B,) if batched else ()
    x = torch.randn(*shape, I)
    hx = None
    if with_hx:
        hx = torch.randn(*shape, H)
        if cls_name == "LSTMCell":
            hx = (hx, torch.randn(*shape, H))
    out_t, in_t, p_t = run_and_grad(theirs, clone_inputs((x, hx)))
    out_o, in_o, p_o = run_and_grad(ours, clone_inputs((x, hx)))
    out_t = out_t if isinstance(out_t, tuple) else (out_t,)
    out_o = out_o if isinstance(out_o, tuple) else (out_o,)
    for k, (a, e) in enumerate(zip(out_o, out_t, strict=True)):
        assert_close(a, e, RTOL, ATOL, what=f"output {k}")
    for k, (a, e) in enumerate(zip(in_o, in_t, strict=True)):
        assert_close(a, e, RTOL, ATOL, what=f"grad of input {k}")
    for name in p_t:
        assert_close(p_o[name], p_t[name], RTOL, ATOL, what=f"grad of {name}")


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("cls_name,extra", CELLS, ids=lambda v: str(v))
def test_gradients_reach_hx_and_plain_weights_of_a_frozen_module(backend, cls_name, extra):
    """With every Parameter frozen and an input that needs no gradient, autograd still
    needs the backward where hx requires grad (learning the initial state) or a weight
    is a plain tensor computed from a trainable one (weight tying, a hypernetwork). Our
    inference path has no backward: taking it there lost those gradients (hx's came back
    as if only h_n depended on it). 10 steps: ``auto`` runs the cpu backend there."""
    steps = 10
    ours, theirs = make_pair(cls_name, backend, input_size=I, hidden_size=H, num_layers=2,
                             bidirectional=True, **extra)
    for module in (ours, theirs):
        module.requires_grad_(False)
    x, hx = _input_and_hx(cls_name, "batched", False, True, ours)
    x = torch.randn(steps, B, I)

    def learn_hx(module):
        gen = torch.Generator().manual_seed(7)
        states = tuple(s.clone().requires_grad_(True) for s in (hx if isinstance(hx, tuple) else (hx,)))
        y, h_n = module(x, states if cls_name == "LSTM" else states[0])
        loss = (y * torch.randn(y.shape, generator=gen)).sum() + sum(
            t.sum() for t in (h_n if isinstance(h_n, tuple) else (h_n,)))
        loss.backward()
        return [y.detach(), *(s.grad for s in states)]

    got, want = learn_hx(ours), learn_hx(theirs)
    assert all(g is not None for g in got)
    for k, (a, e) in enumerate(zip(got, want, strict=True)):
        assert_close(a, e, RTOL, ATOL, what=f"output and hx grads {k}")

    def tied_weight(module):
        source = torch.nn.Parameter(theirs.weight_hh_l0.detach().clone())
        del module._parameters["weight_hh_l0"]
        module.weight_hh_l0 = source * 1.0  # a plain tensor in the weight's place
        y, _ = module(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        return y.detach(), source.grad

    (y_o, g_o), (y_t, g_t) = tied_weight(ours), tied_weight(theirs)
    assert g_o is not None, "the plain tensor weight's source got no gradient"
    assert_close(y_o, y_t, RTOL, ATOL, what="output with a plain tensor weight")
    assert_close(g_o, g_t, RTOL, ATOL, what="grad of the plain tensor weight's source")


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("cls_name,extra", CELLS + [("GRUCell", {}), ("LSTMCell", {})],
                         ids=lambda v: str(v))
def test_torch_func_grad_and_vmap_match_torch_nn(backend, cls_name, extra):
    """torch.func's transforms, as on torch.nn's layers: grad of a functional_call
    (10 steps: ``auto`` runs the cpu backend for GRU), vmap of the cells, grad of grad."""
    from torch.func import functional_call, grad, vmap

    cell = cls_name.endswith("Cell")
    kwargs = dict(input_size=I, hidden_size=H, **extra)
    if not cell:
        kwargs.update(num_layers=2, bidirectional=True)
    ours, theirs = make_pair(cls_name, backend, **kwargs)
    x = torch.randn(B, I) if cell else torch.randn(10, B, I)
    params = {k: v.detach() for k, v in theirs.named_parameters()}

    def loss(p, module):
        out = functional_call(module, p, (x,))
        out = out[0] if isinstance(out, tuple) else out
        return (out * torch.linspace(-1, 1, out.shape[-1])).sum()

    got, want = grad(loss)(params, ours), grad(loss)(params, theirs)
    for name in want:
        assert_close(got[name], want[name], RTOL, ATOL, what=f"torch.func.grad of {name}")
    if cell and cls_name != "LSTMCell":  # torch.nn's LSTMCell has no batching rule itself
        xs = torch.randn(4, B, I)
        out_o, out_t = vmap(ours)(xs), vmap(theirs)(xs)
        for a, e in zip(out_o if isinstance(out_o, tuple) else (out_o,),
                        out_t if isinstance(out_t, tuple) else (out_t,), strict=True):
            assert_close(a, e, RTOL, ATOL, what="vmap over the cell")
    if not cell:
        # grad of grad (tests/test_second_derivatives.py has the full matrix)
        name = "weight_hh_l0"
        gg_o = grad(lambda p: grad(loss)(p, ours)[name].square().sum())(params)
        gg_t = grad(lambda p: grad(loss)(p, theirs)[name].square().sum())(params)
        for k in gg_t:  # float32 sums of second-order terms: judged at the tensor's scale
            scale = gg_t[k].abs().max().item()
            assert_close(gg_o[k], gg_t[k], RTOL, 1e-5 * scale, what=f"grad of grad, {k}")


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_torch_func_vjp_jacrev_and_vmap_of_training_match_torch_nn(backend, cls_name):
    """vjp (its backward runs with create_graph=True), jacrev (vmap over it), a
    backward through vmap over the frozen module (BatchedTensors report no
    requires_grad) and jvp (forward mode), each against torch.nn."""
    from torch.func import jacrev, jvp, vjp, vmap

    ours, theirs = make_pair(cls_name, backend, input_size=I, hidden_size=H)
    for module in (ours, theirs):
        module.requires_grad_(False)
    x = torch.randn(10, B, I)
    cot = torch.randn(10, B, H)
    (y_o, f_o), (y_t, f_t) = vjp(lambda v: ours(v)[0], x), vjp(lambda v: theirs(v)[0], x)
    assert_close(y_o, y_t, RTOL, ATOL, what="vjp's output")
    assert_close(f_o(cot)[0], f_t(cot)[0], RTOL, ATOL, what="vjp")
    small = x[:3, :1]
    assert_close(jacrev(lambda v: ours(v)[0])(small), jacrev(lambda v: theirs(v)[0])(small),
                 RTOL, ATOL, what="jacrev")
    if not (backend == "auto" and cls_name == "LSTM"):
        xs = torch.randn(2, 10, B, I).requires_grad_()
        weight = torch.linspace(-1, 1, H)
        (vmap(lambda v: ours(v)[0])(xs) * weight).sum().backward()
        xs_t = xs.detach().clone().requires_grad_()  # torch.nn's layers have no vmap rule
        sum((theirs(v)[0] * weight).sum() for v in xs_t.unbind(0)).backward()
        assert_close(xs.grad, xs_t.grad, RTOL, ATOL, what="backward through vmap")
    tangent = torch.randn_like(x)
    # oneDNN's LSTM has no forward AD (torch.nn's, and ours where auto hands it over)
    with torch.backends.mkldnn.flags(enabled=False):
        want = jvp(lambda v: theirs(v)[0], (x,), (tangent,))[1]
        got = jvp(lambda v: ours(v)[0], (x,), (tangent,))[1]
    assert_close(got, want, RTOL, ATOL, what="jvp")
