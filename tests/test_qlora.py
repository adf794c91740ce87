"""QLoRA: a quantised frozen base (int8, NF4) under LoRA adapters."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxft
from jaxft.config import OptimSection
from jaxft.lora import LoraSpec, apply_lora, merge
from jaxft.train.step import Functional

from causal_helpers import hf_logits, load_hf, max_diff, padded_batch, save_hf
from lora_helpers import TOL, _fit
from conftest import forward


def test_nf4_code_book_and_quantisation_error_bounds():
    """NF4 levels are the published ones and follow from the normal quantiles; every entry of a dequantised
    kernel is within the stated bound (int8: s/2 per output channel; nf4: absmax·max_gap/2 per block)."""
    from jaxft.models.quant import NF4, NF4_MAX_GAP, QuantKernel, nf4_from_quantiles

    published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
    assert np.array_equal(NF4, np.float32(published))
    assert np.abs(nf4_from_quantiles() - NF4).max() < 1e-6
    w = jax.random.normal(jax.random.key(0), (3, 64, 4, 128)) * jnp.linspace(0.1, 2.0, 128)  # [L, D, N, H]
    for kind in ("int8", "nf4"):
        q = QuantKernel(w, kind, ("layers", "embed", "heads", "head_dim"), (-3,))
        err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
        bound = np.asarray(q.error_bound())
        if kind == "int8":
            assert q.codes.dtype == jnp.int8 and q.scale.shape == (3, 4, 128)
            assert (err <= bound[:, None] * (1 + 1e-6)).all()
            assert err.max() < 0.01 * np.abs(np.asarray(w)).max()
        else:
            assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 64, 4, 64) and q.scale.shape == (3, 64, 4, 2)
            blocks = err.reshape(3, 64, 4, 2, 64)
            assert (blocks <= bound[..., None] * (1 + 1e-6)).all()
            assert NF4_MAX_GAP == pytest.approx(0.3038, abs=1e-4)
            # and the bound is not slack: some entry uses at least half of it
            assert (blocks / bound[..., None]).max() > 0.5


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_layer_keeps_codes_not_a_float_kernel_for_the_backward(kind):
    """A quantised `Dense` under an adapter keeps its codes and scales for the backward pass, never the
    dequantised float kernel (it is dequantised again there), with the same adapter and input gradients
    as the plain product with the dequantised kernel."""
    from jax._src.ad_checkpoint import saved_residuals

    from jaxft.lora import quantize_layer
    from jaxft.models.layers import Dense, linear
    from jaxft.models.lora import LoRA, LoRAParam

    layer = Dense("BTD,DNH->BTNH", (64, 4, 32), ("embed", "heads", "head_dim"), use_bias=False, rngs=nnx.Rngs(0))
    quantize_layer(layer, kind)
    layer.lora = LoRA(layer.einsum, (64, 4, 32), ("embed", "heads", "head_dim"), 4, 8.0, key=jax.random.key(1))
    layer.lora.b.set_value(jax.random.normal(jax.random.key(2), layer.lora.b.shape))
    graphdef, adapters, rest = nnx.split(layer, LoRAParam, ...)
    x, g = jax.random.normal(jax.random.key(3), (2, 8, 64)), jax.random.normal(jax.random.key(4), (2, 8, 4, 32))

    def loss(adapters, x, plain=False):
        m = nnx.merge(graphdef, adapters, rest)
        y = linear(m.einsum, x, m.quant.dequantize()) + m.lora(x) if plain else m(x)
        return jnp.sum(y * g)

    ours, plain = jax.grad(loss, (0, 1))(adapters, x), jax.grad(lambda a, x: loss(a, x, True), (0, 1))(adapters, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    kept = [(a.shape, a.dtype) for a, _ in saved_residuals(loss, adapters, x)]
    assert not [k for k in kept if k[0] == (64, 4, 32) and jnp.issubdtype(k[1], jnp.floating)], kept
    assert any(jnp.issubdtype(dtype, jnp.integer) for _, dtype in kept), kept   # the codes


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_trains_and_merged_export_matches(tmp_path, kind):
    """A tiny Llama loaded quantised: only the codes and scales are held (no float kernel of a linear layer),
    LoRA training lowers the loss, and the merged export (dequantised base + adapters) loads in
    transformers with jaxft's QLoRA logits within 1e-4."""
    from jaxft.models.quant import QuantParam

    src = save_hf("llama-bias", tmp_path / "base")
    model = jaxft.load_model(src, task="causal-lm", quantize=kind, scan_layers=True)
    codes = [v for _, v in nnx.to_flat_state(nnx.state(model, QuantParam))]
    assert codes and {str(v.get_value().dtype) for v in codes} >= {"int8" if kind == "int8" else "uint8"}
    assert model.model.layers.self_attn.q_proj.kernel is None and model.lm_head.quant is None
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0))
    fn = Functional(model, adapters.trainable)
    assert all(".lora." in k for k in fn.params) and any(".quant." in k for k in fn.frozen)
    state, losses = _fit(fn, OptimSection(lr=2e-2), 8)
    assert losses[-1] < 0.9 * losses[0], losses
    ids, mask = padded_batch()
    trained = fn.module(state["params"])
    trained.hf_config = model.hf_config
    ours = np.asarray(trained(ids, attention_mask=mask))
    merge(trained, adapters)
    jaxft.save_pretrained(trained, tmp_path / "merged")
    assert max_diff(hf_logits(load_hf(tmp_path / "merged"), ids, mask), ours, mask) <= TOL


