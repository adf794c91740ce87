"""Objectives on a mesh: DPO with its frozen reference (fsdp 4 × tensor 2) and distillation with a wider
teacher (data 2 × fsdp 2 × tensor 2) train on 8 simulated CPU devices exactly as on one device (losses
of 3 steps within 1e-4 relative, parameters after them within 1e-4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from causal_helpers import build_hf
from conftest import save_tiny_bert, xla_env


@pytest.mark.slow
def test_objectives_on_eight_devices_equal_one(tmp_path, minilm_dir):
    causal = tmp_path / "llama"
    build_hf("llama-gqa-tied").save_pretrained(causal)
    common = dict(random_init=True, vocab_size=30522, num_labels=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    student = save_tiny_bert(tmp_path / "student", **common)
    teacher = save_tiny_bert(tmp_path / "teacher", seed=1, hidden_size=48, num_hidden_layers=3,
                             intermediate_size=40, **common)
    out = tmp_path / "out.json"
    env = xla_env(8)
    subprocess.run([sys.executable, str(Path(__file__).parent / "objective_mesh_helper.py"), str(causal),
                    str(student), str(teacher), str(out)], check=True, env=env, timeout=1200)
    results = json.loads(out.read_text())
    for kind, r in results.items():
        print(kind, r)
        assert np.allclose(r["many"], r["one"], rtol=1e-4, atol=0), (kind, r)
        assert r["param_diff"] <= 1e-4, (kind, r["param_diff"])
        assert len(set(np.round(r["one"], 6))) == 3, kind   # the loss moves: the steps train something
