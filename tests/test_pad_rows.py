"""cnnlstm_fast::pad_rows, the packed-to-padded step of packed input on CPU: packed
rows scattered to their padded positions, zeros elsewhere, its gradient the rows'
gather; the module takes it where it can (and gives the same results as without)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import cnnlstm_fast.nn.rnn as rnn_module
from cnnlstm_fast.backends import compiled
from helpers import spy_on_rows_ops

ops = compiled.ops()
pytestmark = pytest.mark.skipif(ops is None or not hasattr(ops, "pad_rows"),
                                reason="cnnlstm_fast._C without pad_rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows,features", [(7, 3), (130, 1), (300, 67), (5, 0)])
def test_pad_rows_scatters_rows_and_zeros_the_rest(rows, features, dtype):
    index = torch.randperm(rows)[: rows // 2 + 1].sort().values
    data = torch.randn(len(index), features).to(dtype)
    want = torch.zeros(rows, features, dtype=dtype).index_copy_(0, index, data)
    for _ in range(2):  # the second from the block cache, whatever it held
        got = ops.pad_rows(data, index, rows)
        assert torch.equal(got, want)


def test_pad_rows_gradient_and_errors():
    index = torch.tensor([0, 2, 3, 6])
    data = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: ops.pad_rows(d, index, 8), (data,))
    with pytest.raises(RuntimeError, match="index must be int64 of shape"):
        ops.pad_rows(data.detach(), index.int(), 8)
    with pytest.raises(RuntimeError, match="rows .3. must be at least"):
        ops.pad_rows(data.detach(), index, 3)
    with pytest.raises(RuntimeError, match="index 9 out of range for 8 rows"):
        ops.pad_rows(data.detach(), torch.tensor([0, 1, 2, 9]), 8)


def test_pack_rows_gathers_and_both_gradients_are_each_other():
    index = torch.tensor([0, 2, 3, 6])
    padded = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.equal(ops.pack_rows(padded, index), padded.index_select(0, index))
    assert torch.autograd.gradcheck(lambda p: ops.pack_rows(p, index), (padded,))
    assert torch.autograd.gradgradcheck(lambda p: ops.pack_rows(p, index), (padded,))
    data = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda d: ops.pad_rows(d, index, 8), (data,))
    with pytest.raises(RuntimeError, match="index 8 out of range for 8 rows"):
        ops.pack_rows(padded.detach(), torch.tensor([8]))


def test_a_packed_layer_pads_and_packs_through_the_ops(monkeypatch):
    calls = spy_on_rows_ops(monkeypatch)
    m = rnn_module.GRU(3, 4, bidirectional=True, backend="reference")
    x = pack_padded_sequence(torch.randn(5, 3, 3), torch.tensor([5, 2, 4]), enforce_sorted=False)
    m(x)
    assert sorted(calls) == ["cat_features"] + ["pack_rows"] * 2 + ["pad_rows"] * 2, calls
