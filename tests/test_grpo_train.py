"""GRPO end to end through `jaxft train`: a tiny random Llama learns a dense verifiable reward (with LoRA and a
KL to the adapters-off base), a stopped and resumed run equals the straight one bit for bit (full fine-tuning
with a frozen reference copy, μ = 2, gradient accumulation, a checkpoint in the middle of a rollout), and the
same run on 8 simulated devices (fsdp × tensor) gives the one-device losses."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxft.cli import main

from conftest import xla_env
from test_dpo_train import save_base

REWARD_MODULE = '''
def d_share(prompts, completions, **columns):
    """The share of the completion's words that are d-words (d0 … d19): about 0.4 for the random base."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w.startswith("d") for w in words) / max(len(words), 1))
    return out
'''


def setup_run(tmp: Path) -> list[str]:
    """A tiny random Llama, prompts of 1-4 random w-words (48 to train on, 16 held out), the reward module on
    the path; the overrides every run here shares."""
    base = save_base(tmp / "base")
    rng = random.Random(0)
    rows = [{"prompt": " ".join(f"w{rng.randrange(20)}" for _ in range(rng.randrange(1, 5))), "id": i}
            for i in range(64)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (tmp / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    (tmp / "grpo_rewards_mod.py").write_text(REWARD_MODULE)
    (tmp / "grpo.yaml").write_text(f"""
model: {{name_or_path: {base}, task: causal-lm}}
data: {{train: {tmp / 'train.jsonl'}, validation: {tmp / 'heldout.jsonl'}, max_length: 16, pad_to_multiple_of: 8}}
optim: {{warmup_steps: 0, schedule: constant}}
train:
  objective: grpo
  batch_size: 16
  grpo:
    num_generations: 4
    max_completion_length: 8
    rewards: [{{function: "grpo_rewards_mod:d_share"}}]
""")
    return [str(tmp / "grpo.yaml")]


FLAKY_MODULE = REWARD_MODULE + '''
import os
calls = 0


def flaky(prompts, completions, **columns):
    """d_share, but its third call raises while FLAKY_FAIL is set."""
    global calls
    calls += 1
    if calls == 3 and os.environ.get("FLAKY_FAIL"):
        raise ZeroDivisionError("the grader crashed")
    return d_share(prompts, completions)
