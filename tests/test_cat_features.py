"""cnnlstm_fast::cat_features: a bidirectional layer's outputs joined along the features
(torch.cat(dim=-1)) into a cached buffer on CPU; its gradient the parts' slices."""

from __future__ import annotations

import pytest
import torch

import cnnlstm_fast.nn.rnn as rnn_module
from cnnlstm_fast.backends import compiled
from helpers import spy_on_rows_ops

ops = compiled.ops()
pytestmark = pytest.mark.skipif(ops is None or not hasattr(ops, "cat_features"),
                                reason="cnnlstm_fast._C without cat_features")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,widths", [((5, 3), (4, 4)), ((7, 130), (1, 33)), ((2, 0), (3, 3)),
                                          ((6, 2), (0, 5)), ((3,), (2, 7, 1))])
def test_cat_features_is_torch_cat_on_the_last_dimension(shape, widths, dtype):
    parts = [torch.randn(*shape, w).to(dtype) for w in widths]
    parts[-1] = parts[-1].transpose(0, -1).contiguous().transpose(0, -1)  # not contiguous
    for _ in range(2):  # the second from the block cache, whatever it held
        assert torch.equal(ops.cat_features(parts), torch.cat(parts, -1))


def test_cat_features_gradient_and_errors():
    a = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ops.cat_features([x, y]), (a, b))
    assert torch.autograd.gradgradcheck(lambda x, y: ops.cat_features([x, y]), (a, b))
    with pytest.raises(RuntimeError, match="must match in dtype, device and all but the last"):
        ops.cat_features([a.detach(), b.detach()[:2]])


def test_a_bidirectional_stack_joins_its_directions_through_the_op(monkeypatch):
    calls = spy_on_rows_ops(monkeypatch)
    m = rnn_module.LSTM(3, 4, num_layers=2, bidirectional=True, backend="reference")
    m(torch.randn(5, 2, 3))
    assert calls == ["cat_features"] * 2, calls
