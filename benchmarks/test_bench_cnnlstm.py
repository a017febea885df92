"""Whole CNN-LSTM models (cnnlstm_fast.models.CNNLSTM), forward and training step, per
backend; torch.nn is backend="torch" (configurations: benchmarks/conftest.py)."""

import pytest

from cnnlstm_fast.bench import providers

MODELS = True


def test_cnnlstm(benchmark, cfg, provider):
    try:
        step = providers.step_for(cfg, provider)
    except providers.Skip as why:
        pytest.skip(str(why))
    benchmark.group = cfg.name
    benchmark(step)
