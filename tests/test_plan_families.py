"""`jaxft plan` on every family, looped and scanned, from config.json alone (issue: a DeepSeek-V3 config with
looped layers used to crash in the router, where the correction-bias buffer was read as a shape)."""

from __future__ import annotations

import pytest

from jaxft.config import load_config
from jaxft.plan import plan

from causal_helpers import hf_config
from conftest import save_tiny_bert


def _deepseek(folder, variant):
    import transformers

    from test_deepseek_parity import BASE, VARIANTS

    mt, kw = VARIANTS[variant]
    transformers.AutoConfig.for_model(mt, **dict(BASE, **kw)).save_pretrained(folder)


CASES = ["bert", "gpt2", "llama-gqa-tied", "mistral-sliding", "qwen2-bias-sliding", "qwen3-qk-norm", "v2-lite", "v3"]


@pytest.mark.parametrize("case", CASES)
def test_plan_every_family_looped_and_scanned(tmp_path, case):
    if case == "bert":
        save_tiny_bert(tmp_path)
        task = "sequence-classification"
    elif case.startswith("v"):
        _deepseek(tmp_path, case)
        task = "causal-lm"
    else:
        hf_config(case).save_pretrained(tmp_path)
        task = "causal-lm"
    plans = [plan(load_config(base={"model": {"name_or_path": str(tmp_path), "task": task, "scan_layers": scan},
                                    "train": {"batch_size": 2}, "data": {"max_length": 16}}), compile=False)
             for scan in (False, True)]
    looped, scanned = plans
    assert looped.param_count == scanned.param_count > 0
    assert looped.per_device["params"] == scanned.per_device["params"] >= 4 * looped.param_count
    assert looped.per_device["opt_state"] >= 2 * looped.per_device["gradients"] > 0  # Adam: mu and nu
    assert looped.per_device["activations"] > 0 and scanned.per_device["activations"] > 0
