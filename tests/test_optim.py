"""The optimiser recipe against PyTorch: schedules value by value, and whole training trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jaxft
from conftest import random_batch, save_tiny_bert
from jaxft.config import OptimSection
from jaxft.optim import decay_mask, make_optimizer, schedule
from jaxft.train.losses import classification_loss
from jaxft.train.step import Functional, init_state, make_train_step

HF_SCHEDULES = {"linear": transformers.get_linear_schedule_with_warmup,
                "cosine": transformers.get_cosine_schedule_with_warmup,
                "constant": lambda opt, warm, total: transformers.get_constant_schedule_with_warmup(opt, warm)}


@pytest.mark.parametrize("name", HF_SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedules_match_transformers(name, warmup):
    total = 50
    ours = schedule(OptimSection(lr=1e-3, schedule=name, warmup_steps=warmup), total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = HF_SCHEDULES[name](opt, warmup, total)
    for step in range(total):
        np.testing.assert_allclose(float(ours(step)), opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-10)
        opt.step()
        ref.step()


def test_warmup_ratio_rounds_like_steps():
    assert float(schedule(OptimSection(lr=1.0, warmup_ratio=0.1), 100)(5)) == pytest.approx(0.5)


def test_decay_mask_spares_biases_and_norms():
    mask = decay_mask({"a.query.kernel": 0, "a.query.bias": 0, "a.norm.scale": 0, "word.embedding": 0})
    assert mask == {"a.query.kernel": True, "a.query.bias": False, "a.norm.scale": False,
                    "word.embedding": True}


def test_training_trajectory_matches_pytorch(tmp_path):
    """12 steps of clip + AdamW(decoupled, masked decay) + warmup-cosine: loss within 1e-3 relative."""
    folder = save_tiny_bert(tmp_path / "hf", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            num_labels=3)
    steps, lr = 12, 3e-3
    cfg = OptimSection(lr=lr, weight_decay=0.1, clip_norm=0.5, schedule="cosine", warmup_steps=3)
    batches = []
    for s in range(steps):  # three batches, seen four times each: the model can fit them
        ids, mask, types = random_batch(99, batch=4, seed=s % 3)
        labels = np.random.RandomState(100 + s % 3).randint(0, 3, 4).astype(np.int32)
        batches.append(dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                            weights=np.ones(4, np.float32)))

    model = jaxft.load_model(folder, task="sequence-classification")
    fn = Functional(model)
    tx, sched = make_optimizer(cfg, steps)
    state = init_state(fn, tx, seed=0)
    step = make_train_step(fn, classification_loss, tx, sched)
    ours = []
    for b in batches:
        state, m = step(state, b)
        ours.append(float(m["loss"]))

    tm = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    tm.train()  # dropout rates are 0, so train mode is deterministic
    no_decay = [p for n, p in tm.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in tm.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sch = transformers.get_cosine_schedule_with_warmup(opt, 3, steps)
    ref = []
    for b in batches:
        out = tm(input_ids=torch.tensor(b["input_ids"]).long(), attention_mask=torch.tensor(b["attention_mask"]).long(),
                 token_type_ids=torch.tensor(b["token_type_ids"]).long(), labels=torch.tensor(b["labels"]).long())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 0.5)
        opt.step()
        sch.step()
        opt.zero_grad()
        ref.append(out.loss.item())
    assert ref[-1] < ref[0] - 0.05, ref  # the recipe really trains
    np.testing.assert_allclose(ours, ref, rtol=1e-3)


def test_grad_accumulation_equals_the_large_batch(tmp_path):
    folder = save_tiny_bert(tmp_path / "hf", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask, types = random_batch(99, batch=4, seed=3)
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                 labels=np.array([0, 1, 2, 1], np.int32), weights=np.array([1, 1, 1, 0], np.float32))
    results = []
    for accum in (1, 2):
        fn = Functional(jaxft.load_model(folder, task="sequence-classification"))
        tx, sched = make_optimizer(OptimSection(lr=1e-3), 4)
        state, m = make_train_step(fn, classification_loss, tx, sched, accum)(init_state(fn, tx, 0), batch)
        results.append((float(m["loss"]), state["params"]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for k in results[0][1]:
        np.testing.assert_allclose(results[0][1][k], results[1][1][k], atol=1e-6, err_msg=k)
