"""swap/unswap on small models shaped like published CNN-LSTM and RNN architectures:
the swapped model computes the same outputs and gradients, trains the same, and keeps
its parameters, hooks, state_dict, shared instances and mode."""

from __future__ import annotations

import copy
import io
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from torch.nn.utils.rnn import pack_padded_sequence

import cnnlstm_fast as clf
from helpers import assert_close, clone_inputs, module_backends, run_and_grad

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
OURS = (clf.LSTM, clf.GRU, clf.RNN, clf.LSTMCell, clf.GRUCell, clf.RNNCell)
RTOL, ATOL = 1e-5, 1e-6


class DeepConvLSTM(nn.Module):
    """Activity recogniser (Ordonez & Roggen 2016): Conv1d stack over time -> 2-layer LSTM."""

    def __init__(self, channels=6, classes=5, filters=8, hidden=12):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(channels, filters, 5), nn.ReLU(), nn.Conv1d(filters, filters, 5), nn.ReLU()
        )
        self.lstm = nn.LSTM(filters, hidden, num_layers=2, dropout=0.5)
        self.dropout = nn.Dropout(0.5)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):  # (B, C, T)
        seq = self.convs(x).permute(2, 0, 1)  # (T', B, F)
        y, _ = self.lstm(seq)
        return self.out(self.dropout(y[-1]))


class BidirectionalLSTM(nn.Module):
    """CRNN's recurrent block: a BiLSTM and a per-step linear embedding."""

    def __init__(self, n_in, hidden, n_out):
        super().__init__()
        self.rnn = nn.LSTM(n_in, hidden, bidirectional=True)
        self.embedding = nn.Linear(2 * hidden, n_out)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.embedding(y)


class CRNN(nn.Module):
    """Text recogniser (Shi et al. 2015): Conv2d stack -> 2 BiLSTM blocks -> CTC log-probs."""

    def __init__(self, classes=6, hidden=8):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d((2, 1)),
        )
        self.rnn = nn.Sequential(BidirectionalLSTM(32, hidden, hidden), BidirectionalLSTM(hidden, hidden, classes))

    def forward(self, x):  # (B, 1, 16, W)
        features = self.cnn(x)  # (B, 8, 4, W/2)
        seq = features.flatten(1, 2).permute(2, 0, 1)  # (W/2, B, 32)
        return F.log_softmax(self.rnn(seq), dim=2)


class FrameCNNLSTM(nn.Module):
    """Video model (Donahue et al. 2015 style): CNN per frame -> batch_first LSTM."""

    def __init__(self, classes=4, hidden=10):
        super().__init__()
        self.frame_cnn = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.lstm = nn.LSTM(6, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, clip):  # (B, T, 3, H, W)
        batch, steps = clip.shape[:2]
        features = self.frame_cnn(clip.flatten(0, 1)).view(batch, steps, -1)
        y, _ = self.lstm(features)
        return self.head(y[:, -1])


class PackedGRUClassifier(nn.Module):
    """Text classifier: embedding -> packed (unsorted lengths) 2-layer BiGRU -> final states."""

    def __init__(self, vocab=30, embed=8, hidden=10, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=0)
        self.gru = nn.GRU(embed, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, h_n = self.gru(packed)
        return self.head(torch.cat((h_n[-2], h_n[-1]), dim=1))


class Seq2Seq(nn.Module):
    """Encoder LSTM -> 2-layer LSTMCell decoder with dot attention, teacher forcing."""

    def __init__(self, vocab=20, embed=8, hidden=10):
        super().__init__()
        self.parts = nn.ModuleDict({
            "embedding": nn.Embedding(vocab, embed),
            "encoder": nn.LSTM(embed, hidden),
            "decoder": nn.ModuleList([nn.LSTMCell(embed + hidden, hidden), nn.LSTMCell(hidden, hidden)]),
            "out": nn.Linear(2 * hidden, vocab),
        })

    def forward(self, source, target):  # (S, B), (T, B) token ids
        p = self.parts
        memory, (h, c) = p["encoder"](p["embedding"](source))
        states = [(h[0], c[0]), (h[0], c[0])]
        context = memory.mean(0)
        logits = []
        for token in p["embedding"](target):
            x = torch.cat((token, context), dim=1)
            for layer, cell in enumerate(p["decoder"]):
                states[layer] = cell(x, states[layer])
                x = states[layer][0]
            scores = torch.softmax(torch.einsum("sbh,bh->sb", memory, x), dim=0)
            context = torch.einsum("sb,sbh->bh", scores, memory)
            logits.append(p["out"](torch.cat((x, context), dim=1)))
        return torch.stack(logits)


def _deepconvlstm():
    labels = torch.randint(0, 5, (3,))
    return DeepConvLSTM(), (torch.randn(3, 6, 16),), lambda out: F.cross_entropy(out, labels)


def _crnn():
    targets, target_lengths = torch.randint(1, 6, (2, 3)), torch.tensor([3, 2])

    def loss(log_probs):
        input_lengths = torch.full((2,), log_probs.size(0), dtype=torch.long)
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths)

    return CRNN(), (torch.randn(2, 1, 16, 12),), loss


