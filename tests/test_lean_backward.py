"""The hand-written backward passes that keep less for the backward than autodiff would (RMSNorm,
LayerNorm, the GLU gate, a plain MLP's activation, dense attention, the weighted cross-entropy): each
equals plain autodiff of the same function, and keeps only what its docstring says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # (public: only print_saved_residuals)

from jaxft.models.attention import MASKED, _dense_attention
from jaxft.models.dropout import keep_mask, keep_scale
from jaxft.models.layers import ACTIVATIONS, activate, gated, layer_norm, rms_norm
from jaxft.train.losses import cross_entropy, weighted_cross_entropy_sum


def close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol)


def rand(key, *shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


def f32_sizes(fn, *args):
    """Element counts of the float32 residuals `fn` keeps for its backward pass."""
    return sorted((int(np.prod(a.shape)) for a, _ in saved_residuals(fn, *args) if a.dtype == jnp.float32),
                  reverse=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_backward_equals_autodiff(dtype):
    x, scale, g = rand(0, 4, 6, 32, dtype=dtype), 1 + 0.3 * rand(1, 32), rand(2, 4, 6, 32)

    def plain(x, scale):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + 1e-6)
        return scale.astype(dtype) * y.astype(dtype)

    loss = lambda f: lambda x, s: jnp.sum(f(x, s).astype(jnp.float32) * g)  # noqa: E731
    ours = lambda x, s: rms_norm(x, s, 1e-6, jnp.dtype(dtype))  # noqa: E731
    close(ours(x, scale), plain(x, scale), 1e-5 if dtype == jnp.float32 else 1e-2)
    close(jax.grad(loss(ours), (0, 1))(x, scale), jax.grad(loss(plain), (0, 1))(x, scale),
          1e-5 if dtype == jnp.float32 else 5e-2)
    if dtype == jnp.float32:   # keeps x, the scale and the [.., 1] norms: one x-sized array, not three
        assert f32_sizes(lambda x, s: jnp.sum(ours(x, s)), x, scale) == [x.size, 32, 4 * 6]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_backward_equals_autodiff(dtype, with_bias):
    """LayerNorm as BERT and GPT-2 use it (float32 statistics, `transformers`' formula), with and without a
    bias: values and the gradients of x, scale and bias equal plain autodiff's under a random cotangent,
    and it keeps x, the scale and two `[..., 1]` statistics (autodiff: three more x-sized arrays)."""
    x = (3 * rand(0, 4, 6, 32) + 1.5).astype(dtype)     # a mean away from 0, so dropping −mean(dn) shows
    scale, bias, g = 1 + 0.3 * rand(1, 32), 0.5 * rand(2, 32) if with_bias else None, rand(3, 4, 6, 32)

    def plain(x, scale, bias):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + 1e-5) * scale
        return (y if bias is None else y + bias).astype(dtype)

    ours = lambda x, s, b: layer_norm(x, s, b, 1e-5, jnp.dtype(dtype))  # noqa: E731
    loss = lambda f: lambda x, s, b: jnp.sum(f(x, s, b).astype(jnp.float32) * g)  # noqa: E731
    argnums = (0, 1, 2) if with_bias else (0, 1)
    close(ours(x, scale, bias), plain(x, scale, bias), 1e-5 if dtype == jnp.float32 else 1e-2)
    close(jax.grad(loss(ours), argnums)(x, scale, bias), jax.grad(loss(plain), argnums)(x, scale, bias),
          1e-5 if dtype == jnp.float32 else 5e-2)
    if dtype == jnp.float32:
        kept = f32_sizes(lambda x, s, b: jnp.sum(ours(x, s, b)), x, scale, bias)
        assert kept == sorted([x.size, 32, 4 * 6, 4 * 6] + ([32] if with_bias else []), reverse=True)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activate_backward_equals_autodiff(act):
    """A plain MLP's activation through `activate`: the same values and input gradient as autodiff of the
    activation itself, keeping only its input (the exact GELU under autodiff keeps four input-sized arrays)."""
    f = ACTIVATIONS[act]
    x, g = 2 * rand(0, 3, 5, 16), rand(1, 3, 5, 16)
    loss = lambda fn: lambda x: jnp.sum(fn(x) * g)  # noqa: E731
    ours = lambda x: activate(f, x)  # noqa: E731
    close(ours(x), f(x))
    close(jax.grad(loss(ours))(x), jax.grad(loss(f))(x))
    assert f32_sizes(lambda x: jnp.sum(ours(x)), x) == [x.size]


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_new"])
def test_gated_backward_equals_autodiff(act):
    f = ACTIVATIONS[act]
    g, u, dh = rand(0, 3, 5, 16), rand(1, 3, 5, 16), rand(2, 3, 5, 16)
    loss = lambda fn: lambda g, u: jnp.sum(fn(g, u) * dh)  # noqa: E731
    ours, plain = (lambda g, u: gated(f, g, u)), (lambda g, u: f(g) * u)
    close(ours(g, u), plain(g, u))
    close(jax.grad(loss(ours), (0, 1))(g, u), jax.grad(loss(plain), (0, 1))(g, u))
    assert f32_sizes(lambda g, u: jnp.sum(ours(g, u)), g, u) == [g.size, u.size]   # only the two inputs


def reference_attention(q, k, v, ok, scale, keep=None, keep_scale_=1.0):
    """Autodiff-able attention in the same `[B, K, T, G, S]` layout, probabilities materialised."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    x = jnp.einsum("BTKGH,BSKH->BKTGS", qg, k) * scale
    if ok is not None:
        x = jnp.where(ok, x, MASKED)
    p = jax.nn.softmax(x, -1)
    if keep is not None:
        p = jnp.where(keep, p * keep_scale_, 0.0)
    return jnp.einsum("BKTGS,BSKV->BTKGV", p, v).reshape(B, T, N, -1)


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_dense_attention_backward_equals_autodiff(rate):
    """Grouped queries (N=6, K=2), value width ≠ key width, causal + padding with a fully padded row (its
    queries see no key: uniform softmax) and, at rate 0.25, attention dropout with the same keep bits."""
    B, T, N, K, H, V = 2, 12, 6, 2, 4, 3
    q, k, v, g = rand(0, B, T, N, H), rand(1, B, T, K, H), rand(2, B, T, K, V), rand(3, B, T, N, V)
    valid = jnp.array([[1] * 9 + [0] * 3, [0] * 12])
    t = jnp.arange(T)
    ok = ((t[None, :] <= t[:, None])[None] & valid[:, None, :].astype(bool))[:, None, :, None, :]
    key = jax.random.key(7) if rate else None
    keep = keep_mask(key, rate, (B, K, T, N // K, T))[0] if rate else None
    ours = lambda q, k, v: _dense_attention(q, k, v, ok, 0.3, rate, key)  # noqa: E731
    plain = lambda q, k, v: reference_attention(q, k, v, ok, 0.3, keep, keep_scale(rate) if rate else 1.0)  # noqa: E731
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * g)  # noqa: E731
    close(ours(q, k, v), plain(q, k, v))
    close(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(plain), (0, 1, 2))(q, k, v))
    # no [B, K, T, G, S] float32 scores or probabilities are kept for the backward (autodiff keeps them)
    assert max(f32_sizes(loss(ours), q, k, v)) < B * N * T * T <= max(f32_sizes(loss(plain), q, k, v))


@pytest.mark.parametrize("case", ["padded", "packed-window", "prefill"])
def test_causal_row_blocks_equal_one_block(case, monkeypatch):
    """The plain path's causal row blocks (`causal_spans`, here 4 blocks of 9 rows at T = 36) compute what one
    `[B, K, T, G, S]` block does, values and gradients: with left padding and an all-padding row (queries that
    see no key: the mean of all S values, not of their block's keys), packed documents under a sliding
    window, and a prefill into a longer cache (q_start 0, S = T + 8: every block stops short of S)."""
    from jaxft.models import attention
    from jaxft.models.attention import Mask, _plain, causal_spans

    monkeypatch.setattr(attention, "CAUSAL_MIN_ROWS", 9)
    B, T, N, K, H, V = 3, 36, 6, 2, 4, 3
    S = T + 8 if case == "prefill" else T
    q, k, v, g = rand(0, B, T, N, H), rand(1, B, S, K, H), rand(2, B, S, K, V), rand(3, B, T, N, V)
    valid = np.ones((B, S), bool)
    valid[0, :5] = False                     # left padding
    valid[1] = False                         # a row of padding only
    seg = np.ones((B, S), np.int32)
    seg[2, 14:], seg[2, 27:] = 2, 3
    mask = {"padded": Mask(kv_valid=jnp.asarray(valid)),
            "packed-window": Mask(q_segments=jnp.asarray(seg[:, :T]), kv_segments=jnp.asarray(seg), window=7),
            "prefill": Mask(kv_valid=jnp.asarray(valid))}[case]
    spans = causal_spans(mask, T, S)
    assert [s[1] - s[0] for s in spans] == [9] * 4 and all(s[2] < S for s in spans[:3])
    ok = mask.dense(T, S)[:, :, :, None, :]
    blocks = lambda q, k, v: _plain(q, k, v, mask, 0.3, 0.0, None)  # noqa: E731
    whole = lambda q, k, v: _dense_attention(q, k, v, ok, 0.3, 0.0, None)  # noqa: E731
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * g)  # noqa: E731
    close(blocks(q, k, v), whole(q, k, v))
    close(jax.grad(loss(blocks), (0, 1, 2))(q, k, v), jax.grad(loss(whole), (0, 1, 2))(q, k, v))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_cross_entropy_sum_equals_autodiff(smoothing):
    logits, labels = 3 * rand(0, 4, 6, 50), jax.random.randint(jax.random.key(1), (4, 6), 0, 50)
    w = jax.random.uniform(jax.random.key(2), (4, 6))
    ours = lambda x: weighted_cross_entropy_sum(x, labels, w, smoothing)  # noqa: E731
    plain = lambda x: jnp.sum(cross_entropy(x, labels, smoothing) * w)  # noqa: E731
    close(ours(logits), plain(logits))
    close(jax.grad(ours)(logits), jax.grad(plain)(logits))
    close(jax.grad(lambda x: 2.5 * ours(x))(logits), 2.5 * jax.grad(plain)(logits))
    assert f32_sizes(ours, logits) == [logits.size]   # the logits' gradient, nothing else


