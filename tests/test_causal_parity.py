"""Causal LMs vs `transformers` (PyTorch, float32): logits, export round trips, gradients, packing.

Every variant of `causal_helpers.VARIANTS` (Llama MHA/GQA/MQA, tied/untied, biases, head_dim ≠ D/N,
each RoPE scaling, Mistral sliding window, Qwen2 biases + per-layer sliding window, Qwen3 q/k norm,
GPT-2) is a random tiny model saved with `save_pretrained` and loaded through `jaxft.load_model`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxft
from jaxft.models import causal, get_family
from causal_helpers import (ROPE_VARIANTS, VARIANTS, build_hf, check_export_round_trips, hf_logits, load_hf,
                            long_prompt, max_diff, padded_batch, save_hf, token_ce)
from conftest import forward

TOL = 1e-4
CASES = [(v, "rope_parameters") for v in VARIANTS] + [(v, "rope_scaling") for v in ROPE_VARIANTS]


@pytest.mark.parametrize("variant,spelling", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_logits_match_transformers(tmp_path, variant, spelling):
    folder = save_hf(variant, tmp_path / "hf", spelling=spelling)
    ref, model = load_hf(folder), jaxft.load_model(folder, task="causal-lm")
    assert model.task == "causal-lm"

    ids, mask = padded_batch()
    d_pad = max_diff(forward(model, ids, attention_mask=mask), hf_logits(ref, ids, mask), mask)
    ids = long_prompt()
    d_long = max_diff(forward(model, ids), hf_logits(ref, ids))
    print(f"{variant} ({spelling}): padded {d_pad:.2e}, 520 tokens {d_long:.2e}")
    assert d_pad <= TOL and d_long <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trips(tmp_path, variant):
    """Untouched: same names, shapes, dtypes, bits. Perturbed: transformers reloads it with no missing or
    unexpected keys, and its logits match jaxft's."""
    check_export_round_trips(save_hf(variant, tmp_path / "hf"), tmp_path, variant, TOL)


@pytest.mark.parametrize("variant", ["llama-bias", "gpt2"])
def test_gradients_match_pytorch(tmp_path, variant):
    import torch

    folder = save_hf(variant, tmp_path / "hf")
    model = jaxft.load_model(folder, task="causal-lm")
    ids, mask = padded_batch(length=16)
    ids, mask = ids[:2], mask[:2]  # full + right-padded rows

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return token_ce(nnx.merge(graphdef, p, rest)(ids, attention_mask=mask), ids, mask)

    grads = jax.jit(jax.grad(loss))(params)
    table = get_family(model.hf_config["model_type"], "causal-lm").name_table(model.config, "causal-lm")
    ours = table.export({".".join(map(str, k)): np.asarray(v.get_value())
                         for k, v in nnx.to_flat_state(grads)})

    ref = load_hf(folder)
    logits = ref(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    w = torch.tensor(mask[:, 1:] * mask[:, :-1], dtype=torch.float32)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           torch.tensor(ids[:, 1:], dtype=torch.long).reshape(-1),
                                           reduction="none")
    ((ce * w.reshape(-1)).sum() / w.sum()).backward()
    theirs = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for name, g in theirs.items():
        rel = np.abs(ours[name] - g).max() / max(np.abs(g).max(), 1e-12)
        worst = max(worst, rel)
        assert rel <= TOL, (name, rel)
    print(f"{variant}: worst relative gradient difference {worst:.2e} over {len(theirs)} tensors")


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "mistral-sliding", "qwen2-bias-sliding", "gpt2"])
def test_packed_equals_unpacked(tmp_path, variant):
    """Two documents packed in one row (segment ids, positions restarting) give each document the loss
    it has alone; a sliding window smaller than the documents is exercised by the Mistral/Qwen2 cases."""
    model = jaxft.load_model(save_hf(variant, tmp_path / "hf"), task="causal-lm")
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, 96, n).astype(np.int32) for n in (21, 27)]
    pad = 4
    row = np.concatenate(docs + [np.zeros(pad, np.int32)])[None]
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(pad)])[None]
    mask = (seg > 0).astype(np.int32)
    logits = forward(model, row, attention_mask=mask, segment_ids=seg.astype(np.int32))
    start = 0
    for d in docs:
        alone = forward(model, d[None])
        ones = np.ones((1, len(d)), np.int32)
        packed_loss = token_ce(logits[:, start:start + len(d)], d[None], ones)
        alone_loss = token_ce(alone, d[None], ones)
        print(f"{variant}: packed {float(packed_loss):.6f} alone {float(alone_loss):.6f}")
        assert abs(float(packed_loss) - float(alone_loss)) <= 1e-5
        start += len(d)


def test_positions_from_segments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert causal.positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    """transformers writes no `lm_head.weight` for tied models; neither does jaxft."""
    src = save_hf("qwen3-qk-norm", tmp_path / "hf")
    assert "lm_head.weight" not in load_file(str(src / "model.safetensors"))
    jaxft.save_pretrained(jaxft.load_model(src), tmp_path / "out")
    assert "lm_head.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))


@pytest.mark.parametrize("variant,field,value,named", [
    ("llama-mha", "rope_parameters", {"rope_type": "proportional", "rope_theta": 1e4}, "rope_type"),
    ("llama-mha", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
    ("gpt2", "scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", "reorder_and_upcast_attn", True, "reorder_and_upcast_attn"),
    ("gpt2", "activation_function", "quick_gelu", "activation_function"),
    ("qwen3-qk-norm", "hidden_act", "relu2", "hidden_act"),
])
def test_unsupported_config_raises_naming_the_field(tmp_path, variant, field, value, named):
    folder = tmp_path / "hf"
    build_hf(variant).save_pretrained(folder)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=named):
        jaxft.load_model(folder, task="causal-lm")


@pytest.mark.parametrize("variant,overrides", [("llama-gqa-tied", {"attention_dropout": 0.2}), ("gpt2", {})])
def test_dropout_is_seeded_and_off_in_eval(tmp_path, variant, overrides):
    """Llama's `attention_dropout`, GPT-2's embd/attn/resid dropouts: active only with a dropout key,
    the same masks for the same key."""
    folder = tmp_path / "hf"
    build_hf(variant, **overrides).save_pretrained(folder)
    model = jaxft.load_model(folder, task="causal-lm")
    ids, mask = padded_batch()
    clean = forward(model, ids, attention_mask=mask)
    a = forward(model, ids, attention_mask=mask, dropout_rng=jax.random.key(0))
    b = forward(model, ids, attention_mask=mask, dropout_rng=jax.random.key(0))
    c = forward(model, ids, attention_mask=mask, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert max_diff(a, clean, mask) > 1e-3 and max_diff(a, c, mask) > 1e-3
    assert max_diff(clean, hf_logits(load_hf(folder), ids, mask), mask) <= TOL
