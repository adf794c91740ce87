"""LoRA parity, looped layers: merged export vs transformers, adapter export vs peft, on every causal family;
which modules `all-linear` and a regex target (see lora_helpers.py)."""

from __future__ import annotations


import numpy as np
import pytest

import jaxft
from jaxft.lora import LoraSpec, apply_lora, merge, save_adapter

from causal_helpers import hf_logits, load_hf, max_diff, padded_batch, save_hf
from lora_helpers import CAUSAL, TOL, _save, check_causal_lora, randomise_adapters


@pytest.mark.parametrize("variant", CAUSAL)
def test_causal_lm_lora_looped(tmp_path, variant):
    check_causal_lora(tmp_path, variant, scan=False)


def test_deepseek_all_linear_merges_and_refuses_a_misrouted_peft_adapter(tmp_path):
    """`all-linear` on DeepSeek also adapts the dense MLP and the shared experts: the merged export matches
    transformers; a peft adapter of them is refused, since peft's MoE loader would put them on the routed
    experts instead."""
    src = _save("deepseek-v3", tmp_path / "base")
    ids, mask = padded_batch()
    model = jaxft.load_model(src, task="causal-lm", scan_layers=True)
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0))
    names = [n for t in adapters.targets for n in t.hf_names]
    assert "model.layers.0.mlp.gate_proj" in names and "model.layers.1.mlp.shared_experts.down_proj" in names
    assert not any("experts.0" in n or n.endswith("mlp.gate") for n in names)
    randomise_adapters(model)
    lora = np.asarray(model(ids, attention_mask=mask))
    with pytest.raises(ValueError, match="re-targets"):
        save_adapter(model, adapters, tmp_path / "adapter", str(src))
    merge(model, adapters)
    jaxft.save_pretrained(model, tmp_path / "merged")
    assert max_diff(hf_logits(load_hf(tmp_path / "merged"), ids, mask), lora, mask) <= TOL


def test_all_linear_targets_match_peft(tmp_path):
    """`all-linear` adapts the modules peft's `all-linear` does on Llama and GPT-2 (every block linear
    layer, not the head), and a regex picks exactly the modules it names."""
    import peft
    import torch

    for variant in ("llama-bias", "gpt2"):
        src = save_hf(variant, tmp_path / variant)
        model = jaxft.load_model(src, task="causal-lm")
        ours = sorted(n for t in apply_lora(model, LoraSpec()).targets for n in t.hf_names)
        with torch.no_grad():
            pm = peft.get_peft_model(load_hf(src), peft.LoraConfig(r=2, target_modules="all-linear"))
        theirs = sorted({n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
                         for n, _ in pm.named_parameters() if ".lora_A." in n})
        assert ours == theirs
    model = jaxft.load_model(tmp_path / "llama-bias", task="causal-lm")
    names = sorted(n for t in apply_lora(model, LoraSpec(targets="q_proj|v_proj")).targets for n in t.hf_names)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="model.lora.targets='nothing_here'"):
        apply_lora(jaxft.load_model(tmp_path / "llama-bias", task="causal-lm"), LoraSpec(targets="nothing_here"))
