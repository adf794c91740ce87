"""DeepSeekMoE layer: sort/gather dispatch vs the dense every-expert reference, router statistics, the
balance loss, the correction-bias buffer and update rule, and the router-freezing filter."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxft.models import moe, rope as rope_lib
from jaxft.models.deepseek import DeepseekConfig


def config(**kw) -> DeepseekConfig:
    base = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, rope=rope_lib.Rope(dim=4), softmax_scale=12 ** -0.5,
                rope_interleave=True, first_k_dense_replace=0, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, moe_intermediate_size=16, topk_method="noaux_tc", scoring_func="sigmoid",
                n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    return DeepseekConfig(**dict(base, **kw))


def layer(cfg: DeepseekConfig, seed: int = 0) -> moe.MoE:
    m = moe.MoE(cfg, nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    m.gate.kernel.set_value(0.5 * jax.random.normal(key, m.gate.kernel.shape))  # well-separated scores
    if cfg.topk_method == "noaux_tc":
        m.gate.e_score_correction_bias.set_value(0.1 * jax.random.normal(jax.random.fold_in(key, 1), (8,)))
    return m


ROUTERS = {
    "v3-noaux_tc": dict(),
    "v3-noaux_tc-unnormalised": dict(norm_topk_prob=False, n_group=2, topk_group=1),
    "v2-greedy": dict(model_type="deepseek_v2", topk_method="greedy", scoring_func="softmax", n_group=None,
                      topk_group=None, norm_topk_prob=False, routed_scaling_factor=1.0),
    "v2-group_limited_greedy": dict(model_type="deepseek_v2", topk_method="group_limited_greedy",
                                    scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0),
}


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("B,T", [(2, 24), (1, 1), (3, 2)])   # training-like, one decode token, fewer rows than experts
def test_dispatch_matches_dense_reference(router, B, T):
    """Outputs and gradients (input, router, expert weights) of the sorted dispatch, with either grouped
    matmul, equal those of running every expert on every token, within 1e-5."""
    m = layer(config(**ROUTERS[router]))
    x = jax.random.normal(jax.random.key(7), (B, T, 32))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    @jax.jit
    def run(p, x):
        def f(p, x, impl):
            y, counts, loss = nnx.merge(graphdef, p, rest)(x, impl=impl)
            return jnp.sum(jnp.sin(y)) + loss, (y, counts)
        return {impl: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, x, impl)
                for impl in ("dense", "ragged_dot", "blocks")}

    out = run(params, x)
    (_, (y_d, c_d)), g_d = out["dense"]
    for impl in ("ragged_dot", "blocks"):
        (_, (y_s, c_s)), g_s = out[impl]
        d_y = float(jnp.abs(y_s - y_d).max())
        d_g = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_d)))
        print(f"{router} {impl} B={B} T={T}: output {d_y:.1e}, gradients {d_g:.1e}")
        assert np.array_equal(np.asarray(c_s), np.asarray(c_d)) and float(c_s.sum()) == B * T * 2
        assert d_y <= 1e-5 and d_g <= 1e-5


def test_blocks_cover_every_row_layout():
    """The padded-block layout holds any distribution of rows over experts: all on one expert, one each,
    and many experts left empty."""
    D, F, E = 8, 4, 16
    key = jax.random.key(0)
    gate, up = (jax.random.normal(jax.random.fold_in(key, i), (E, D, F)) for i in (1, 2))
    down = jax.random.normal(jax.random.fold_in(key, 3), (E, F, D))
    x = jax.random.normal(key, (40, D))
    w = jax.random.uniform(jax.random.fold_in(key, 4), (40, 3))
    run = jax.jit(lambda e, impl: moe.routed_experts(x, e, w, gate, up, down, jax.nn.silu, impl),
                  static_argnums=1)
    for e in [jnp.zeros((40, 3), jnp.int32), jnp.arange(120).reshape(40, 3) % E,
              jnp.stack([jnp.full(40, 5), jnp.full(40, 9), jnp.arange(40) % 2], 1)]:
        ref, got = run(e, "dense"), run(e, "blocks")
        assert float(jnp.abs(got - ref).max()) <= 1e-4 * float(jnp.abs(ref).max())


@pytest.mark.parametrize("impl", ["dense", "ragged_dot", "blocks"])
def test_expert_slices_add_up_to_the_whole_layer(impl):
    """Expert parallelism's local step: each of 4 slices of 2 experts (`first` = 0, 2, 4, 6) gives the
    contributions of its own experts only, and the 4 partial outputs sum to the full layer's."""
    D, F, E = 8, 4, 8
    key = jax.random.key(0)
    gate, up = (jax.random.normal(jax.random.fold_in(key, i), (E, D, F)) for i in (1, 2))
    down = jax.random.normal(jax.random.fold_in(key, 3), (E, F, D))
    x = jax.random.normal(key, (24, D))
    e = jax.random.randint(jax.random.fold_in(key, 4), (24, 2), 0, E)
    w = jax.random.uniform(jax.random.fold_in(key, 5), (24, 2))
    whole = moe.routed_experts(x, e, w, gate, up, down, jax.nn.silu, impl)
    parts = [moe.routed_experts(x, e, w, gate[f:f + 2], up[f:f + 2], down[f:f + 2], jax.nn.silu, impl, first=f)
             for f in range(0, E, 2)]
    np.testing.assert_allclose(sum(parts), whole, atol=1e-5)
    elsewhere = np.asarray(jnp.all(e >= 2, axis=1))          # tokens with no slot on slice 0's experts
    assert elsewhere.any() and np.all(np.asarray(parts[0])[elsewhere] == 0)