'''


def rows_of(run: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.slow
def test_grpo_lora_learns_a_verifiable_reward(tmp_path, monkeypatch):
    """LoRA rank 8 with β = 0.04 (the reference is the base with adapters off): the logged reward rises by at
    least 0.3 and greedy completions of held-out prompts score at least 0.9; TRL's metric names are logged
    and rollouts.jsonl holds sampled rows."""
    monkeypatch.syspath_prepend(str(tmp_path))
    common = setup_run(tmp_path)
    run = tmp_path / "run"
    assert main(["train", *common, "model.lora.rank=8", "model.lora.alpha=16", "optim.lr=0.02",
                 "train.grpo.beta=0.04", "train.steps=48", "train.log_every=8", "train.eval_every=48",
                 f"output_dir={run}"]) == 0
    train = rows_of(run, "train")
    assert {"loss", "reward", "reward_std", "rewards/d_share/mean", "kl", "clip_ratio/low_mean",
            "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
            "completions/clipped_ratio", "frac_reward_zero_std", "time/rollout_s", "time/reward_s",
            "time/update_s"} <= set(train[0])
    first, last = train[0]["reward"], train[-1]["reward"]
    assert 0.25 <= first <= 0.6 and last - first >= 0.3, (first, last)
    assert train[-1]["kl"] > 0
    held = rows_of(run, "eval")[-1]
    assert held["reward"] >= 0.9 and held["prompts"] == 16, held
    shown = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(shown) == 4 * len(train) and {"step", "prompt", "completion", "reward", "advantage"} <= set(shown[0])


def export_tensors(run: Path, out: Path) -> dict:
    assert main(["export", str(run), str(out)]) == 0
    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow
def test_grpo_resume_is_bitwise(tmp_path, monkeypatch):
    """Full fine-tuning, β = 0.04 (a frozen copy of the start as reference), μ = 2 (stored old log-probs),
    gradient accumulation 2: stopping at step 3 (inside the second rollout's two steps) and resuming gives the
    straight run's parameters bit for bit and its logged losses and rewards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    common = setup_run(tmp_path) + ["optim.lr=0.01", "train.grpo.beta=0.04", "train.grpo.num_iterations=2",
                                    "train.grad_accum=2", "train.steps=6", "train.log_every=1"]
    assert main(["train", *common, f"output_dir={tmp_path / 'straight'}"]) == 0
    assert main(["train", *common, f"output_dir={tmp_path / 'resumed'}", "train.stop_at_step=3"]) == 0
    assert main(["train", *common, f"output_dir={tmp_path / 'resumed'}"]) == 0
    a = export_tensors(tmp_path / "straight", tmp_path / "a")
    b = export_tensors(tmp_path / "resumed", tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    base = load_file(str(next((tmp_path / "base").glob("*.safetensors"))))
    assert any(not np.array_equal(a[k], base[k]) for k in a if k in base), "the run trained nothing"
    keys = ("loss", "reward", "grad_norm", "kl", "clip_ratio/region_mean")
    straight = [[r[k] for k in keys] for r in rows_of(tmp_path / "straight", "train")]
    resumed = [[r[k] for k in keys] for r in rows_of(tmp_path / "resumed", "train")]
    assert straight == resumed and len(straight) == 6
    assert max(r[4] for r in straight) > 0, "μ = 2 never left the clip range: the old log-probs were not used"


MESH_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from jaxft.cli import main
sys.exit(main(["train", *json.loads(sys.argv[2])]))
"""


@pytest.mark.slow
def test_grpo_on_a_mesh_equals_one_device(tmp_path):
    """The same run (sampling included) on 8 simulated devices, fsdp 4 × tensor 2, logs the one-device losses
    and rewards within 1e-4."""
    common = setup_run(tmp_path) + ["optim.lr=0.01", "optim.eps=1e-4", "train.grpo.beta=0.04", "train.steps=4",
                                    "train.log_every=1"]
    runs = {"one": ([], 1), "mesh": (["mesh.fsdp=4", "mesh.tensor=2", "mesh.data=1"], 8)}
    for name, (mesh, devices) in runs.items():
        args = json.dumps(common + mesh + [f"output_dir={tmp_path / name}"])
        subprocess.run([sys.executable, "-c", MESH_RUN, str(tmp_path), args], check=True, env=xla_env(devices),
                       timeout=900, cwd=tmp_path)
    mesh_line = next(x for x in (tmp_path / "mesh" / "train.log").read_text().splitlines() if " mesh {" in x)
    assert "'fsdp': 4" in mesh_line and "'tensor': 2" in mesh_line, mesh_line
    one, many = rows_of(tmp_path / "one", "train"), rows_of(tmp_path / "mesh", "train")
    assert len(one) == len(many) == 4
    for k in ("loss", "reward", "kl", "grad_norm"):
        np.testing.assert_allclose([r[k] for r in many], [r[k] for r in one], rtol=1e-4, atol=1e-6, err_msg=k)
    assert len({round(r["reward"], 6) for r in one}) > 1   # the rollouts differ from step to step


@pytest.mark.slow
def test_a_failing_reward_keeps_the_work_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """A reward function raising at step 3: exit 2 naming the reward and the error, the two steps trained are
    checkpointed, and re-running once the grader is fixed resumes from them and ends where a run that never
    failed ends, bit for bit (the failed rollout's prompts were put back)."""
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    common = setup_run(tmp_path) + ["optim.lr=0.01", "train.steps=4", "train.log_every=1",
                                    "train.grpo.rewards=[{function: 'grpo_flaky_mod:flaky'}]"]
    (tmp_path / "grpo_flaky_mod.py").write_text(FLAKY_MODULE)
    assert main(["train", *common, f"output_dir={tmp_path / 'straight'}"]) == 0
    importlib.reload(importlib.import_module("grpo_flaky_mod"))
    monkeypatch.setenv("FLAKY_FAIL", "1")
    run = tmp_path / "failed"
    capsys.readouterr()
    assert main(["train", *common, f"output_dir={run}"]) == 2
    assert "error: reward 'flaky' raised ZeroDivisionError: the grader crashed" in capsys.readouterr().err
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert "the 2 steps trained so far are checkpointed" in (run / "train.log").read_text()
    monkeypatch.delenv("FLAKY_FAIL")
    assert main(["train", *common, f"output_dir={run}"]) == 0
    a, b = export_tensors(tmp_path / "straight", tmp_path / "a"), export_tensors(run, tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_rollouts_compile_once_per_prompt_bucket(tmp_path, monkeypatch):
    """Three rollouts with prompts of different lengths (one bucket of 8 tokens) run one compiled sampling
    program; every completion ends at its first eos (or at the length limit) and its tokens follow the prompt's
    real tokens in the training row."""
    from jaxft.config import load_config
    from jaxft.train.loop import Trainer
    from jaxft.train.run import claim_run_dir

    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(setup_run(tmp_path)[0], ["optim.lr=0.01", "train.steps=3", f"output_dir={tmp_path / 'run'}"])
    with claim_run_dir(cfg):
        trainer = Trainer(cfg)
        task, fn = trainer.task, trainer.fn
        batches = [task.train_batch(step, fn, fn.params) for step in range(3)]
        programs = [p for key, p in task.programs.items() if key != "logps"]
        assert len(programs) == 1 and programs[0].jitted._cache_size() == 1
        eos = task.eos[0]
        for b in batches:
            for ids, attention, loss in zip(b["input_ids"], b["attention_mask"], b["loss_mask"]):
                n = int(attention.sum())
                completion = ids[loss > 0]
                assert attention[:n].all() and not attention[n:].any()          # right-padded rows
                assert loss[n - len(completion):n].all()                        # the completion ends the row
                ends = np.flatnonzero(completion == eos)
                assert len(completion) == 8 if not len(ends) else ends[0] == len(completion) - 1
        trainer.ckpts.close()