def _video():
    labels = torch.randint(0, 4, (2,))
    return FrameCNNLSTM(), (torch.randn(2, 5, 3, 6, 6),), lambda out: F.cross_entropy(out, labels)


def _packed_gru():
    lengths = torch.tensor([4, 7, 1, 5])
    tokens = torch.randint(1, 30, (4, 7)) * (torch.arange(7) < lengths[:, None])
    labels = torch.randint(0, 3, (4,))
    return PackedGRUClassifier(), (tokens, lengths), lambda out: F.cross_entropy(out, labels)


def _seq2seq():
    source, target = torch.randint(0, 20, (6, 3)), torch.randint(0, 20, (5, 3))
    expected = torch.randint(0, 20, (5, 3))
    return Seq2Seq(), (source, target), lambda out: F.cross_entropy(out.flatten(0, 1), expected.flatten())


ARCHITECTURES = {
    "deepconvlstm": (_deepconvlstm, 1),
    "crnn": (_crnn, 2),
    "video": (_video, 1),
    "packed_gru": (_packed_gru, 1),
    "seq2seq": (_seq2seq, 3),
}
BACKENDS = ["auto", *module_backends()]


def _twins(arch, backend):
    """(torch.nn model, swapped copy with the same weights, inputs, loss function)."""
    model, inputs, loss_fn = ARCHITECTURES[arch][0]()
    swapped = clf.swap(copy.deepcopy(model), backend=backend)
    return model, swapped, inputs, loss_fn


