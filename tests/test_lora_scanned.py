"""LoRA parity with scanned layers (stacked adapters) on every causal family, and BERT looped and scanned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import jaxft
from jaxft.lora import LoraSpec, apply_lora, merge, save_adapter

from conftest import forward, random_batch, save_tiny_bert
from lora_helpers import CAUSAL, TOL, _peft_logits, check_causal_lora, randomise_adapters


@pytest.mark.parametrize("variant", CAUSAL)
def test_causal_lm_lora_scanned(tmp_path, variant):
    check_causal_lora(tmp_path, variant, scan=True)


def _random_bert(folder: Path) -> Path:
    import torch
    import transformers

    save_tiny_bert(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "LayerNorm.weight" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
def test_bert_lora_with_trained_head_matches_peft(tmp_path, scan):
    import torch
    import transformers

    src = _random_bert(tmp_path / "bert")
    ids, mask, types = random_batch(99)
    model = jaxft.load_model(src, task="sequence-classification", num_labels=3, scan_layers=scan)
    base = np.asarray(forward(model, ids, attention_mask=mask, token_type_ids=types))
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=4.0, rslora=True))
    assert adapters.train_modules == ["classifier"]
    assert adapters.train_paths == {"classifier.kernel", "classifier.bias"}
    assert "bert.pooler.dense" in [n for t in adapters.targets for n in t.hf_names]  # as peft's all-linear
    randomise_adapters(model)
    model.classifier.kernel.set_value(model.classifier.kernel.get_value() + 0.3)  # a trained head
    lora = np.asarray(forward(model, ids, attention_mask=mask, token_type_ids=types))
    assert np.abs(lora - base).max() > 1e-2

    save_adapter(model, adapters, tmp_path / "adapter", str(src))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"] and cfg["use_rslora"]
    plain, adapted = _peft_logits(src, tmp_path / "adapter", ids, mask, classify=True, types=types)
    assert np.abs(adapted - lora).max() <= TOL
    assert np.abs(adapted - plain).max() > 1e-2

    merge(model, adapters)
    jaxft.save_pretrained(model, tmp_path / "merged")
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        merged = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             token_type_ids=torch.tensor(types)).logits.numpy()
    assert np.abs(merged - lora).max() <= TOL