@pytest.mark.parametrize("einsum", ["BTD,VD->BTV", "BTD,DV->BTV"])
@pytest.mark.parametrize("chunk,smoothing", [(7, 0.0), (3, 0.1), (0, 0.0)])
def test_head_cross_entropy_sum_equals_autodiff(einsum, chunk, smoothing):
    """The LM head + CE whose forward also takes the gradient (tied `[V, D]` and untied `[D, V]` heads;
    chunks of 3 positions: 3 of them, the last one padded; 7: one chunk; 0: no chunks) equals autodiff of
    the plain logits' CE, in value and in the gradients of the hidden states and the head, under a
    cotangent other than 1; and its backward keeps only those two gradients."""
    from jaxft.train.losses import head_cross_entropy_sum

    B, T, D, V = 2, 7, 16, 50
    h, targets = rand(0, B, T, D), jax.random.randint(jax.random.key(1), (B, T), 0, V)
    w = rand(2, *((V, D) if einsum.endswith("VD->BTV") else (D, V)))
    weights = jax.random.uniform(jax.random.key(3), (B, T)) * (jnp.arange(T) < 6)
    c = T if chunk == 0 else chunk
    ours = lambda h, w: head_cross_entropy_sum(einsum, c, smoothing, h, w, targets, weights)  # noqa: E731
    plain = lambda h, w: jnp.sum(cross_entropy(jnp.einsum(einsum, h, w), targets, smoothing) * weights)  # noqa: E731
    close(ours(h, w), plain(h, w))
    close(jax.grad(lambda h, w: 2.5 * ours(h, w), (0, 1))(h, w), jax.grad(lambda h, w: 2.5 * plain(h, w), (0, 1))(h, w))
    close(jax.jit(ours)(h, w), plain(h, w))
    assert f32_sizes(ours, h, w) == sorted([h.size, w.size], reverse=True)   # dh and dW, no logits
