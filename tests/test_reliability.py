"""Faults caused on purpose: stop/resume, SIGTERM, SIGKILL mid-save, NaN steps, changed configs, bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import save_tiny_bert
from jaxft.cli import main

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "cast", "music", "very", "quite"]


@pytest.fixture
def setup(tmp_path, minilm_dir):
    """A tiny BERT (with dropout, so RNG state matters) and 120 synthetic rows."""
    model = save_tiny_bert(tmp_path / "tiny", vocab_size=30522, num_labels=2, tokenizer_from=minilm_dir)
    rng = np.random.RandomState(0)
    rows = []
    for i in range(120):
        words = rng.choice(WORDS, 6)
        rows.append(f"{' '.join(words)} {i}\t{'pos' if set(words) & {'good', 'great', 'fine'} else 'neg'}")
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")

    def config(name: str, **over) -> list[str]:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"model: {{name_or_path: {model}}}\n"
                       f"data: {{train: {tmp_path / 'train.tsv'}, max_length: 16, cache_dir: {tmp_path / 'cache'}}}\n"
                       "optim: {lr: 1.0e-3, warmup_steps: 2}\n"
                       "train: {batch_size: 8, steps: 20, log_every: 1, log_batches: true}\n")
        return [str(cfg), f"output_dir={tmp_path / name}"] + [f"{k}={v}" for k, v in over.items()]
    return tmp_path, config


def export_tensors(run: Path, out: Path) -> dict:
    assert main(["export", str(run), str(out)]) == 0
    return load_file(out / "model.safetensors")


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def batches(run: Path) -> list:
    return [json.loads(x) for x in (run / "batches.jsonl").read_text().splitlines()]


def test_stop_and_resume_is_bitwise_identical(setup):
    tmp, config = setup
    assert main(["train", *config("straight")]) == 0
    assert main(["train", *config("resumed"), "train.stop_at_step=10"]) == 0
    assert len(batches(tmp / "resumed")) == 10
    assert main(["train", *config("resumed"), "train.stop_at_step=10"]) == 0  # the same command continues
    assert "resumed from step 10" in (tmp / "resumed" / "train.log").read_text()
    assert batches(tmp / "resumed") == batches(tmp / "straight")  # same examples at every step
    assert_bitwise_equal(export_tensors(tmp / "straight", tmp / "e1"), export_tensors(tmp / "resumed", tmp / "e2"))
    steps = [json.loads(x)["step"] for x in (tmp / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # no step logged twice


def test_math_changing_config_is_refused_on_resume(setup, capsys):
    tmp, config = setup
    assert main(["train", *config("run"), "train.steps=4"]) == 0
    capsys.readouterr()
    assert main(["train", *config("run"), "train.steps=4", "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 → 0.01" in err and "checkpoint.allow_changes=true" in err
    assert main(["train", *config("run"), "train.steps=6", "train.eval_every=3"]) == 0  # extend: allowed
    assert main(["train", *config("run"), "train.steps=8", "optim.lr=0.01", "checkpoint.allow_changes=true"]) == 0


def test_nan_steps_are_skipped_and_counted(setup, monkeypatch):
    tmp, config = setup
    monkeypatch.setenv("JAXFT_FAULT_NAN_STEPS", "3,4")
    assert main(["train", *config("run")]) == 0
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_steps")] == [3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r) and len([r for r in rows if "loss" in r]) == 18
    assert "step 3: non-finite loss or gradient, update skipped" in (tmp / "run" / "train.log").read_text()


def test_too_many_nan_steps_stop_with_the_last_good_state(setup, monkeypatch, capsys):
    tmp, config = setup
    assert main(["train", *config("good"), "train.stop_at_step=2"]) == 0
    monkeypatch.setenv("JAXFT_FAULT_NAN_STEPS", ",".join(str(s) for s in range(3, 21)))
    assert main(["train", *config("bad"), "train.max_bad_steps=4"]) == 3
    err = capsys.readouterr().err
    assert "4 non-finite steps in a row" in err and "lower optim.lr" in err
    # the checkpoint written at the stop holds exactly the parameters after step 2
    assert_bitwise_equal(export_tensors(tmp / "good", tmp / "e1"), export_tensors(tmp / "bad", tmp / "e2"))


def spawn(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_steps(run: Path, n: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "batches.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"{run} did not reach step {n}")


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_same_command_finishes_identically(setup):
    tmp, config = setup
    args = config("preempted", **{"train.steps": 60})
    proc = spawn(args)
    wait_for_steps(tmp / "preempted", 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "preempted at step" in err
    done = [int(p.name) for p in (tmp / "preempted" / "checkpoints").iterdir() if p.name.isdigit()]
    assert done and max(done) < 60
    assert main(["train", *args]) == 0
    assert main(["train", *config("straight", **{"train.steps": 60})]) == 0
    assert batches(tmp / "preempted") == batches(tmp / "straight")
    assert_bitwise_equal(export_tensors(tmp / "preempted", tmp / "e1"), export_tensors(tmp / "straight", tmp / "e2"))


def unfinished_saves(ckpt_dir: Path) -> list[int]:
    """Steps whose save has begun and not been committed: Orbax's temporary folders
    (`N.orbax-checkpoint-tmp-*`) and step folders without its commit record."""
    out = []
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        head = p.name.split(".")[0]
        if head.isdigit() and (".orbax-checkpoint-tmp" in p.name or not (p / "_CHECKPOINT_METADATA").is_file()):
            out.append(int(head))
    return sorted(out)


@pytest.mark.slow
def test_sigkill_during_async_saves_resumes_from_a_complete_checkpoint(setup):
    """SIGKILL lands while a save is being written (its unfinished folder is seen before the kill and is
    still there after it); the same command resumes from the newest committed step, never the
    unfinished one, and ends bitwise equal to an uninterrupted run, on the same batches."""
    tmp, config = setup
    args = config("killed", **{"train.steps": 60, "checkpoint.every": 1, "checkpoint.keep": 3})
    ckpt_dir = tmp / "killed" / "checkpoints"
    proc = spawn(args)
    wait_for_steps(tmp / "killed", 12, proc)
    deadline = time.time() + 120
    while not unfinished_saves(ckpt_dir):  # saves are asynchronous and back to back: catch one in flight
        assert proc.poll() is None and time.time() < deadline, "no save seen in progress"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    in_flight = unfinished_saves(ckpt_dir)
    assert in_flight, "the kill did not interrupt a save"
    committed = sorted(int(p.name) for p in ckpt_dir.iterdir()
                       if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file())
    assert committed and max(committed) < max(in_flight) < 60
    # an unfinished save of a much later step must never be chosen either
    (ckpt_dir / "999.orbax-checkpoint-tmp-1").mkdir()
    assert main(["train", *args]) == 0
    log = (tmp / "killed" / "train.log").read_text()
    resumed = int(log.split("resumed from step ")[1].split()[0])
    assert resumed == max(committed)
    assert json.loads((tmp / "killed" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 60

    assert main(["train", *config("straight", **{"train.steps": 60})]) == 0
    # the steps the killed process ran past its last checkpoint are logged twice; each time with the
    # examples of the uninterrupted run
    straight = {b["step"]: b["example_ids"] for b in batches(tmp / "straight")}
    killed = batches(tmp / "killed")
    assert sorted({b["step"] for b in killed}) == sorted(straight) == list(range(1, 61))
    assert all(b["example_ids"] == straight[b["step"]] for b in killed)
    assert len(killed) > 60  # the kill came after its last checkpointed step
    assert_bitwise_equal(export_tensors(tmp / "killed", tmp / "e1"), export_tensors(tmp / "straight", tmp / "e2"))


def test_truncated_safetensors_names_the_file(tmp_path):
    import jaxft

    src = save_tiny_bert(tmp_path / "hf")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        jaxft.load_model(src, task="sequence-classification")


def test_tokenizer_larger_than_the_vocabulary_is_refused(setup, tmp_path, minilm_dir, capsys):
    _, config = setup
    small = save_tiny_bert(tmp_path / "small", vocab_size=99, num_labels=2, tokenizer_from=minilm_dir)
    assert main(["train", *config("run"), f"model.name_or_path={small}"]) == 2
    assert "has 30522 tokens but the model's vocab_size is 99" in capsys.readouterr().err
