"""Config: YAML + overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxft.config import ConfigError, load_config, save_config
from conftest import xla_env

BASE = ["model.name_or_path=some/model"]


def test_yaml_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\noptim: {lr: 1.0e-4}\n")
    cfg = load_config(path, ["optim.lr=3e-5", "train.steps=200", "data.clean.dedup_train=false"])
    assert cfg.optim.lr == 3e-5 and cfg.train.steps == 200 and cfg.data.clean.dedup_train is False
    assert cfg.optim.schedule == "linear" and cfg.train.batch_size == 32  # defaults
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "config key 'optim.lrr': unknown key; did you mean 'optim.lr'?"),
    (["trian.steps=3"], "config key 'trian': unknown key; did you mean 'train'?"),
    (["train.batch_size=abc"], "config key 'train.batch_size': Input should be a valid integer"),
    (["optim.lr=-1"], "config key 'optim.lr': Input should be greater than 0 (got -1)"),
    (["optim.schedule=exp"], "config key 'optim.schedule': Input should be 'linear', 'cosine', 'constant', 'cosine_restarts' or 'polynomial'"),
    (["train.batch_size=10", "train.grad_accum=3"], "train.batch_size=10 is not divisible by train.grad_accum=3"),
    (["mesh.tensor=0"], "mesh.tensor=0: use a positive size or -1"),
    (["optim.warmup_steps=3", "optim.warmup_ratio=0.1"], "not both"),
    (["optim"], "is not of the form key.sub=value"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + overrides)
    assert message in str(e.value)


def test_missing_model_is_named():
    with pytest.raises(ConfigError, match="config key 'model': required key is missing"):
        load_config(None, [])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_batch_not_divisible_by_data_parallel_devices_exits_nonzero(tmp_path):
    """On 8 (simulated) devices a global batch of 12 cannot be split evenly: exit 2, naming the key."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: m}}\ndata: {{train: x.tsv}}\ntrain: {{batch_size: 12}}\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    env = xla_env(8)
    proc = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", str(cfg)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "train.batch_size=12 must be divisible by the data-parallel devices (8)" in proc.stderr
