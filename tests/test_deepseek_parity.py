"""DeepSeek-V2/V3 vs `transformers` (PyTorch, float32): logits, export round trips, gradients, generation
with the latent KV cache, router statistics in a training step, and the config fields jaxft refuses.

Every variant is a tiny random `DeepseekV{2,3}ForCausalLM` saved with `save_pretrained` and loaded through
`jaxft.load_model`. Routing is a discrete choice, so a near-tie between two experts' scores could flip
under float32 rounding differences and make the logits differ for reasons unrelated to correctness: the
router weights are drawn with std 0.5 (not the 0.15 of the other matrices), which spreads the scores of
the 8–16 experts far apart, and the fixed seeds below have been checked to route identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxft
from jaxft.models import get_family, moe
from causal_helpers import (VOCAB, check_export_round_trips, hf_logits, long_prompt, max_diff, padded_batch,
                            token_ce)
from conftest import decode, forward

TOL = 1e-4
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=6, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=1024)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 1.0,
        "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}

VARIANTS: dict[str, tuple[str, dict]] = {
    # V2-Lite's shape: no q compression, greedy softmax routing, two shared experts
    "v2-lite": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2)),
    "v2-group-bias": ("deepseek_v2", dict(q_lora_rank=16, topk_method="group_limited_greedy", n_group=4,
                                          topk_group=2, routed_scaling_factor=3.0, attention_bias=True,
                                          mlp_bias=True)),
    "v2-yarn": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy", rope_parameters=YARN)),
    "v3": ("deepseek_v3", dict(q_lora_rank=16, n_group=4, topk_group=2)),
    "v3-unnormalised-tied-halfrope": ("deepseek_v3", dict(q_lora_rank=None, n_group=2, topk_group=1,
                                                          norm_topk_prob=False, tie_word_embeddings=True,
                                                          rope_interleave=False)),
    # V3's own yarn settings (mscale = mscale_all_dim), every layer MoE, biases on
    "v3-yarn-all-moe": ("deepseek_v3", dict(q_lora_rank=16, n_group=1, topk_group=1, first_k_dense_replace=0,
                                            attention_bias=True, rope_parameters=dict(YARN, mscale_all_dim=1.0))),
    "v3-16-experts-2-dense": ("deepseek_v3", dict(n_routed_experts=16, num_experts_per_tok=4, n_group=8,
                                                  topk_group=3, first_k_dense_replace=2)),
}
YARN_VARIANTS = [n for n, (_, kw) in VARIANTS.items() if "rope_parameters" in kw]


def build_hf(variant: str, seed: int = 0, **overrides):
    """A random model (eval, eager attention); every parameter and the correction bias randomised."""
    import torch
    import transformers

    model_type, kw = VARIANTS[variant]
    cfg = transformers.AutoConfig.for_model(model_type, **json.loads(json.dumps(dict(BASE, **kw, **overrides))))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def save_hf(variant: str, folder: Path, spelling: str = "rope_parameters", **overrides) -> Path:
    """`spelling="rope_scaling"` rewrites config.json as Hub checkpoints spell RoPE (`rope_scaling` + `type`)."""
    build_hf(variant, **overrides).save_pretrained(folder)
    if spelling == "rope_scaling":
        path = Path(folder) / "config.json"
        cfg = json.loads(path.read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
        path.write_text(json.dumps(cfg, indent=2))
    return Path(folder)


def load_hf(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


CASES = [(v, "rope_parameters") for v in VARIANTS] + [(v, "rope_scaling") for v in YARN_VARIANTS]


@pytest.mark.parametrize("variant,spelling", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_logits_match_transformers(tmp_path, variant, spelling):
    folder = save_hf(variant, tmp_path / "hf", spelling=spelling)
    ref, model = load_hf(folder), jaxft.load_model(folder, task="causal-lm")
    ids, mask = padded_batch()
    d_pad = max_diff(forward(model, ids, attention_mask=mask), hf_logits(ref, ids, mask), mask)
    ids = long_prompt(512)
    d_long = max_diff(forward(model, ids), hf_logits(ref, ids))
    print(f"{variant} ({spelling}): padded {d_pad:.2e}, 512 tokens {d_long:.2e}")
    assert d_pad <= TOL and d_long <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trips(tmp_path, variant):
    """Untouched: the names, shapes, dtypes and bits `save_pretrained` wrote (per-expert tensors, the
    correction bias). Perturbed: transformers reloads it with no missing or unexpected keys and its logits
    match jaxft's."""
    src = save_hf(variant, tmp_path / "hf")
    tensors = check_export_round_trips(src, tmp_path, variant, TOL)
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in tensors)