def _loss_and_grads(model, inputs, loss_fn):
    torch.manual_seed(7)  # the same dropout masks in both models
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    loss = loss_fn(out)
    loss.backward()
    return out, loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_swapped_architecture_same_outputs_and_grads(arch, backend):
    model, swapped, inputs, loss_fn = _twins(arch, backend)
    recurrent = [m for m in swapped.modules() if isinstance(m, RECURRENT)]
    assert len(recurrent) == ARCHITECTURES[arch][1]
    assert all(type(m) in OURS and m.backend == backend for m in recurrent)
    assert not any(type(m) in OURS for m in model.modules()), "the original was changed"

    out_t, loss_t, grads_t = _loss_and_grads(model, inputs, loss_fn)
    out_o, loss_o, grads_o = _loss_and_grads(swapped, inputs, loss_fn)
    assert_close(out_o, out_t, RTOL, ATOL, what="output")
    assert_close(loss_o, loss_t, RTOL, ATOL, what="loss")
    assert grads_o.keys() == grads_t.keys()
    for name in grads_t:
        assert_close(grads_o[name], grads_t[name], RTOL, ATOL, what=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_swapped_architecture_trains_the_same(arch, backend):
    model, swapped, inputs, loss_fn = _twins(arch, backend)
    runs = []
    for m in (model, swapped):
        optimizer = torch.optim.Adam(m.parameters(), lr=1e-2)
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            _, loss, _ = _loss_and_grads(m, inputs, loss_fn)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), dict(m.named_parameters())))
    (losses_t, params_t), (losses_o, params_o) = runs
    assert_close(losses_o, losses_t, 1e-4, 1e-5, what="losses per step")
    for name in params_t:
        assert_close(params_o[name].detach(), params_t[name].detach(), 1e-4, 1e-5, what=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_state_dict_round_trip_and_unswap(arch):
    model, inputs, _ = ARCHITECTURES[arch][0]()
    model.eval()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(*inputs)

    clf.swap(model, backend=module_backends()[0])
    assert list(model.state_dict()) == list(state)
    assert all(p is params[n] for n, p in model.named_parameters())
    fresh = ARCHITECTURES[arch][0]()[0].eval()
    clf.swap(fresh).load_state_dict(model.state_dict())  # swapped -> swapped
    assert_close(fresh(*inputs), expected, RTOL, ATOL, what="swapped model from a state_dict")

    assert clf.unswap(model) is model
    assert not any(isinstance(m, OURS) or hasattr(m, "backend") for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(model(*inputs), expected)  # torch.nn again, bit for bit


def test_optimizer_built_before_swap_updates_swapped_layers():
    model, inputs, loss_fn = _deepconvlstm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.lstm.weight_hh_l1.detach().clone()
    clf.swap(model, backend=module_backends()[0])
    optimizer.zero_grad()
    loss_fn(model(*inputs)).backward()
    optimizer.step()
    assert isinstance(model.lstm, clf.LSTM)
    assert any(p is model.lstm.weight_hh_l1 for p in optimizer.param_groups[0]["params"])
    assert not torch.equal(model.lstm.weight_hh_l1, before)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5)
        self.again = nn.ModuleList([self.lstm, nn.GRUCell(4, 5)])
        self.by_name = nn.ModuleDict({"same": self.lstm, "rnn": nn.RNN(4, 5, nonlinearity="relu")})

    def forward(self, x):
        return self.lstm(x)[0] + self.again[0](x)[0] + self.again[1](x[0]) + self.by_name["rnn"](x)[0]


def test_shared_instance_stays_one_instance():
    model = _Shared()
    seen = []
    clf.swap(model, filter_fn=lambda m, name: seen.append(name) or True)
    assert seen == ["lstm", "again.1", "by_name.rnn"]  # the shared LSTM offered once
    assert model.lstm is model.again[0] is model.by_name["same"]
    assert type(model.lstm) is clf.LSTM and type(model.again[1]) is clf.GRUCell
    assert type(model.by_name["rnn"]) is clf.RNN
    model(torch.randn(3, 2, 4)).sum().backward()
    clf.unswap(model)
    assert model.lstm is model.again[0] is model.by_name["same"] and type(model.lstm) is nn.LSTM


def test_filter_fn_chooses_by_module_and_qualified_name():
    model = _seq2seq()[0]
    calls = []

    def only_decoder(module, name):
        calls.append((type(module), name))
        return name.startswith("parts.decoder")

    clf.swap(model, backend="reference", filter_fn=only_decoder)
    assert calls == [(nn.LSTM, "parts.encoder"), (nn.LSTMCell, "parts.decoder.0"), (nn.LSTMCell, "parts.decoder.1")]
    assert type(model.parts["encoder"]) is nn.LSTM
    assert all(type(c) is clf.LSTMCell and c.backend == "reference" for c in model.parts["decoder"])


def test_hooks_mode_device_and_dtype_are_kept():
    model = FrameCNNLSTM().double().eval()
    fired = []
    model.lstm.register_forward_pre_hook(lambda m, args: fired.append("pre"))
    model.lstm.register_forward_hook(lambda m, args, out: fired.append("forward"))
    model.lstm.register_full_backward_hook(lambda m, gin, gout: fired.append("backward"))
    model.lstm.weight_ih_l0.register_hook(lambda g: fired.append("param grad"))
    clip = torch.randn(2, 3, 3, 5, 5, dtype=torch.float64)
    expected = model(clip)
    fired.clear()

    clf.swap(model, backend=module_backends()[0])
    assert not model.training and not model.lstm.training
    assert model.lstm.weight_ih_l0.dtype == torch.float64 and model.lstm.weight_ih_l0.device.type == "cpu"
    out = model(clip)
    out.sum().backward()
    assert sorted(fired) == ["backward", "forward", "param grad", "pre"]
    assert_close(out, expected, 1e-10, 1e-12, what="float64 output")


def test_swap_and_unswap_log_a_summary(caplog):
    with caplog.at_level(logging.INFO, logger="cnnlstm_fast.nn.swap"):
        clf.swap(CRNN(), backend="reference", filter_fn=lambda m, name: name != "rnn.1.rnn")
    message = caplog.records[-1].getMessage()
    assert "swap(backend='reference'): 1 module(s)" in message
    assert "rnn.0.rnn (LSTM, torch.nn)" in message and "rnn.1.rnn (filter_fn)" in message


def test_model_itself_and_backend_argument():
    lstm = nn.LSTM(3, 4)
    assert clf.swap(lstm, backend="reference") is lstm and type(lstm) is clf.LSTM
    assert clf.swap(lstm, backend="auto").backend == "auto"  # ours already: re-targeted
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        clf.swap(nn.GRU(3, 4), backend="cudnn")
    built_as_ours = clf.GRU(3, 4, backend="reference")
    assert type(clf.unswap(built_as_ours)) is nn.GRU and not hasattr(built_as_ours, "backend")


class UserLSTM(nn.LSTM):
    """A user's subclass with its own method and forward override."""

    def last_step(self, x):
        return self(x)[0][-1]

    def forward(self, input, hx=None):
        out, state = super().forward(input, hx)
        return 2 * out, state


def test_user_subclasses_are_swapped_only_when_asked(caplog):
    model = nn.Sequential(UserLSTM(3, 4))
    x = torch.randn(5, 2, 3)
    expected = model[0].last_step(x)
    with caplog.at_level(logging.INFO, logger="cnnlstm_fast.nn.swap"):
        clf.swap(model, backend="reference")
    assert type(model[0]) is UserLSTM
    assert "UserLSTM: a subclass; pass include_subclasses=True" in caplog.records[-1].getMessage()

    clf.swap(model, backend="reference", include_subclasses=True)
    swapped = model[0]
    assert isinstance(swapped, UserLSTM) and isinstance(swapped, clf.LSTM) and swapped.backend == "reference"
    assert_close(swapped.last_step(x), expected, RTOL, ATOL, what="user method through our forward")

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)[0]
    assert type(loaded) is type(swapped) and loaded.backend == "reference"
    assert type(copy.deepcopy(model)[0]) is type(swapped)

    clf.unswap(model)
    assert type(model[0]) is UserLSTM and not hasattr(model[0], "backend")