def test_plan_shows_the_qlora_saving_for_an_8b_model(tmp_path):
    """Llama-3-8B's shape (config only, nothing allocated): full fine-tuning in bfloat16 fits neither a 16 GiB
    TPU v5e nor a 24 GiB GPU; LoRA on an nf4 base with remat does, at about half a byte per base parameter."""
    from jaxft.config import load_config
    from jaxft.plan import GiB, plan

    folder = tmp_path / "llama3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    base = {"model": {"name_or_path": str(folder), "task": "causal-lm", "dtype": "bfloat16",
                      "param_dtype": "bfloat16", "remat": "full", "scan_layers": True},
            "train": {"batch_size": 1}, "data": {"max_length": 1024}}
    full = plan(load_config(base=base), devices=1)
    qlora = plan(load_config(base=base, overrides=["model.lora.rank=16", "model.quantize=nf4"]), devices=1)
    assert 7.9e9 < full.param_count < 8.1e9
    assert not full.fits()["TPU v5e"] and full.per_device["peak"] > 24 * GiB
    assert qlora.fits()["TPU v5e"], qlora.report()
    assert qlora.per_device["peak"] < 16 * GiB < full.per_device["peak"] / 3
    # the quantised linear layers at ~0.53 bytes; embeddings and the head stay bfloat16 (2 bytes)
    assert 0.5 < float(qlora.settings["base_bytes_per_param"]) < 0.9
    assert "nf4" in qlora.report() and "bytes per base parameter" in qlora.report()


def test_qlora_quantises_deepseek_routed_experts(tmp_path):
    """DeepSeek-V3 loaded as int8: the routed experts' stacked kernels are held quantised like every other
    linear layer (codes `[L, E, D, F]`, no float kernel); LoRA on attention and the routed experts over
    that base; the merged export (dequantised, adapters folded in per expert) matches jaxft's QLoRA
    logits in transformers within 1e-4."""
    from jaxft.models.quant import QuantParam
    from lora_helpers import _save, randomise_adapters

    src = _save("deepseek-v3", tmp_path / "base")
    model = jaxft.load_model(src, task="causal-lm", quantize="int8", scan_layers=True)
    experts = model.model.layers.mlp.experts
    for p in (experts.gate_proj, experts.up_proj, experts.down_proj):
        assert p.kernel is None and p.quant.codes.dtype == jnp.int8 and p.quant.codes.shape[:2] == (2, 8)
    assert any("experts" in k for k, _ in nnx.to_flat_state(nnx.state(model, QuantParam)))
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0, targets=r"self_attn\..*|experts\..*"))
    randomise_adapters(model)
    ids, mask = padded_batch()
    ours = np.asarray(forward(model, ids, attention_mask=mask))
    merge(model, adapters)
    assert experts.gate_proj.quant is None and experts.gate_proj.kernel is not None
    jaxft.save_pretrained(model, tmp_path / "merged")
    assert max_diff(hf_logits(load_hf(tmp_path / "merged"), ids, mask), ours, mask) <= TOL