@pytest.mark.parametrize("variant", ["v2-group-bias", "v3"])
def test_gradients_match_pytorch(tmp_path, variant):
    """Gradients through MLA and the sorted expert dispatch equal PyTorch's (its fused `gate_up_proj`
    gradient split into the per-expert checkpoint names)."""
    import torch

    folder = save_hf(variant, tmp_path / "hf")
    model = jaxft.load_model(folder, task="causal-lm")
    ids, mask = padded_batch(length=16)
    ids, mask = ids[:2], mask[:2]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: token_ce(nnx.merge(graphdef, p, rest)(ids, attention_mask=mask),
                                                 ids, mask)))(params)
    table = get_family(model.hf_config["model_type"], "causal-lm").name_table(model.config, "causal-lm")
    ours = table.export({".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)})

    ref = load_hf(folder)
    logits = ref(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    w = torch.tensor(mask[:, 1:] * mask[:, :-1], dtype=torch.float32)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           torch.tensor(ids[:, 1:], dtype=torch.long).reshape(-1), reduction="none")
    ((ce * w.reshape(-1)).sum() / w.sum()).backward()
    theirs = {}
    for n, p in ref.named_parameters():
        if n.endswith("experts.gate_up_proj"):
            F = p.shape[1] // 2
            for e in range(p.shape[0]):
                theirs[n.replace("gate_up_proj", f"{e}.gate_proj.weight")] = p.grad[e, :F].numpy()
                theirs[n.replace("gate_up_proj", f"{e}.up_proj.weight")] = p.grad[e, F:].numpy()
        elif n.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                theirs[n.replace("down_proj", f"{e}.down_proj.weight")] = p.grad[e].numpy()
        else:
            theirs[n] = p.grad.numpy()
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for name, g in theirs.items():
        scale = max(np.abs(g).max(), 1e-6)  # experts no token chose have exactly zero gradient on both sides
        rel = np.abs(ours[name] - g).max() / scale
        worst = max(worst, rel)
        assert rel <= TOL, (name, rel)
    print(f"{variant}: worst relative gradient difference {worst:.2e} over {len(theirs)} tensors")


@pytest.mark.parametrize("variant", ["v2-lite", "v3-yarn-all-moe"])
def test_greedy_generation_matches_transformers(tmp_path, variant):
    """Left-padded batch, greedy: token for token as `transformers`' `generate`; the cache holds only the
    compressed latent and the rotary key, and cached decoding reproduces the uncached logits."""
    import torch

    folder = save_hf(variant, tmp_path / "hf", eos_token_id=None, pad_token_id=0)
    ref, model = load_hf(folder), jaxft.load_model(folder, task="causal-lm")
    ids, mask = padded_batch(length=12, seed=5)
    ids, mask = ids[[0, 2]], mask[[0, 2]]               # a full row and a left-padded one
    ours = jaxft.generate(model, ids, max_new_tokens=10, attention_mask=mask)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                              max_new_tokens=10, do_sample=False)[:, ids.shape[1]:].numpy()
    print(f"{variant}: jaxft {ours.tolist()} transformers {theirs.tolist()}")
    np.testing.assert_array_equal(ours, theirs)

    cache = model.init_cache(2, 16)
    cfg = model.config
    assert cache.keys[0].shape == (2, 16, 1, cfg.kv_lora_rank) and cache.values[0].shape == (2, 16, 1, 4)
    positions = np.where(mask, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    step, cache = decode(model, ids[:, :8], positions[:, :8], mask[:, :8], cache)
    rest, cache = decode(model, ids[:, 8:], positions[:, 8:], mask[:, 8:], cache)
    full = forward(model, ids, attention_mask=mask, positions=positions)
    d = max_diff(np.concatenate([step, rest], 1), full, mask)
    print(f"{variant}: cached (absorbed latent) vs uncached logits {d:.2e}")
    assert d <= 1e-5


def test_training_step_lowers_loss_and_reports_router_stats(tmp_path):
    """A few jitted AdamW steps on CE + 0.01 × balance loss lower the loss; statistics cover the real
    tokens of every MoE layer; the correction bias (a Buffer) is untouched by the optimiser."""
    model = jaxft.load_model(save_hf("v3", tmp_path / "hf"), task="causal-lm")
    ids, mask = padded_batch(length=16)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    bias_before = np.asarray(model.model.layers[1].mlp.gate.e_score_correction_bias[...])
    tx = optax.adamw(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss(p):
            logits, stats = nnx.merge(graphdef, p, rest).forward_with_router_stats(ids, attention_mask=mask)
            return token_ce(logits, ids, mask) + 0.01 * stats.balance_loss.sum(), stats
        (l, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, l, stats

    losses = []
    for _ in range(8):
        params, opt, l, stats = step(params, opt)
        losses.append(float(l))
    print("losses", [round(x, 4) for x in losses], {k: float(v) for k, v in moe.router_metrics(stats).items()})
    assert losses[-1] < losses[0] - 0.1
    assert stats.counts.shape == (2, 8) and stats.balance_loss.shape == (2,)
    np.testing.assert_array_equal(np.asarray(stats.counts.sum(-1)), [2 * mask.sum()] * 2)
    after = nnx.merge(graphdef, params, rest)
    np.testing.assert_array_equal(np.asarray(after.model.layers[1].mlp.gate.e_score_correction_bias[...]),
                                  bias_before)


def test_packed_equals_unpacked(tmp_path):
    """Two documents packed in one row (segment ids, positions restarting) get the logits they get alone;
    the router statistics count the real tokens only."""
    model = jaxft.load_model(save_hf("v3", tmp_path / "hf"), task="causal-lm")
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, VOCAB, n).astype(np.int32) for n in (13, 17)]
    row = np.concatenate(docs + [np.zeros(4, np.int32)])[None]
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(4)])[None].astype(np.int32)
    logits, stats = forward(model, row, attention_mask=(seg > 0).astype(np.int32), segment_ids=seg,
                            method="forward_with_router_stats")
    assert float(stats.counts[0].sum()) == 2 * 30
    start = 0
    for d in docs:
        d_max = max_diff(logits[:, start:start + len(d)], forward(model, d[None]))
        assert d_max <= 1e-5, d_max
        start += len(d)


