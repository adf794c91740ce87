"""Shared by the LoRA tests (test_lora*.py, test_qlora.py): tiny random models, randomised adapters, peft.

Every model is a tiny random `transformers` model with every weight randomised; the adapters are
randomised too (a fresh adapter has B = 0 and changes nothing, which would hide a wrong layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxft
from jaxft.config import OptimSection
from jaxft.lora import LoraSpec, apply_lora, merge, save_adapter
from jaxft.models.lora import LoRAParam
from jaxft.optim import make_optimizer
from jaxft.train.step import Functional, init_state, make_train_step

from causal_helpers import hf_logits, load_hf, max_diff, padded_batch, save_hf
from conftest import forward


TOL = 1e-4

CAUSAL = ["llama-bias", "mistral-sliding", "qwen2-bias-sliding", "qwen3-qk-norm", "gpt2", "deepseek-v2-lite",
          "deepseek-v3"]


def _save(variant: str, folder: Path) -> Path:
    if variant.startswith("deepseek"):
        from test_deepseek_parity import save_hf as save_deepseek

        return save_deepseek({"deepseek-v2-lite": "v2-lite", "deepseek-v3": "v3"}[variant], folder)
    return save_hf(variant, folder)


def _fit(fn: Functional, optim: OptimSection, steps: int) -> tuple[dict, list[float]]:
    """`steps` train steps of a causal LM on one fixed padded batch: `(final state, losses)`."""
    from jaxft.train.losses import causal_lm_loss

    tx, lr = make_optimizer(optim, steps)
    state, step = init_state(fn, tx, 0), make_train_step(fn, causal_lm_loss, tx, lr)
    ids, mask = padded_batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask),
             "weights": jnp.ones((3,), jnp.float32)}
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def randomise_adapters(model: nnx.Module, seed: int = 1, std: float = 0.1) -> None:
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        value = var.get_value()
        var.set_value(std * jax.random.normal(jax.random.key(seed * 1000 + i), value.shape, value.dtype))


def _peft_logits(base_dir: Path, adapter_dir: Path, ids, mask, classify: bool = False, types=None):
    import peft
    import torch
    import transformers

    if classify:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(str(base_dir)).eval()
    else:
        base = load_hf(base_dir)
    with torch.no_grad():
        kw = {"attention_mask": torch.tensor(mask)}
        if types is not None:
            kw["token_type_ids"] = torch.tensor(types)
        plain = base(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        adapted = model(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()
    return plain, adapted


def check_causal_lora(tmp_path, variant: str, scan: bool) -> None:
    """LoRA on a causal LM: fresh adapters exact; randomised ones match peft (adapter export) and
    transformers (merged export) within 1e-4, and peft's logits differ from the base's.

    DeepSeek: attention and the routed experts (one adapter per expert, which peft loads onto transformers'
    fused experts); peft cannot hold adapters on its dense MLP / shared experts (see
    test_deepseek_all_linear), and its fused-expert layer refuses dropout, so the trained dropout is
    recorded as 0.0."""
    src = _save(variant, tmp_path / "base")
    ids, mask = padded_batch()
    model = jaxft.load_model(src, task="causal-lm", scan_layers=scan)
    base = np.asarray(forward(model, ids, attention_mask=mask))
    deepseek = variant.startswith("deepseek")
    targets = r"self_attn\..*|experts\..*" if deepseek else "all-linear"
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0, targets=targets, dropout=0.1 if deepseek else 0.0))
    if deepseek:
        assert any(".mlp.experts.7.down_proj" in n for t in adapters.targets for n in t.hf_names)
    assert np.array_equal(np.asarray(forward(model, ids, attention_mask=mask)), base), "a fresh adapter changed the logits"
    randomise_adapters(model)
    lora = np.asarray(forward(model, ids, attention_mask=mask))
    assert max_diff(lora, base, mask) > 1e-2, "randomised adapters should change the logits"

    save_adapter(model, adapters, tmp_path / "adapter", str(src))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["fan_in_fan_out"] == variant.startswith("gpt2")
    assert cfg["lora_dropout"] == 0.0
    plain, adapted = _peft_logits(src, tmp_path / "adapter", ids, mask)
    assert max_diff(adapted, lora, mask) <= TOL
    assert max_diff(adapted, plain, mask) > 1e-2, "peft ignored the adapter"

    merge(model, adapters)
    assert np.abs(np.asarray(forward(model, ids, attention_mask=mask)) - lora)[mask.astype(bool)].max() <= 1e-5
    jaxft.save_pretrained(model, tmp_path / "merged")
    assert max_diff(hf_logits(load_hf(tmp_path / "merged"), ids, mask), lora, mask) <= TOL
