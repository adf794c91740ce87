"""DPO training end to end: a tiny random Llama with LoRA learns a preference it did not have (held-out
rewards/accuracies, and greedy generations right for 7 of 8 prompts), without a second copy of the base; the
objective composes with gradient accumulation and with exact resume (full fine-tuning, reference model held
beside the state); precomputed reference log-probs read back on resume are, per pair and side, a fresh pass's."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxft
from jaxft.cli import main
from jaxft.config import OptimSection, PreferenceSection, load_config
from jaxft.data.preference import PairBatches, build_pairs
from jaxft.optim import make_optimizer
from jaxft.train.loop import Trainer
from jaxft.objectives.preference import _both_sides, make_preference_loss, reference_copy, sequence_logps
from jaxft.train.run import claim_run_dir, restore_run
from jaxft.train.step import Functional, init_state, make_train_step

from causal_helpers import build_hf
from sft_helpers import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RULE = {i: (7 * i + 3) % 20 for i in range(8)}  # "map w{i}" is answered "d{RULE[i]}"


def save_base(folder: Path) -> Path:
    """A tiny random Llama (every weight random) with the word-level chat tokenizer."""
    tok = make_tokenizer()
    build_hf("llama-gqa-tied", seed=0, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def preference_rows(tmp: Path) -> tuple[Path, Path]:
    """Chosen answers follow RULE, rejected ones are other digits: 12 pairs per prompt to train on, and 4 held-out
    pairs per prompt whose rejected answers training never showed for that prompt."""
    rng = random.Random(0)
    train, held = [], []
    for i, d in RULE.items():
        wrong = [j for j in range(20) if j != d]
        rng.shuffle(wrong)
        for k, j in enumerate(wrong[:16]):
            row = {"prompt": [{"role": "user", "content": f"map w{i}"}], "chosen": f"d{d}", "rejected": f"d{j}"}
            (train if k < 12 else held).append(row)
    rng.shuffle(train)
    for name, rows in (("train", train), ("heldout", held)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "train.jsonl", tmp / "heldout.jsonl"


def greedy_answers(model, tok) -> list[list[str]]:
    out = []
    for i in RULE:
        prompt = tok.apply_chat_template([{"role": "user", "content": f"map w{i}"}], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]
        ids = np.asarray(jaxft.generate(model, np.array([list(prompt)], np.int32), max_new_tokens=2))[0]
        out.append(tok.convert_ids_to_tokens(ids[:2].tolist()))
    return out


def base_prefers_chosen(model, tok, heldout: Path) -> float:
    """How often the base model itself gives the chosen answer the higher log-probability (chance: ~0.5)."""
    rows = [json.loads(x) for x in heldout.read_text().splitlines()]
    table = {k: [r[k] for r in rows] for k in rows[0]}
    cfg = load_config(None, ["model.name_or_path=x", "model.task=causal-lm", "train.objective=dpo"])
    pairs, _ = build_pairs(table, tok, cfg.data, "validation")
    batch = PairBatches(pairs, len(pairs), pad_id=tok.pad_token_id, max_length=32).collate(np.arange(len(pairs)))
    logps, _ = sequence_logps(model, *_both_sides({k: jnp.asarray(v) for k, v in batch.items() if k != "example_ids"}))
    return float(np.mean(np.asarray(logps[0::2]) > np.asarray(logps[1::2])))


@pytest.mark.slow
def test_dpo_lora_learns_the_preferred_rule_without_a_second_base(tmp_path):
    base = save_base(tmp_path / "base")
    train, heldout = preference_rows(tmp_path)
    tok = make_tokenizer()
    before = base_prefers_chosen(jaxft.load_model(base, task="causal-lm"), tok, heldout)
    assert sum(a == [f"d{RULE[i]}", "</s>"] for i, a in zip(RULE, greedy_answers(
        jaxft.load_model(base, task="causal-lm"), tok))) <= 1

    cfg = load_config(ROOT / "configs" / "dpo_chat_lora.yaml", [
        f"model.name_or_path={base}", "model.dtype=float32", "model.lora.rank=8", "model.lora.alpha=16",
        f"data.train={train}", f"data.validation={heldout}", "data.max_length=16", "optim.lr=1e-2",
        "optim.warmup_ratio=0.03", "train.batch_size=16", "train.steps=200", "train.eval_every=200",
        "train.log_every=50", f"output_dir={tmp_path / 'run'}"])
    with claim_run_dir(cfg):
        trainer = Trainer(cfg)
        # No second copy of the base: no reference model beside the state; the frozen arrays are one base;
        # the train state is the adapters, their two Adam moments and a few scalars.
        assert trainer.frozen_model is None
        n_base = sum(x.size for x in jax.tree.leaves(nnx.state(jaxft.load_model(base, task="causal-lm"), nnx.Param)))
        assert sum(v.size for v in trainer.fn.frozen.values()) == n_base
        assert all(".lora." in k for k in trainer.fn.params)
        n_adapters = sum(v.size for v in trainer.fn.params.values())
        assert 0 <= sum(x.size for x in jax.tree.leaves(trainer.state)) - 3 * n_adapters < 16
        summary = trainer.run()

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(train_rows[0])
    after = summary["eval"]["rewards/accuracies"]
    assert 0.25 <= before <= 0.75 and after >= 0.9, (before, after)
    assert summary["eval"]["rewards/margins"] > 0 and summary["eval"]["pairs"] == len(RULE) * 4
    # Greedy answers: DPO's reward is relative to the base, and the adapters are shared by every prompt, so an
    # answer chosen for one prompt can rise on another: 7 of 8 right is the bar (before: at most 1). The same
    # code and packages gave 8 on one machine and 7 on another (w3 → "d18", w5's answer: log p −1.84 against
    # −2.23 for "d4").
    answers = greedy_answers(restore_run(tmp_path / "run").model, tok)
    assert sum(a == [f"d{RULE[i]}", "</s>"] for i, a in zip(RULE, answers)) >= 7, answers


def _pair_batch(tok, n: int = 6):
    """`n` pairs (varied lengths) in a batch of 8 rows: two padding rows of weight 0."""
    rows = {"prompt": [[{"role": "user", "content": f"map w{i}" + " please" * (i % 3)}] for i in range(n)],
            "chosen": [" ".join(f"d{(i + k) % 20}" for k in range(1 + i % 3)) for i in range(n)],
            "rejected": [f"w{i + 5}" for i in range(n)]}
    cfg = load_config(None, ["model.name_or_path=x", "model.task=causal-lm", "train.objective=dpo"])
    pairs, _ = build_pairs(rows, tok, cfg.data, "train")
    batch = PairBatches(pairs, 8, pad_id=tok.pad_token_id, max_length=32).collate(np.arange(n))
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "example_ids"}


@pytest.mark.slow  # ~75-90 s each on the shared 2-core machine under load
@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_preference_objectives_compose_with_grad_accumulation(tmp_path, kind):
    """Two steps with grad_accum=4 (micro-batches of unequal weight: padding rows) equal grad_accum=1 on the same
    batch: loss, grad_norm, every reward/log-prob metric and the parameters. DPO runs full fine-tuning, with
    the reference as a frozen copy passed beside the state; it stays the starting point, bit for bit.
    (At step 1 DPO's policy is its reference: every reward is 0 up to rounding, so `rewards/accuracies`,
    a count of rc > rr, is compared from step 2 on.)"""
    tok = make_tokenizer()
    base = save_base(tmp_path / "base")
    batch = _pair_batch(tok)
    loss = make_preference_loss(kind, PreferenceSection(beta=0.5))
    out = {}
    for accum in (1, 4):
        fn = Functional(jaxft.load_model(base, task="causal-lm"))
        start = {k: np.asarray(v) for k, v in fn.params.items()}
        ref = reference_copy(fn) if kind == "dpo" else None
        tx, lr = make_optimizer(OptimSection(lr=1e-2, warmup_steps=0, schedule="constant"), 2)
        state, step = init_state(fn, tx, 0), make_train_step(fn, loss, tx, lr, accum, ref)
        metrics = []
        for _ in range(2):
            state, m = step(state, batch)
            metrics.append({k: float(v) for k, v in m.items() if k not in ("lr",)})
        out[accum] = metrics, {k: np.asarray(v) for k, v in state["params"].items()}
        if ref is not None:  # the reference is untouched (never donated, never updated)
            assert all(np.array_equal(np.asarray(ref.frozen[k]), start[k]) for k in start)
            assert not all(np.array_equal(out[accum][1][k], start[k]) for k in start)
    (m1, p1), (m4, p4) = out[1], out[4]
    assert m1[0]["weight"] == 6 and m1[1]["rewards/accuracies"] > 0
    for i, (a, b) in enumerate(zip(m1, m4)):
        for k in a:
            if k == "rewards/accuracies" and kind == "dpo" and i == 0:
                continue
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    for k in p1:  # Adam scales each entry by its own gradient's size: rounding in near-zero entries shows more
        np.testing.assert_allclose(p1[k], p4[k], atol=1e-4, err_msg=k)
    if kind == "dpo":  # at step 1 the policy is the reference: zero rewards, loss log 2
        assert abs(m1[0]["rewards/margins"]) < 1e-6 and abs(m1[0]["loss"] - np.log(2)) < 1e-6
        assert m1[1]["rewards/margins"] > 0


@pytest.mark.slow
def test_dpo_full_fine_tuning_resume_is_exact(tmp_path, capsys):
    """Full fine-tuning DPO stopped at step 3 and resumed to 6 ends bitwise equal to a run straight to 6: the
    resumed run's reference is the base it started from, not the checkpoint it resumed. `jaxft eval` of the
    run takes the base as reference too (with the trained model as its own reference every reward would be 0)."""
    base = save_base(tmp_path / "base")
    train, heldout = preference_rows(tmp_path)
    common = [str(ROOT / "configs" / "dpo_chat_lora.yaml"), f"model.name_or_path={base}", "model.dtype=float32",
              "model.lora.rank=null", f"data.train={train}", "data.validation=null", "data.max_length=16",
              "optim.lr=1e-2", "train.batch_size=8", "train.steps=6", "train.log_every=1"]
    assert main(["train", *common, f"output_dir={tmp_path / 'straight'}"]) == 0
    assert main(["train", *common, f"output_dir={tmp_path / 'resumed'}", "train.stop_at_step=3"]) == 0
    assert main(["train", *common, f"output_dir={tmp_path / 'resumed'}"]) == 0
    tensors = {}
    for run in ("straight", "resumed"):
        assert main(["export", str(tmp_path / run), str(tmp_path / f"{run}-export")]) == 0
        tensors[run] = load_file(str(tmp_path / f"{run}-export" / "model.safetensors"))
    assert sorted(tensors["straight"]) == sorted(tensors["resumed"])
    for k, v in tensors["straight"].items():
        assert np.array_equal(v, tensors["resumed"][k]), k
    logged = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    key = lambda rows: [(r["step"], r["rewards/margins"]) for r in rows if r["split"] == "train"]
    assert key(logged) == key(straight) and key(straight)[0][1] == 0.0 and key(straight)[-1][1] > 0
    capsys.readouterr()
    assert main(["eval", *common, f"data.validation={heldout}", f"checkpoint={tmp_path / 'straight'}"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["validation"]
    assert evaluated["pairs"] == len(RULE) * 4 and evaluated["rewards/margins"] > 0
    assert evaluated["rewards/chosen"] != 0 and evaluated["rewards/rejected"] != 0


@pytest.mark.slow
def test_precomputed_reference_equals_the_reference_in_the_step(tmp_path, capsys):
    """`train.dpo.precompute_reference`: full-FT DPO reads the reference log-probs computed in a first pass
    (no reference copy beside the state) and logs the same losses and rewards as the run whose step computes
    them with its reference copy (within 1e-5); they are saved in the run and read, not recomputed, on resume;
    `jaxft eval` with the setting computes them for its own split from the base."""
    base = save_base(tmp_path / "base")
    train, heldout = preference_rows(tmp_path)
    common = [f"model.name_or_path={base}", "model.dtype=float32", "model.lora.rank=null", f"data.train={train}",
              f"data.validation={heldout}", "data.max_length=16", "optim.lr=1e-2", "train.batch_size=8",
              "train.steps=6", "train.log_every=1", "train.eval_every=4"]
    config = ROOT / "configs" / "dpo_chat_lora.yaml"
    rows = {}
    for name, extra in (("online", []), ("pre", ["train.dpo.precompute_reference=true"])):
        cfg = load_config(config, [*common, *extra, "train.stop_at_step=4", f"output_dir={tmp_path / name}"])
        with claim_run_dir(cfg):
            trainer = Trainer(cfg)
            assert (trainer.frozen_model is None) == (name == "pre")
            trainer.run()
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    assert [r["split"] for r in rows["pre"]] == [r["split"] for r in rows["online"]]
    assert rows["online"][-1]["split"] == "eval" and rows["online"][-1]["rewards/margins"] > 0
    for a, b in zip(rows["online"], rows["pre"]):
        np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=1e-5, atol=1e-6)
    saved = np.load(tmp_path / "pre" / "reference_logps.npz")
    assert sorted(saved) == sorted(f"{s}/{k}" for s in ("train", "validation") for k in ("fingerprint", "chosen", "rejected"))
    assert saved["validation/chosen"].shape == (len(RULE) * 4,) and np.all(saved["train/chosen"] < 0)

    # resumed to step 6: the saved log-probs are read, not computed again
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger("jaxft").addHandler(handler)
    cfg = load_config(config, [*common, "train.dpo.precompute_reference=true", f"output_dir={tmp_path / 'pre'}"])
    try:
        with claim_run_dir(cfg):
            Trainer(cfg).run()
    finally:
        logging.getLogger("jaxft").removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any("train pairs read from" in m for m in messages) and not any("batch 1/" in m for m in messages)

    capsys.readouterr()
    out = {}
    for name, extra in (("online", []), ("pre", ["train.dpo.precompute_reference=true"])):
        assert main(["eval", str(config), *common, *extra, f"checkpoint={tmp_path / 'online'}"]) == 0
        out[name] = json.loads(capsys.readouterr().out)["validation"]
    for k in keys:
        np.testing.assert_allclose(out["pre"][k], out["online"][k], rtol=1e-5, atol=1e-6)


def test_precomputed_reference_read_back_equals_a_fresh_reference_pass(tmp_path):
    """`train.dpo.precompute_reference`: the reference log-probs a resumed run reads from RUN/reference_logps.npz
    and attaches to its pairs are, pair by pair and side by side, those `reference_pass` computes afresh from
    the base model (and those the first run computed and attached), for the train and the validation split.
    A file read back with the sides swapped, or the pairs in another order, fails by far more than the bar."""
    from jaxft.objectives.preference import REFERENCE_COLUMNS, reference_pass

    base = save_base(tmp_path / "base")
    train, heldout = preference_rows(tmp_path)
    config = ROOT / "configs" / "dpo_chat_lora.yaml"
    common = [f"model.name_or_path={base}", "model.dtype=float32", "model.lora.rank=null", f"data.train={train}",
              f"data.validation={heldout}", "data.max_length=16", "train.batch_size=8", "train.steps=4",
              "train.log_every=1", "train.eval_every=100", "train.dpo.precompute_reference=true",
              f"output_dir={tmp_path / 'run'}"]
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger("jaxft").addHandler(handler)
    attached = {}
    try:
        # the first computes and saves them, stops at step 2; the resumed reads them; then, with the file cut in
        # half (a crash while another tool copied it, say), they are computed again with a warning, no traceback
        for run in ("first", "resumed", "cut"):
            if run == "cut":
                path = tmp_path / "run" / "reference_logps.npz"
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            cfg = load_config(config, [*common, *(["train.stop_at_step=2"] if run == "first" else [])])
            with claim_run_dir(cfg):
                trainer = Trainer(cfg)
                attached[run] = {s: {k: np.array(b.per_example[k]) for k in REFERENCE_COLUMNS}
                                 for s, b in trainer.task.splits.items()}
                if run == "first":
                    trainer.run()
    finally:
        logging.getLogger("jaxft").removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert sum("train pairs read from" in m for m in messages) == 1
    assert sum("validation pairs read from" in m for m in messages) == 1
    assert "resumed from step 2" in " ".join(messages)
    assert sum("reference_logps.npz is unreadable" in m for m in messages) == 1

    fresh_fn = Functional(jaxft.load_model(base, task="causal-lm"))
    assert set(attached["resumed"]) == {"train", "validation"}
    for split, batches in trainer.task.splits.items():
        chosen, rejected = reference_pass(fresh_fn, batches, split)
        assert len(chosen) == len(batches.enc) > 0
        assert np.mean(np.abs(chosen - rejected)) > 0.1   # the two sides differ: a swap would show
        for run in ("first", "resumed", "cut"):
            got = attached[run][split]
            np.testing.assert_allclose(got["ref_chosen_logps"], chosen, rtol=1e-6, atol=1e-5, err_msg=f"{split} {run}")
            np.testing.assert_allclose(got["ref_rejected_logps"], rejected, rtol=1e-6, atol=1e-5,
                                       err_msg=f"{split} {run}")
