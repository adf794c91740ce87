"""The README's SST-2 figure: all-MiniLM-L6-v2, 4,000 rows, one epoch → at least 0.78 test accuracy.

A plain PyTorch loop with the same recipe (scripts/torch_baseline.py) reaches 0.79–0.80 depending on
the seed; this guards against any regression in the model, data pipeline, optimiser or loop.
"""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys

from conftest import ROOT, shared_data
from jaxft.config import load_config


def overrides(tmp_path) -> list[str]:
    """A configs/ recipe pointed at the shared SST-2 files, with its cache and run under `tmp_path`."""
    sst2 = shared_data("sst2")
    return [f"data.train={sst2 / 'train.tsv'}", f"data.test={sst2 / 'test.tsv'}",
            f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]


def recipe(name: str, tmp_path):
    return load_config(ROOT / "configs" / name, overrides(tmp_path))


def train_recipe(name: str, tmp_path) -> dict:
    """`jaxft train configs/NAME` (with `overrides`) in a process of its own at XLA's default optimisation
    level, not the suite's -O0 (tests/conftest.py): its 125 MiniLM steps are real work. → the run's summary."""
    env = dict(os.environ, XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                              if "optimization_level" not in f))
    proc = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", str(ROOT / "configs" / name),
                           *overrides(tmp_path)], capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])[0]


@pytest.mark.slow
def test_minilm_sst2_recipe_reaches_078(tmp_path, minilm_dir):
    cfg = recipe("sst2_minilm.yaml", tmp_path)
    assert (cfg.train.batch_size, cfg.data.max_length, cfg.optim.lr, cfg.data.max_train_rows) == (32, 64, 5e-5, 4000)
    summary = train_recipe("sst2_minilm.yaml", tmp_path)
    assert summary["step"] == 125
    assert summary["test"]["examples"] == 872
    assert summary["test"]["accuracy"] >= 0.78, summary["test"]
