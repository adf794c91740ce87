"""The README's SST-2 figure: all-MiniLM-L6-v2, 4,000 rows, one epoch → at least 0.78 test accuracy.

A plain PyTorch loop with the same recipe (scripts/torch_baseline.py) reaches 0.79–0.80 depending on
the seed; this guards against any regression in the model, data pipeline, optimiser or loop.
"""

from __future__ import annotations

import pytest

from conftest import ROOT, shared_data
from jaxft.config import load_config
from jaxft.train.loop import train


def recipe(name: str, tmp_path):
    """A configs/ recipe pointed at the shared SST-2 files, with its cache and run under `tmp_path`."""
    sst2 = shared_data("sst2")
    return load_config(ROOT / "configs" / name, [
        f"data.train={sst2 / 'train.tsv'}", f"data.test={sst2 / 'test.tsv'}",
        f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"])


@pytest.mark.slow
def test_minilm_sst2_recipe_reaches_078(tmp_path, minilm_dir):
    cfg = recipe("sst2_minilm.yaml", tmp_path)
    assert (cfg.train.batch_size, cfg.data.max_length, cfg.optim.lr, cfg.data.max_train_rows) == (32, 64, 5e-5, 4000)
    summary = train(cfg)
    assert summary["step"] == 125
    assert summary["test"]["examples"] == 872
    assert summary["test"]["accuracy"] >= 0.78, summary["test"]
