"""`jaxft plan` knows each objective's memory: the distillation teacher and the dpo/ipo reference of full
fine-tuning are counted (exactly, and in the compiled step's arguments); LoRA's reference (adapters off),
simpo and orpo add nothing; the activations are traced with the objective's own loss and batch."""

from __future__ import annotations

import math

import pytest

from conftest import save_tiny_bert
from jaxft.config import load_config
from jaxft.plan import batch_shapes, plan
from test_plan import LLAMA3_8B, write_run

TINY_LLAMA = dict(LLAMA3_8B, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("plan_pref"), TINY_LLAMA, data={"max_length": 32},
                     train={"batch_size": 4})


def test_preference_objectives_count_the_reference_only_when_they_hold_one(llama_run):
    plans = {name: plan(load_config(llama_run, overrides)) for name, overrides in {
        "dpo": ["train.objective=dpo"], "ipo": ["train.objective=ipo"], "simpo": ["train.objective=simpo"],
        "dpo-lora": ["train.objective=dpo", "model.lora.rank=4"],
        "dpo-precomputed": ["train.objective=dpo", "train.dpo.precompute_reference=true"]}.items()}
    dpo, simpo = plans["dpo"].per_device, plans["simpo"].per_device
    # a frozen copy of the policy: exactly its parameters' bytes, and in the compiled step's arguments
    assert dpo["second_model"] == dpo["params"] == plans["ipo"].per_device["second_model"]
    assert dpo["xla_arguments"] - simpo["xla_arguments"] == dpo["params"]   # same pair batch, no reference
    assert "second_model" not in simpo and "second_model" not in plans["dpo-lora"].per_device
    assert "reference" in plans["dpo"].report() and "train.objective=dpo" in plans["dpo"].report()
    # precomputed reference log-probs: no reference copy; the step reads two floats per pair more than simpo's
    pre = plans["dpo-precomputed"].per_device
    assert "second_model" not in pre and pre["xla_arguments"] - simpo["xla_arguments"] == 2 * 4 * 4
    # the activations are traced on pairs: both sides of each pair go through the policy (and the reference
    # under stop_gradient keeps nothing), so at least the supervised run's residuals
    supervised = plan(load_config(llama_run)).per_device
    assert dpo["activations"] > supervised["activations"]


def test_distillation_counts_the_teacher(tmp_path, minilm_dir):
    common = dict(tokenizer_from=minilm_dir, random_init=True, vocab_size=30522, num_labels=2)
    student = save_tiny_bert(tmp_path / "student", **common)
    teacher = save_tiny_bert(tmp_path / "teacher", seed=1, hidden_size=48, num_hidden_layers=3,
                             intermediate_size=40, **common)
    base = [f"model.name_or_path={student}", "data.max_length=32", "train.batch_size=4"]
    supervised = plan(load_config(None, base)).per_device
    distill = plan(load_config(None, base + ["train.objective=distill", f"train.distill.teacher={teacher}"]))
    import transformers

    teacher_params = sum(p.numel() for p in transformers.BertForSequenceClassification.from_pretrained(
        teacher).parameters())
    d = distill.per_device
    assert d["second_model"] == 4 * teacher_params                        # float32, one device
    assert d["xla_arguments"] - supervised["xla_arguments"] == d["second_model"]
    assert d["peak"] > supervised["peak"] and "teacher" in distill.report()


def test_batch_shapes_follow_the_objective():
    """Distillation batches are the task's own; only preference objectives read pairs."""
    assert set(batch_shapes("causal-lm", 2, 8, objective="distill")) == set(batch_shapes("causal-lm", 2, 8))
    pairs = batch_shapes("causal-lm", 2, 8, objective="orpo")
    assert {"chosen_input_ids", "rejected_loss_mask"} <= set(pairs) and math.prod(pairs["weights"].shape) == 2


def test_grpo_counts_the_rollout_cache_and_its_reference(llama_run):
    """GRPO rows are the prompt bucket plus the completion; the rollout's KV cache is every layer's keys and
    values for them (float32 here); a reference copy is held only with β > 0 and full fine-tuning; μ > 1 reads
    the stored old log-probs."""
    grpo = ["train.objective=grpo", "train.grpo.num_generations=2", "train.grpo.max_completion_length=12",
            "train.grpo.max_prompt_length=20", "train.grpo.rewards=[{kind: length}]"]   # bucket 32 at multiples of 16
    plans = {name: plan(load_config(llama_run, grpo + extra)) for name, extra in {
        "plain": [], "kl": ["train.grpo.beta=0.04"], "kl-lora": ["train.grpo.beta=0.04", "model.lora.rank=4"],
        "mu2": ["train.grpo.num_iterations=2"]}.items()}
    plain = plans["plain"]
    assert plain.batch["length"] == 32 + 12
    layers, kv_heads, head_dim = 2, 2, 32 // 4
    assert plain.per_device["rollout_kv_cache"] == 4 * 44 * layers * 2 * kv_heads * head_dim * 4
    assert "rollout KV cache" in plain.report()
    assert "second_model" not in plain.per_device and "second_model" not in plans["kl-lora"].per_device
    assert plans["kl"].per_device["second_model"] == plain.per_device["params"]
    assert plans["mu2"].per_device["xla_arguments"] - plain.per_device["xla_arguments"] == 4 * 44 * 4
