"""cnnlstm_fast: drop-in fast LSTM/GRU/RNN layers for PyTorch with selectable backends.

>>> import cnnlstm_fast as clf
>>> lstm = clf.LSTM(32, 64, num_layers=2, batch_first=True)   # a torch.nn.LSTM
"""

from ._version import __version__
from .backends import available_backends, get_default, set_backend, use_backend
from . import models
from .nn import GRU, LSTM, RNN, ConvToSequence, GRUCell, LSTMCell, RNNCell
from .nn.swap import swap, unswap
from .tune import explain, get_tuning, set_tuning, tune

__all__ = [
    "ConvToSequence",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "RNN",
    "RNNCell",
    "__version__",
    "available_backends",
    "explain",
    "get_default",
    "get_tuning",
    "set_backend",
    "set_tuning",
    "swap",
    "tune",
    "unswap",
    "use_backend",
]
