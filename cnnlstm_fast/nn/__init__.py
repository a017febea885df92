"""Drop-in torch.nn recurrent layers, and the conv-to-sequence block."""

from .conv2seq import ConvToSequence
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = ["ConvToSequence", "GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell"]