def test_swap_log_names_a_subclass_by_its_own_module_and_class(caplog):
    """Another library's own ``LSTM`` (a torch.nn.LSTM subclass of the same name) is
    logged as that library's class, not as torch.nn's LSTM."""
    LibraryLSTM = type("LSTM", (nn.LSTM,), {"__module__": "otherlib.layers", "__qualname__": "LSTM"})
    model = nn.ModuleDict({"theirs": LibraryLSTM(3, 4), "plain": nn.LSTM(3, 4)})
    messages = []
    with caplog.at_level(logging.INFO, logger="cnnlstm_fast.nn.swap"):
        for include_subclasses in (False, True, True):
            clf.swap(model, backend="reference", include_subclasses=include_subclasses)
            messages.append(caplog.records[-1].getMessage())
    skipped, swapped, again = messages
    assert "theirs (otherlib.layers.LSTM: a subclass; pass include_subclasses=True)" in skipped, skipped
    assert "plain (LSTM, torch.nn)" in skipped, skipped
    assert "theirs (otherlib.layers.LSTM, a subclass of torch.nn.LSTM)" in swapped, swapped
    assert "theirs (otherlib.layers.LSTM, already ours)" in again, again
    assert "plain (LSTM, already ours)" in again, again


@pytest.mark.parametrize("torch_cls,our_cls", list(zip(RECURRENT, OURS)), ids=[c.__name__ for c in RECURRENT])
def test_our_classes_add_no_state_but_backend(torch_cls, our_cls):
    # swap re-classes modules without running our __init__: any other state our
    # constructors add would be missing from swapped modules.
    assert set(vars(our_cls(3, 4))) == set(vars(torch_cls(3, 4))) | {"backend"}


