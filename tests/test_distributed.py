"""Training under DistributedDataParallel (PyTorch's own engine): two CPU processes on
gloo, each with its own shard of the data, train a stacked bidirectional LSTM and a
packed GRU for a few SGD steps with our layers and with torch.nn's. DDP must keep the
replicas equal and end where torch.nn's run ends; the same engine carries NCCL on GPUs."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_padded_sequence

import cnnlstm_fast as clf

from helpers import module_backends

WORLD = 2
STEPS = 3
TIMEOUT_S = 300


class _Tagger(nn.Module):
    """A stacked bidirectional LSTM over padded input, then a GRU over packed input."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(14, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, lengths):
        y, _ = self.lstm(x)
        packed = pack_padded_sequence(y.transpose(0, 1), lengths, enforce_sorted=False)
        _, h = self.gru(packed)
        return self.head(h[-1])


def _train(backend, rank, bucket_view):
    """Parameters after STEPS steps on this rank's shard; backend None = torch.nn."""
    torch.manual_seed(0)
    model = _Tagger()
    if backend is not None:
        clf.swap(model, backend=backend)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(4, 9, 5, generator=gen)
        lengths = torch.randint(1, 10, (4,), generator=gen)
        target = torch.randint(0, 3, (4,), generator=gen)
        loss = nn.functional.cross_entropy(ddp(x, lengths), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, init_file, backends, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for backend in [None, *backends]:
            for bucket_view in (False, True):
                params = _train(backend, rank, bucket_view)
                gathered = [None] * WORLD
                dist.all_gather_object(gathered, [p.numpy() for p in params])
                if rank == 0:
                    results[(backend, bucket_view)] = gathered
    finally:
        dist.destroy_process_group()


def test_ddp_training_matches_torch_nn_and_keeps_replicas_equal(tmp_path):
    backends = module_backends()
    with mp.Manager() as manager:
        results = manager.dict()
        context = mp.spawn(_worker, args=(str(tmp_path / "init"), backends, results),
                           nprocs=WORLD, join=False)
        deadline = time.monotonic() + TIMEOUT_S  # a hung rendezvous fails, not hangs CI
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"DDP workers did not finish in {TIMEOUT_S} s")
        results = dict(results)
    for bucket_view in (False, True):
        want = [torch.from_numpy(a) for a in results[(None, bucket_view)][0]]
        for backend in backends:
            ranks = results[(backend, bucket_view)]
            for rank in range(1, WORLD):
                for a, b in zip(ranks[0], ranks[rank]):
                    assert (a == b).all(), f"{backend}: replicas differ after DDP training"
            for i, (got, exp) in enumerate(zip(ranks[0], want)):
                torch.testing.assert_close(
                    torch.from_numpy(got), exp, rtol=1e-5, atol=1e-6,
                    msg=lambda m: f"{backend} (bucket view {bucket_view}), parameter {i}: {m}",
                )
    # the training moved the weights (a comparison of untouched weights proves nothing)
    start = _start_params()
    assert any((torch.from_numpy(a) - s).abs().max() > 1e-3
               for a, s in zip(results[(None, False)][0], start))


def _start_params():
    torch.manual_seed(0)
    return [p.detach() for p in _Tagger().parameters()]


@pytest.fixture(autouse=True)
def _needs_gloo():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