def test_router_matches_formula():
    """noaux_tc by hand: groups scored by their two best biased scores, top-k of the kept, weights from the
    unbiased scores, renormalised and scaled."""
    cfg = config()
    m = layer(cfg)
    x = np.asarray(jax.random.normal(jax.random.key(3), (5, 32)))
    s, e, w = m.gate(jnp.asarray(x))
    logits = x @ np.asarray(m.gate.kernel[...])
    sig = 1 / (1 + np.exp(-logits))
    choice = sig + np.asarray(m.gate.e_score_correction_bias[...])
    for n in range(5):
        groups = choice[n].reshape(4, 2)
        kept = np.argsort(-np.sort(groups, 1)[:, -2:].sum(1))[:2]
        masked = np.full(8, -np.inf)
        for g in kept:
            masked[2 * g: 2 * g + 2] = choice[n, 2 * g: 2 * g + 2]
        top = np.argsort(-masked)[:2]
        assert sorted(np.asarray(e[n]).tolist()) == sorted(top.tolist())
        want = sig[n, top] / sig[n, top].sum() * 2.5
        got = dict(zip(np.asarray(e[n]).tolist(), np.asarray(w[n]).tolist()))
        np.testing.assert_allclose([got[i] for i in top], want, rtol=1e-5)


def test_counts_and_balance_loss():
    """Counts cover the real tokens only; the balance loss equals its definition computed in numpy."""
    cfg = config()
    m = layer(cfg)
    x = jax.random.normal(jax.random.key(5), (3, 10, 32))
    mask = np.ones((3, 10), bool)
    mask[1, 6:] = False
    mask[2, :] = False                      # a row without real tokens drops out of the mean
    _, counts, loss = m(x, jnp.asarray(mask))
    s, e, _ = m.gate(x.reshape(30, 32))
    s, e = np.asarray(s).reshape(3, 10, 8), np.asarray(e).reshape(3, 10, 2)
    assert float(counts.sum()) == 2 * mask.sum()
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(e[mask].reshape(-1), minlength=8))
    per_row = []
    for b in range(2):
        T = mask[b].sum()
        f = np.bincount(e[b][mask[b]].reshape(-1), minlength=8) * 8 / (2 * T)
        p = (s[b][mask[b]] / s[b][mask[b]].sum(-1, keepdims=True)).mean(0)
        per_row.append((f * p).sum())
    np.testing.assert_allclose(float(loss), np.mean(per_row), rtol=1e-5)

    stats = moe.RouterStats(counts[None], loss[None])
    metrics = moe.router_metrics(stats)
    share = np.asarray(counts) * 8 / np.asarray(counts).sum()
    np.testing.assert_allclose(float(metrics["moe_load_max"]), share.max(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["moe_load_min"]), share.min(), rtol=1e-6)
    c = np.asarray(counts)
    assert float(metrics["moe_load_ratio"]) == pytest.approx(c.max() / max(c.min(), 1))


def test_correction_bias_is_a_buffer_not_a_param():
    """The optimiser never sees the bias (it is not an nnx.Param); the update rule lowers overloaded experts."""
    m = layer(config())
    params = nnx.state(m, nnx.Param)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "gate.kernel" in paths and not any("correction" in p for p in paths)
    assert isinstance(m.gate.e_score_correction_bias, moe.Buffer)
    assert not isinstance(m.gate.e_score_correction_bias, nnx.Param)
    bias = jnp.zeros(4)
    new = moe.update_correction_bias(bias, jnp.array([10.0, 2.0, 4.0, 0.0]), 0.001)
    np.testing.assert_allclose(np.asarray(new), [-0.001, 0.001, 0.0, 0.001])


def test_router_can_be_frozen_by_path():
    """Masking `is_router_param` paths out of the optimiser leaves the router untouched, trains the rest."""
    m = layer(config())
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    assert [p for p in flat if moe.is_router_param("model.layers.1.mlp." + p)] == ["gate.kernel"]
    labels = {p: "frozen" if moe.is_router_param("mlp." + p) else "train" for p in flat}
    tx = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))

    def loss(flat):
        state = nnx.from_flat_state({tuple(p.split(".")): v for p, v in flat.items()})
        y, _, aux = nnx.merge(graphdef, state, rest)(x)
        return jnp.sum(y ** 2) + aux

    grads = jax.jit(jax.grad(loss))(flat)
    updates, _ = tx.update(grads, tx.init(flat), flat)
    new = optax.apply_updates(flat, updates)
    assert np.array_equal(np.asarray(new["gate.kernel"]), np.asarray(flat["gate.kernel"]))
    assert not np.array_equal(np.asarray(new["experts.gate_proj.kernel"]),
                              np.asarray(flat["experts.gate_proj.kernel"]))


def test_block_size():
    assert moe.block_size(8192, 64) == 64 and moe.block_size(8192, 8) == 128
    assert moe.block_size(6, 64) == 1 and moe.block_size(1, 8) == 1


def test_unknown_impl_raises():
    m = layer(dataclasses.replace(config(), moe_impl="megablocks"))
    with pytest.raises(ValueError, match="megablocks"):
        m(jnp.zeros((1, 2, 32)))
