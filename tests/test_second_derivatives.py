"""Second and higher derivatives, and forward-mode AD, through our layers, against
torch.nn's in float64: gradient penalties (grad of grad), gradgradcheck, a third
derivative, torch.func's grad of grad, MAML's outer step, Hessians (jacrev of jacrev,
torch.autograd.functional.hessian, torch.func.hessian through jacfwd), jvp and dual
tensors, on every CPU backend, packed and bidirectional included.

The backward of the recurrence is computed without a graph; a derivative of it is
computed by recomputing the layer (cnnlstm_fast/ops/recurrence.py). These tests are
what shows that recomputation is the same function as torch.nn's."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import leaves, make_pair, module_backends

BACKENDS = module_backends()
DOUBLE = torch.float64
ATOL = 1e-10

CONFIGS = [
    ("LSTM", dict(input_size=3, hidden_size=4)),
    ("LSTM", dict(input_size=3, hidden_size=5, proj_size=2, num_layers=2, bidirectional=True)),
    ("GRU", dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)),
    ("GRU", dict(input_size=3, hidden_size=4, bias=False, batch_first=True)),
    ("RNN", dict(input_size=3, hidden_size=4, nonlinearity="relu")),
    ("RNN", dict(input_size=3, hidden_size=4, bidirectional=True)),
    ("LSTMCell", dict(input_size=3, hidden_size=4)),
    ("GRUCell", dict(input_size=3, hidden_size=4)),
    ("RNNCell", dict(input_size=3, hidden_size=4, nonlinearity="tanh")),
]
IDS = [f"{c}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for c, kw in CONFIGS]


def _input(cls_name, kwargs, packed=False):
    if cls_name.endswith("Cell"):
        return torch.randn(3, kwargs["input_size"], dtype=DOUBLE)
    x = torch.randn(5, 3, kwargs["input_size"], dtype=DOUBLE)
    return x.transpose(0, 1).contiguous() if kwargs.get("batch_first") else x


def _weighted_loss(out):
    """A loss that weighs every output element differently (sum() would hide errors
    that cancel) and uses h_n/c_n too."""
    total = 0
    for i, o in enumerate(leaves(out)):
        w = torch.linspace(-1, 1 + i, o.numel(), dtype=o.dtype).reshape(o.shape)
        total = total + (o * w).sum()
    return total


def _gradient_penalty(module, x, lengths=None, hx=None):
    """d/d(input, params, hx) of |d loss / d(input, params, hx)|^2."""
    xs = x.clone().requires_grad_()
    inp = xs if lengths is None else pack_padded_sequence(xs, lengths, enforce_sorted=False)
    states = [] if hx is None else [s.clone().requires_grad_() for s in hx]
    args = (inp,) if hx is None else (inp, states[0] if len(states) == 1 else tuple(states))
    wrt = [xs, *states, *module.parameters()]
    first = torch.autograd.grad(_weighted_loss(module(*args)), wrt, create_graph=True)
    penalty = sum((g * g).sum() for g in first)
    return [g.detach() for g in first], torch.autograd.grad(penalty, wrt)


def _assert_all_close(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=ATOL, msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,kwargs", CONFIGS, ids=IDS)
def test_gradient_penalty_matches_torch_nn(backend, cls_name, kwargs):
    ours, theirs = make_pair(cls_name, backend, DOUBLE, **kwargs)
    x = _input(cls_name, kwargs)
    first_o, second_o = _gradient_penalty(ours, x)
    first_t, second_t = _gradient_penalty(theirs, x)
    _assert_all_close(first_o, first_t, "first derivative")
    _assert_all_close(second_o, second_t, "second derivative")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,kwargs", [c for c in CONFIGS if not c[0].endswith("Cell")],
                         ids=[i for i, c in zip(IDS, CONFIGS) if not c[0].endswith("Cell")])
def test_gradient_penalty_on_packed_input_with_hx_matches_torch_nn(backend, cls_name, kwargs):
    """Unsorted lengths including 1 and a tie, and a given hx (whose second derivative
    flows too)."""
    if kwargs.get("batch_first"):
        kwargs = {**kwargs, "batch_first": False}
    ours, theirs = make_pair(cls_name, backend, DOUBLE, **kwargs)
    x = _input(cls_name, kwargs)
    lengths = torch.tensor([2, 5, 2])
    layers = ours.num_layers * (2 if ours.bidirectional else 1)
    out = ours.proj_size or ours.hidden_size if cls_name == "LSTM" else ours.hidden_size
    hx = [torch.randn(layers, 3, out, dtype=DOUBLE)]
    if cls_name == "LSTM":
        hx.append(torch.randn(layers, 3, ours.hidden_size, dtype=DOUBLE))
    first_o, second_o = _gradient_penalty(ours, x, lengths, hx)
    first_t, second_t = _gradient_penalty(theirs, x, lengths, hx)
    _assert_all_close(first_o, first_t, "first derivative")
    _assert_all_close(second_o, second_t, "second derivative")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cls_name,kwargs", [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[5], CONFIGS[6]],
                         ids=[IDS[0], IDS[1], IDS[2], IDS[5], IDS[6]])
def test_gradgradcheck(backend, cls_name, kwargs, packed):
    if packed and cls_name.endswith("Cell"):
        pytest.skip("cells take no packed input")
    ours, _ = make_pair(cls_name, backend, DOUBLE, **kwargs)
    names = [n for n, _ in ours.named_parameters()][:3]
    x = _input(cls_name, kwargs)[:3].requires_grad_()
    lengths = torch.tensor([3, 1, 2])

    def f(x, *weights):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out = functional_call(ours, dict(zip(names, weights)), (inp,))
        return tuple(leaves(out))

    weights = [getattr(ours, n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradgradcheck(f, (x, *weights))


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_derivative_matches_torch_nn(backend):
    ours, theirs = make_pair("GRU", backend, DOUBLE, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=DOUBLE)

    def third(module):
        xs = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(_weighted_loss(module(xs)), xs, create_graph=True)
        (g2,) = torch.autograd.grad((g * g).sum(), xs, create_graph=True)
        return torch.autograd.grad((g2 ** 3).sum(), [xs, module.weight_hh_l0])

    _assert_all_close(third(ours), third(theirs), "third derivative")


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("cls_name,kwargs", [CONFIGS[1], CONFIGS[2], CONFIGS[7]],
                         ids=[IDS[1], IDS[2], IDS[7]])
def test_torch_func_grad_of_grad_and_maml_match_torch_nn(backend, cls_name, kwargs):
    ours, theirs = make_pair(cls_name, backend, DOUBLE, **kwargs)
    x = _input(cls_name, kwargs)
    params = {k: v.detach() for k, v in theirs.named_parameters()}
    name = next(iter(params))

    def loss(p, module, x=x):
        return _weighted_loss(functional_call(module, p, (x,)))

    def grad_of_grad(module):
        return grad(lambda p: (grad(loss)(p, module)[name] ** 2).sum())(params)

    got, want = grad_of_grad(ours), grad_of_grad(theirs)
    _assert_all_close([got[k] for k in want], list(want.values()), "grad of grad")

    def maml(module):
        """An inner torch.func.grad step, differentiated by autograd from outside."""
        x_outer = x.clone().requires_grad_()
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        inner = grad(loss)(p, module, x_outer)
        adapted = {k: p[k] - 0.1 * inner[k] for k in p}
        outer = loss(adapted, module, x_outer)
        return torch.autograd.grad(outer, [x_outer, *p.values()])

    _assert_all_close(maml(ours), maml(theirs), "MAML outer gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessians_of_a_functional_call_match_torch_nn(backend):
    """jacrev of jacrev, torch.autograd.functional.hessian and torch.func.hessian
    (forward-mode over reverse-mode)."""
    ours, theirs = make_pair("LSTM", backend, DOUBLE, input_size=2, hidden_size=3, proj_size=2)
    x = torch.randn(3, 2, 2, dtype=DOUBLE)
    params = {k: v.detach() for k, v in theirs.named_parameters()}

    def f(module):
        return lambda w: _weighted_loss(functional_call(module, {**params, "weight_hh_l0": w}, (x,)))

    w0 = params["weight_hh_l0"]
    for how in (lambda g: jacrev(jacrev(g))(w0),
                lambda g: torch.autograd.functional.hessian(g, w0),
                lambda g: hessian(g)(w0)):
        torch.testing.assert_close(how(f(ours)), how(f(theirs)), rtol=1e-7, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name,kwargs", [CONFIGS[1], CONFIGS[2], CONFIGS[6]],
                         ids=[IDS[1], IDS[2], IDS[6]])
def test_forward_mode_ad_matches_torch_nn(backend, cls_name, kwargs):
    """torch.func.jvp, jacfwd and torch.autograd.forward_ad's dual tensors."""
    import torch.autograd.forward_ad as fwAD

    ours, theirs = make_pair(cls_name, backend, DOUBLE, **kwargs)
    x = _input(cls_name, kwargs)
    v = torch.randn_like(x)

    def f(module):
        return lambda inp: tuple(leaves(module(inp)))

    _assert_all_close(jvp(f(ours), (x,), (v,))[1], jvp(f(theirs), (x,), (v,))[1], "jvp")
    _assert_all_close(jacfwd(f(ours))(x[:2]), jacfwd(f(theirs))(x[:2]), "jacfwd")
    tangents = []
    for module in (ours, theirs):
        with fwAD.dual_level():
            tangents.append([fwAD.unpack_dual(o).tangent for o in f(module)(fwAD.make_dual(x, v))])
    _assert_all_close(tangents[0], tangents[1], "dual tensors' tangents")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_first_order_backward_with_create_graph_does_not_recompute(backend, monkeypatch):
    """create_graph=True alone (torch.func.grad, vjp) is a first derivative: the
    backend's backward computes it and the layer is recomputed only where that
    gradient is differentiated."""
    import sys

    op = sys.modules["cnnlstm_fast.ops.recurrence"]
    calls = []
    real = op.differentiable_forward
    monkeypatch.setattr(op, "differentiable_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, theirs = make_pair("LSTM", backend, DOUBLE, input_size=3, hidden_size=4)
    x = torch.randn(4, 2, 3, dtype=DOUBLE, requires_grad=True)
    (g,) = torch.autograd.grad(_weighted_loss(ours(x)), x, create_graph=True)
    assert not calls, "a first-order backward recomputed the layer"
    (g * g).sum().backward()
    assert calls, "the second derivative did not recompute the layer"


def test_second_derivative_through_a_compiled_layer_raises_torchs_error():
    """torch.compile's AOTAutograd does not differentiate a compiled backward (its own
    error, raised loudly for any compiled op; torch.nn's layers avoid it only because
    Dynamo does not compile them). torch.func's grad of grad under torch.compile graph
    breaks at the layer and works (test above runs it eagerly)."""
    ours, _ = make_pair("GRU", "cpu" if "cpu" in BACKENDS else "reference", DOUBLE,
                        input_size=3, hidden_size=4)
    compiled = torch.compile(ours, backend="aot_eager")
    x = torch.randn(4, 2, 3, dtype=DOUBLE, requires_grad=True)
    (g,) = torch.autograd.grad(compiled(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (g * g).sum().backward()


def test_gradient_penalty_through_the_triton_backend_matches_torch_nn():
    """The Triton kernels compute the first order (under TRITON_INTERPRET=1 on CPU,
    tiny shapes); the second derivative recomputes in plain ops."""
    from cnnlstm_fast import backends

    if backends.backend_report().get("triton", "missing") is not None:
        pytest.skip(f"triton backend unavailable: {backends.backend_report().get('triton')}")
    ours, theirs = make_pair("GRU", "triton", input_size=3, hidden_size=4)
    x = torch.randn(3, 2, 3)
    first_o, second_o = _gradient_penalty(ours, x)
    first_t, second_t = _gradient_penalty(theirs, x)
    for got, want in zip(first_o + list(second_o), first_t + list(second_t)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
