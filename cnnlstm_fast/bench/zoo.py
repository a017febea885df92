"""Whole models at published shapes, written with torch.nn layers, for the ``models``
bench suite: what users swap our layers into (``cnnlstm_fast.swap``), timed against the
same model left on torch.nn.

Each model is a plain ``nn.Module`` whose recurrent layers are ``nn.LSTM``/``nn.GRU``
(and ``nn.LSTMCell``/``nn.GRUCell``) as the papers' reference code has them; ``cell``
picks LSTM or GRU throughout. The Config fields describe the main recurrent stack
(``steps``: its sequence length; ``input_size``: the model's raw input channels or
features; ``hidden_size``, ``layers``, ``directions``).

- ``deepconvlstm`` (Ordonez and Roggen, 2016): 4 Conv1d (64 filters, kernel 5, valid)
  over a window of sensor channels, then a 2-layer LSTM (128) on the time-major
  sequence, a linear head on the last step. x: (B, channels, T).
- ``crnn`` (Shi et al., 2016), lighter convolutions: a Conv2d stack over a (1, 32, 4W)
  text-line image down to height 1, the W columns as a sequence for a 2-layer BiLSTM
  (256), a per-column linear head (37 symbols). x: (B, 1, 32, 4 * steps).
- ``lrcn`` (Donahue et al., 2015), small per-frame CNN: T frames (3, 32, 32) through a
  Conv2d stack and global pooling, a 1-layer LSTM over the frame features, a head on the
  last step. x: (B, T, 3, 32, 32).
- ``textrnn``: token ids (0 pads) -> Embedding -> packed 2-layer BiGRU/BiLSTM on
  unsorted lengths (8..T) -> both directions' last h -> linear. x: (B, T) int64.
- ``seq2seq``: an LSTM encoder over T steps and an LSTMCell decoder with dot-product
  attention over the encoder outputs for T // 2 steps (teacher forcing from x).
  x: (B, T, features).
- ``stacked``: a 3-layer bidirectional LSTM/GRU (batch_first) and a head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

RNNS = {"lstm": nn.LSTM, "gru": nn.GRU}
CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}
VOCAB = 10_000


class DeepConvLSTM(nn.Module):
    def __init__(self, cell, channels, hidden, layers, classes=6, filters=64):
        super().__init__()
        convs = []
        for i in range(4):
            convs += [nn.Conv1d(channels if i == 0 else filters, filters, 5), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.rnn = RNNS[cell](filters, hidden, num_layers=layers, dropout=0.5)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        y, _ = self.rnn(self.convs(x).permute(2, 0, 1))  # (T', B, filters)
        return self.head(self.dropout(y[-1]))


class CRNN(nn.Module):
    def __init__(self, cell, channels, hidden, layers, classes=37):
        super().__init__()

        def block(c_in, c_out, pool):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.MaxPool2d(pool)]

        # height 32 -> 1, width 4W -> W
        self.cnn = nn.Sequential(*block(channels, 64, 2), *block(64, 128, 2),
                                 *block(128, 256, (2, 1)), *block(256, 256, (2, 1)),
                                 *block(256, 256, (2, 1)))
        self.rnn = RNNS[cell](256, hidden, num_layers=layers, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        features = self.cnn(x).squeeze(2).permute(2, 0, 1)  # (W, B, 256)
        y, _ = self.rnn(features)
        return self.head(y)


class LRCN(nn.Module):
    def __init__(self, cell, channels, hidden, layers, classes=10, features=128):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, features, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten())
        self.rnn = RNNS[cell](features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        batch, steps = x.shape[:2]
        frames = self.cnn(x.flatten(0, 1)).view(batch, steps, -1)
        y, _ = self.rnn(frames)
        return self.head(y[:, -1])


class TextRNN(nn.Module):
    def __init__(self, cell, embedding, hidden, layers, classes=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embedding, padding_idx=0)
        self.rnn = RNNS[cell](embedding, hidden, num_layers=layers, bidirectional=True,
                              batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens):
        lengths = (tokens != 0).sum(1).cpu()
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        _, hidden = self.rnn(packed)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.head(torch.cat((h_n[-2], h_n[-1]), 1))


class Seq2Seq(nn.Module):
    def __init__(self, cell, features, hidden, layers, classes=32):
        super().__init__()
        self.cell = cell
        self.encoder = RNNS[cell](features, hidden, num_layers=layers, batch_first=True)
        self.decoder = CELLS[cell](features + hidden, hidden)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        memory, hidden = self.encoder(x)  # (B, T, H)
        h = hidden[0][-1] if self.cell == "lstm" else hidden[-1]
        state = (h, hidden[1][-1]) if self.cell == "lstm" else h
        context = torch.zeros_like(h)
        outputs = []
        for t in range(x.shape[1] // 2):
            state = self.decoder(torch.cat((x[:, t], context), 1), state)
            h = state[0] if self.cell == "lstm" else state
            weights = torch.softmax(torch.bmm(memory, h.unsqueeze(2)), 1)  # (B, T, 1)
            context = (weights * memory).sum(1)
            outputs.append(self.head(torch.cat((h, context), 1)))
        return torch.stack(outputs, 1)


class Stacked(nn.Module):
    def __init__(self, cell, features, hidden, layers, classes=10):
        super().__init__()
        self.rnn = RNNS[cell](features, hidden, num_layers=layers, bidirectional=True,
                              batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


MODELS = {"deepconvlstm": DeepConvLSTM, "crnn": CRNN, "lrcn": LRCN, "textrnn": TextRNN,
          "seq2seq": Seq2Seq, "stacked": Stacked}

#: The models suite's shapes (Config fields; see the module docstring).
SHAPES = {
    "cpu": (
        dict(model="deepconvlstm", batch=64, steps=128, input_size=9, hidden_size=128, layers=2),
        dict(model="deepconvlstm", batch=8, steps=128, input_size=9, hidden_size=128, layers=2),
        dict(model="crnn", batch=32, steps=25, input_size=1, hidden_size=256, layers=2,
             directions=2),
        dict(model="lrcn", batch=8, steps=16, input_size=3, hidden_size=256, layers=1),
        dict(model="textrnn", batch=32, steps=64, input_size=128, hidden_size=128, layers=2,
             directions=2),
        dict(model="seq2seq", batch=16, steps=50, input_size=64, hidden_size=128, layers=1),
        dict(model="stacked", batch=16, steps=64, input_size=128, hidden_size=256, layers=3,
             directions=2),
    ),
    "cuda": (
        dict(model="deepconvlstm", batch=256, steps=128, input_size=9, hidden_size=128, layers=2),
        dict(model="crnn", batch=64, steps=50, input_size=1, hidden_size=256, layers=2,
             directions=2),
        dict(model="lrcn", batch=32, steps=16, input_size=3, hidden_size=512, layers=1),
        dict(model="textrnn", batch=128, steps=128, input_size=256, hidden_size=256, layers=2,
             directions=2),
        dict(model="seq2seq", batch=64, steps=100, input_size=128, hidden_size=256, layers=1),
        dict(model="stacked", batch=32, steps=256, input_size=256, hidden_size=512, layers=3,
             directions=2),
    ),
}


def build(cfg, dtype: torch.dtype) -> nn.Module:
    """The torch.nn model of ``cfg`` (a bench Config with ``model`` in MODELS)."""
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {cfg.model!r}")
    model = MODELS[cfg.model](cfg.cell, cfg.input_size, cfg.hidden_size, cfg.layers)
    return model.to(device=cfg.device, dtype=dtype)


def example_input(cfg, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random input of ``cfg``'s model (fixed ``seed``: the same for every provider)."""
    gen = torch.Generator().manual_seed(seed)
    b, t, c = cfg.batch, cfg.steps, cfg.input_size
    if cfg.model == "textrnn":
        lengths = torch.randint(min(8, t), t + 1, (b,), generator=gen)
        tokens = torch.randint(1, VOCAB, (b, t), generator=gen)
        tokens[torch.arange(t)[None, :] >= lengths[:, None]] = 0
        return tokens.to(cfg.device)
    shape = {"deepconvlstm": (b, c, t), "crnn": (b, c, 32, 4 * t), "lrcn": (b, t, c, 32, 32),
             "seq2seq": (b, t, c), "stacked": (b, t, c)}[cfg.model]
    return torch.randn(*shape, generator=gen).to(device=cfg.device, dtype=dtype)