def _trainer_model(src, kind: str, scan: bool = False):
    """The model the trainer builds for a QLoRA run (`load_run_model` from a config with `model.quantize`):
    the base quantised while loading, fresh adapters (B = 0) attached."""
    from jaxft.config import load_config
    from jaxft.train.model import load_run_model

    cfg = load_config(base={"model": {"name_or_path": str(src), "task": "causal-lm", "quantize": kind,
                                      "scan_layers": scan, "lora": {"rank": 4}}})
    return load_run_model(cfg, src).model


def _code_book_error(w: np.ndarray, einsum: str, kind: str) -> np.ndarray:
    """The largest error each entry of the float kernel `w` may have once quantised, from `w` alone: int8
    s/2 with s = max|w| over the dims that contract with the input / 127 (per output channel); nf4
    absmax·max_gap/2 over blocks of (up to) 64 along the last axis."""
    from jaxft.models.quant import NF4_MAX_GAP

    lhs, rhs = einsum.split("->")[0].split(",")
    if kind == "int8":
        contracted = tuple(i - len(rhs) for i, c in enumerate(rhs) if c in lhs)
        return np.broadcast_to(np.abs(w).max(contracted, keepdims=True) / 127 / 2, w.shape)
    last = w.shape[-1]
    b = max(n for n in range(1, min(64, last) + 1) if last % n == 0)
    blocks = np.abs(w).reshape(w.shape[:-1] + (last // b, b))
    return np.broadcast_to(blocks.max(-1, keepdims=True) * NF4_MAX_GAP / 2, blocks.shape).reshape(w.shape)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_logits_within_the_code_book_error_of_the_float_model(tmp_path, kind):
    """The QLoRA base the trainer loads (`model.quantize`, the loader's `quantize_layer`) against the float
    model from the same checkpoint (a tiny Llama, every weight random): every linear layer but the head is
    held quantised; each dequantised kernel is within the code book's error of the float kernel, entry by
    entry (the bound computed from the float kernel alone); the float model with its kernels replaced by
    those dequantised values gives the quantised model's logits within 1e-5 (the forward uses them and
    nothing else); and the float model's logits differ from the quantised ones by no more than the
    first-order propagation of those errors, Σ |∂logit/∂W|·error bound over every quantised entry."""
    from jaxft.lora import _module_at, quantizable
    from jaxft.models.layers import Dense

    src = save_hf("llama-bias", tmp_path / "base")
    ids, mask = padded_batch(length=12)   # 3456 logits: one reverse pass each below
    flt = jaxft.load_model(src, task="causal-lm")
    quant = _trainer_model(src, kind)
    dense = {".".join(map(str, p)): m for p, m in nnx.iter_modules(quant) if isinstance(m, Dense)}
    assert len(dense) == 2 * 7 + 1 and dense["lm_head"].quant is None
    held = {p for p, m in dense.items() if m.quant is not None and m.kernel is None}
    assert held == set(dense) - {"lm_head"}
    assert {f"{p}.kernel" for p in held} == set(quantizable(flt))

    ours = np.asarray(forward(quant, ids, attention_mask=mask))
    dequantised = nnx.clone(flt)
    bound = {}
    for p in sorted(held):
        w = np.asarray(_module_at(flt, p).kernel[...])
        deq = np.asarray(dense[p].quant.dequantize())
        bound[p] = _code_book_error(w, dense[p].einsum, kind)
        assert deq.shape == w.shape and (np.abs(deq - w) <= bound[p] * (1 + 1e-6)).all(), p
        _module_at(dequantised, p).kernel.set_value(jnp.asarray(deq))
    assert max_diff(forward(dequantised, ids, attention_mask=mask), ours, mask) <= 1e-5

    # first-order propagation: |Δlogit| ≤ Σ_W Σ_ij |∂logit/∂W_ij|·bound_ij, one reverse pass per logit
    graphdef, state = nnx.split(flt)
    eps = {p: jnp.asarray(bound[p]) for p in held}

    def logits_of(kernels):
        model = nnx.merge(graphdef, state)
        for p, w in kernels.items():
            layer = _module_at(model, p)
            layer.kernel = layer.kernel.replace(w)
        return model(ids, attention_mask=mask)

    out, vjp = jax.vjp(logits_of, {p: _module_at(flt, p).kernel[...] for p in held})
    flt_logits = np.asarray(out)

    def propagated(i):
        g, = vjp(jax.nn.one_hot(i, out.size, dtype=out.dtype).reshape(out.shape))
        return sum(jnp.sum(jnp.abs(g[p]) * eps[p]) for p in g)

    first_order = np.asarray(jax.jit(lambda i: jax.lax.map(propagated, i, batch_size=512))(
        jnp.arange(out.size))).reshape(out.shape)
    real = mask.astype(bool)
    gap = np.abs(flt_logits - ours)[real]
    assert (gap <= first_order[real]).all(), (gap / first_order[real]).max()
    assert gap.max() > 1e-3, "quantisation changed nothing: is the base really quantised?"


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
def test_int8_scales_are_per_output_channel_through_the_loader(tmp_path, scan):
    """int8 through the trainer's loader (`model.quantize: int8`): each kernel holds int8 codes of its own
    shape and one scale per output channel (the kernel's dims that do not contract with the input; a
    scanned stack's `layers` axis kept): `scale = max|W| over the contracted dims / 127` of the float
    kernel, `codes = round(W / scale)`, for q/k/v (`[D, N, H]` → `[N, H]`), o (`[N, H, D]` → `[D]`) and the
    MLP (`[D, F]` → `[F]`, `[F, D]` → `[D]`)."""
    from jaxft.lora import _module_at

    src = save_hf("llama-bias", tmp_path / "base")
    flt = jaxft.load_model(src, task="causal-lm", scan_layers=scan)
    quant = _trainer_model(src, "int8", scan)
    lead = (2,) if scan else ()
    want = {"self_attn.q_proj": (4, 8), "self_attn.k_proj": (2, 8), "self_attn.v_proj": (2, 8),
            "self_attn.o_proj": (32,), "mlp.gate_proj": (48,), "mlp.up_proj": (48,), "mlp.down_proj": (32,)}
    for layer in ["model.layers"] if scan else ["model.layers.0", "model.layers.1"]:
        for name, scale_shape in want.items():
            q = _module_at(quant, f"{layer}.{name}").quant
            w = np.asarray(_module_at(flt, f"{layer}.{name}").kernel[...])
            lhs, rhs = _module_at(flt, f"{layer}.{name}").einsum.split("->")[0].split(",")
            contracted = tuple(i - len(rhs) for i, c in enumerate(rhs) if c in lhs)   # from the end
            codes, scale = np.asarray(q.codes[...]), np.asarray(q.scale[...])
            assert codes.dtype == np.int8 and codes.shape == w.shape, name
            assert scale.shape == lead + scale_shape, (name, scale.shape)
            s = np.abs(w).max(contracted, keepdims=True) / 127
            np.testing.assert_allclose(scale, np.squeeze(s, contracted), rtol=1e-6, err_msg=name)
            assert np.abs(codes - np.round(w / s)).max() <= 1, name   # ±1 only at a rounding tie
            assert (np.abs(codes.astype(np.float32) * s - w) <= s / 2 * (1 + 1e-5)).all(), name