def test_mtp_layers_in_checkpoint_are_ignored(tmp_path):
    """DeepSeek-V3 checkpoints carry their multi-token-prediction module (`num_nextn_predict_layers`) as a
    layer after the last one: a whole decoder layer (attention, routed and shared experts, norms) plus its
    own embedding, norms, `eh_proj` and head. Like transformers, jaxft skips every tensor of it: looped
    and scanned, the model loaded from the checkpoint with the MTP layer holds exactly the parameters of
    the one without it (the three decoder layers, nothing of layer 3), and its logits equal
    transformers'."""
    ref = build_hf("v3")
    assert ref.config.num_nextn_predict_layers == 1 and ref.config.num_hidden_layers == 3
    folder = tmp_path / "hf"
    ref.save_pretrained(folder)
    ids, mask = padded_batch()
    want = hf_logits(ref, ids, mask)
    plain = {scan: jaxft.load_model(folder, task="causal-lm", scan_layers=scan) for scan in (False, True)}

    tensors = load_file(str(folder / "model.safetensors"))
    rng = np.random.RandomState(0)
    mtp = {name.replace("model.layers.2.", "model.layers.3."): rng.standard_normal(v.shape).astype(v.dtype)
           for name, v in tensors.items() if name.startswith("model.layers.2.")}
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in mtp and "model.layers.3.self_attn.q_a_proj.weight" in mtp
    for name, shape in {"enorm.weight": (32,), "hnorm.weight": (32,), "eh_proj.weight": (32, 64),
                        "embed_tokens.weight": (VOCAB, 32), "shared_head.norm.weight": (32,),
                        "shared_head.head.weight": (VOCAB, 32)}.items():
        mtp[f"model.layers.3.{name}"] = rng.standard_normal(shape).astype(np.float32)
    save_file({**tensors, **mtp}, str(folder / "model.safetensors"), metadata={"format": "pt"})

    for scan in (False, True):
        model = jaxft.load_model(folder, task="causal-lm", scan_layers=scan)
        got = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Variable))}
        base = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(plain[scan], nnx.Variable))}
        assert sorted(got) == sorted(base), scan
        assert all(np.array_equal(got[k], base[k]) for k in base), scan
        if scan:
            assert model.model.dense_layers.mlp.gate_proj.kernel.shape[0] == 1
            assert model.model.layers.mlp.experts.gate_proj.kernel.shape[:2] == (2, 8)
        else:
            assert len(model.model.layers) == 3
        d = max_diff(forward(model, ids, attention_mask=mask), want, mask)
        assert d <= TOL, (scan, d)


@pytest.mark.parametrize("variant,field,value,named", [
    ("v2-lite", "norm_topk_prob", True, "norm_topk_prob"),
    ("v2-lite", "topk_method", "noaux_tc", "topk_method"),
    ("v2-lite", "scoring_func", "sigmoid", "scoring_func"),
    ("v3", "topk_method", "greedy", "topk_method"),
    ("v3", "scoring_func", "softmax", "scoring_func"),
    ("v3", "n_group", 3, "n_group"),
    ("v3", "num_key_value_heads", 2, "num_key_value_heads"),
    ("v2-lite", "moe_layer_freq", 2, "moe_layer_freq"),
    ("v3", "quantization_config", {"quant_method": "fp8"}, "quantization_config"),
    ("v2-lite", "hidden_act", "relu2", "hidden_act"),
    ("v3", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
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