class Parametrized(nn.Module):
    """Recurrent layers under torch.nn.utils.parametrizations, as AWD-LSTM-style and
    spectrally normalised models use them."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
        self.cell = nn.GRUCell(10, 4)
        weight_norm(self.lstm, "weight_hh_l0")
        weight_norm(self.lstm, "weight_ih_l1_reverse")
        spectral_norm(self.cell, "weight_hh")

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.cell(y[-1])


@pytest.mark.parametrize("backend", module_backends())
def test_parametrized_layers_are_swapped_and_keep_their_parametrizations(backend):
    model = Parametrized().eval()  # eval: spectral_norm's power iteration stays put
    x = torch.randn(6, 2, 3, requires_grad=True)
    params = dict(model.named_parameters())
    expected = run_and_grad(model, (x,))
    assert parametrize.is_parametrized(model.lstm) and not isinstance(model.lstm, clf.LSTM)

    clf.swap(model, backend=backend)
    for module, ours, theirs in ((model.lstm, clf.LSTM, nn.LSTM), (model.cell, clf.GRUCell, nn.GRUCell)):
        assert isinstance(module, ours) and module.backend == backend
        assert type(module).__name__ == f"Parametrized{theirs.__name__}"  # as torch names it
        assert parametrize.is_parametrized(module)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    got = run_and_grad(model, (clone_inputs((x,))[0],))
    assert_close(got[0], expected[0], RTOL, ATOL, what="output")
    assert_close(got[1][0], expected[1][0], RTOL, ATOL, what="d input")
    for name in params:
        assert_close(got[2][name], expected[2][name], RTOL, ATOL, what=f"d {name}")

    clf.unswap(model)
    assert isinstance(model.lstm, nn.LSTM) and not isinstance(model.lstm, clf.LSTM)
    assert parametrize.is_parametrized(model.lstm, "weight_hh_l0")
    assert_close(model(x), expected[0], RTOL, ATOL, what="output after unswap")

    # removing the last parametrization leaves the module with the swapped layer class
    clf.swap(model, backend=backend)
    parametrize.remove_parametrizations(model.cell, "weight_hh")
    assert type(model.cell) is clf.GRUCell


def test_parametrized_layer_trains_with_an_optimizer_built_before_swap():
    torch.manual_seed(0)
    theirs, ours = Parametrized(), Parametrized()
    ours.load_state_dict(theirs.state_dict())
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    clf.swap(ours, backend="reference")
    assert isinstance(ours.lstm, clf.LSTM) and isinstance(ours.cell, clf.GRUCell)
    theirs.eval(), ours.eval()
    start = ours.lstm.parametrizations.weight_hh_l0.original1.detach().clone()
    for _ in range(3):
        x = torch.randn(6, 2, 3)
        for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        assert_close(b, a, RTOL, ATOL, what=name)
    assert (ours.lstm.parametrizations.weight_hh_l0.original1 != start).any()  # it trained


def test_dynamic_quantization_after_unswap():
    """quantize_dynamic matches exact classes, so ours stay float (the README says so):
    unswap first, and the quantized LSTM replaces the torch.nn one."""
    quantize_dynamic = pytest.importorskip("torch.ao.quantization").quantize_dynamic
    model = clf.swap(nn.Sequential(nn.LSTM(4, 6, num_layers=2)), backend="reference")
    x = torch.randn(5, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        kept = quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
        assert type(kept[0]) is clf.LSTM  # what the README warns about
        quantized = quantize_dynamic(clf.unswap(model), {nn.LSTM}, dtype=torch.qint8)
    assert type(quantized[0]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    torch.testing.assert_close(quantized(x)[0], model(x)[0], rtol=0.05, atol=0.05)
