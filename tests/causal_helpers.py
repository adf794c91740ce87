"""Tiny random causal LMs for the parity tests, built with `transformers` and `save_pretrained`.

Imported explicitly by the causal-LM tests (no network: every model is random and saved to a temporary
folder). Every parameter, norm scales and biases included, is drawn at random so that a wrong mapping
of any tensor shows up in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import forward

VOCAB = 96

LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
             tie_word_embeddings=False)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1,
            eos_token_id=2)

# name -> (model_type, config overrides). Sizes stay tiny: hidden ≤ 64, 2 layers.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama-mha": ("llama", dict(LLAMA, num_key_value_heads=4)),
    "llama-gqa-tied": ("llama", dict(LLAMA, tie_word_embeddings=True)),
    "llama-mqa": ("llama", dict(LLAMA, num_key_value_heads=1)),
    "llama-bias": ("llama", dict(LLAMA, attention_bias=True, mlp_bias=True)),
    "llama-head-dim": ("llama", dict(LLAMA, head_dim=16)),
    "llama-theta": ("llama", dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama-linear": ("llama", dict(LLAMA, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 10000.0})),
    # max_position_embeddings below the 520-token prompt, so the NTK base actually changes
    "llama-dynamic": ("llama", dict(LLAMA, max_position_embeddings=256, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-llama3": ("llama", dict(LLAMA, head_dim=16, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
    "llama-yarn": ("llama", dict(LLAMA, head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0})),
    "llama-yarn-mscale": ("llama", dict(LLAMA, head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 24, "beta_slow": 2, "rope_theta": 10000.0})),
    "llama-longrope": ("llama", dict(LLAMA, head_dim=16, rope_parameters={
        "rope_type": "longrope", "original_max_position_embeddings": 256, "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.5 * i for i in range(8)]})),
    "mistral-sliding": ("mistral", dict(LLAMA, sliding_window=16)),
    "qwen2-bias-sliding": ("qwen2", dict(LLAMA, tie_word_embeddings=True, use_sliding_window=True,
                                         sliding_window=16, max_window_layers=1,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-qk-norm": ("qwen3", dict(LLAMA, head_dim=16, tie_word_embeddings=True)),
    "gpt2": ("gpt2", dict(GPT2)),
    "gpt2-untied-relu": ("gpt2", dict(GPT2, tie_word_embeddings=False, activation_function="relu",
                                      n_inner=40)),
}
ROPE_VARIANTS = [n for n, (_, kw) in VARIANTS.items() if "rope_parameters" in kw]


def hf_config(variant: str, **overrides):
    import transformers

    model_type, kw = VARIANTS[variant]
    kw = json.loads(json.dumps(dict(kw, **overrides)))  # deep copy: configs mutate rope dicts
    return transformers.AutoConfig.for_model(model_type, **kw)


def build_hf(variant: str, seed: int = 0, **overrides):
    """A random `*ForCausalLM` (eval mode, eager attention) with every parameter randomised."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(variant, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_hf(variant: str, folder: Path, seed: int = 0, spelling: str = "rope_parameters", **overrides) -> Path:
    """Save a random model; `spelling="rope_scaling"` rewrites config.json the way Hub checkpoints
    spell RoPE settings (`rope_theta` + `rope_scaling` with the old `type` key)."""
    build_hf(variant, seed, **overrides).save_pretrained(folder)
    if spelling == "rope_scaling":
        path = Path(folder) / "config.json"
        cfg = json.loads(path.read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type")
        cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
        path.write_text(json.dumps(cfg, indent=2))
    return Path(folder)


def load_hf(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None, positions=None) -> np.ndarray:
    import torch

    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if positions is not None:
        kw["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def padded_batch(length: int = 24, seed: int = 0):
    """Three rows: full, right-padded, left-padded."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (3, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, length - 9:] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def long_prompt(length: int = 520, seed: int = 1):
    return np.random.RandomState(seed).randint(3, VOCAB, (1, length)).astype(np.int32)


def max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[mask.astype(bool)].max() if mask is not None else d.max())


def token_ce(logits, ids, mask):
    """Mean next-token cross-entropy over positions whose input and target are real tokens."""
    import jax.numpy as jnp
    import optax

    w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    return jnp.sum(ce * w) / jnp.sum(w)


def check_export_round_trips(src: Path, out: Path, variant: str, tol: float) -> dict:
    """Untouched export: same names, shapes, dtypes, bits and the family's architecture. Perturbed export:
    `AutoModelForCausalLM` reloads it with no missing/unexpected keys and its logits match jaxft's within
    `tol`. Returns the source tensors for further checks."""
    import jax
    import transformers
    from safetensors.numpy import load_file

    import jaxft
    from jaxft.hf.load import flat_params
    from jaxft.models import get_family

    model = jaxft.load_model(src, task="causal-lm")
    jaxft.save_pretrained(model, out / "same")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "same" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    assert json.loads((out / "same" / "config.json").read_text())["architectures"] == [
        get_family(model.hf_config["model_type"], "causal-lm").architectures["causal-lm"]]

    key = jax.random.key(1)
    for i, var in enumerate(flat_params(model).values()):
        v = var.get_value()
        var.set_value(v + 0.01 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype))
    jaxft.save_pretrained(model, out / "tuned")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out / "tuned"), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = padded_batch(seed=3)
    d = max_diff(forward(model, ids, attention_mask=mask), hf_logits(reloaded.eval(), ids, mask), mask)
    print(f"{variant}: fine-tuned export vs jaxft {d:.2e}")
    assert d <= tol
    return a
