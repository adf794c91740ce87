"""Attention: the mask description every family passes, and the one function that picks how to compute it.

Families never build a dense `[B, 1, T, S]` mask. They describe which keys each query may see with a
`Mask` — the query slots, the key validity (padding), packed-document ids, the causal flag and the
sliding window, a few `[B, T]`-sized arrays at most — and call `attention(q, k, v, mask)`, which
chooses one of three implementations of the same function (`model.attention`):

* `plain`: two einsums around a float32 softmax with the mask made dense (`Mask.dense`); grouped query
  heads share their kv head without copies. Scores `[B, K, T, G, S]` are materialised within each pass
  (O(T·S) memory while the layer runs) but not kept from the forward to the backward, which recomputes
  them (`_dense_attention`); on CPU the fastest for short sequences.
* `blockwise`: flash-style attention in pure JAX (`blockwise_attention`): queries in blocks of
  `model.attention_block`, and for each an online softmax over key blocks with float32 accumulators;
  the mask of each (query block, key block) pair is computed from the description on the fly. Each
  query block and each key step run under `jax.checkpoint`, so the backward recomputes a block's scores
  instead of keeping them: O(T·block) memory in both passes.
* `cudnn`: the fused flash kernel of cuDNN through `jax.nn.dot_product_attention(implementation="cudnn")`,
  on GPU in bfloat16/float16 when the description is expressible there: queries and keys the same
  sequence from slot 0, no packed segments, a static window, no attention dropout, and padding (if
  any) on the right, so that it becomes per-row key lengths (`Mask.right_padded`).

`auto` (the default) takes `cudnn` where it applies, else `plain` while `T·S ≤ PLAIN_MAX_SCORES` (at
most 1024 × 1024 scores per head, where `plain` was measured at least as fast as `blockwise` on CPU),
else `blockwise`. A TPU splash kernel would plug in beside `cudnn` here.

Masks are on *slots* (indices in the key sequence), exactly as `transformers` builds them: query `t`
sits at slot `q_start + t`, key `s` at slot `s`, and

    allowed(b, t, s) = [causal ⇒ s ≤ q_start + t] ∧ [window ⇒ s > q_start + t − window]
                       ∧ kv_valid[b, s] ∧ q_segments[b, t] = kv_segments[b, s]

so with left padding a sliding window counts the pad slots too. A query row with no allowed key (a
padding query) gets every score set to the same large negative number, so its softmax is uniform over
the `S` keys: `jax.nn.dot_product_attention`'s rule, which `blockwise` reproduces exactly (finite, and
never a target of the loss).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.models.dropout import keep_mask, keep_scale
from jaxft.models.layers import after_cotangent
from jaxft.parallel import active_mesh, constrain, sequence_parallel_size

Array = jax.Array

IMPLS = ("auto", "plain", "blockwise")
PLAIN_MAX_SCORES = 1024 * 1024   # auto: plain up to this many scores (T·S) per head
CAUSAL_BLOCKS = 4                # plain, causal: at most this many query row blocks (`causal_spans`)
CAUSAL_MIN_ROWS = 32             # … of at least this many rows
NO_WINDOW = 2**30                # a traced window value meaning "no window" (layers of mixed kinds, scanned)
# the masked score of `jax.nn.dot_product_attention` (-0.7 × float32 max), so fully masked rows agree
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query may attend (see the module docstring for the rule), and how to compute it.

    `q_start`: slot of the first query (0 for a full sequence; the cache index when decoding), an int
    or a traced int32; keys are slots `0 … S-1`. `kv_valid [B, S]`: key is a real token.
    `q_segments [B, T]`, `kv_segments [B, S]`: packed-document ids. `window`: sliding window (None,
    an int, or a traced int32 with `NO_WINDOW` for none). `right_padded`: the caller knows `kv_valid`
    is a prefix of every row (`jaxft.data` batches), which lets the cuDNN kernel take it as lengths.
    `impl` (`IMPLS`) and `block` come from `model.attention` and `model.attention_block`.
    """

    q_start: Any = 0
    kv_valid: Array | None = None
    q_segments: Array | None = None
    kv_segments: Array | None = None
    causal: bool = True
    window: Any = None
    right_padded: bool = False
    impl: str = "auto"
    block: int = 512

    def with_window(self, window) -> "Mask":
        return dataclasses.replace(self, window=window)

    def dense(self, T: int, S: int) -> Array | None:
        """The boolean mask broadcastable to `[B, 1, T, S]` (True = may attend); None when all may."""
        q_slots = self.q_start + jnp.arange(T, dtype=jnp.int32)
        ok = allowed(self, q_slots, jnp.arange(S, dtype=jnp.int32), self.kv_valid, self.q_segments,
                     self.kv_segments)
        return None if ok is None else ok[:, None]


def allowed(mask: Mask, q_slots: Array, kv_slots: Array, kv_valid, q_segments, kv_segments) -> Array | None:
    """Booleans broadcastable to `[B, T, S]` for queries at `q_slots [T]` and keys at `kv_slots [S]` (a block
    or all); only the terms the mask has are built (a padding mask alone stays `[B, 1, S]`); None when
    every key is allowed."""
    q, kv = q_slots[None, :, None], kv_slots[None, None, :]
    terms = []
    if mask.causal:
        terms.append(kv <= q)
    if mask.window is not None:
        terms.append(kv > q - mask.window)
    if kv_valid is not None:
        terms.append(kv_valid.astype(bool)[:, None, :])
    if q_segments is not None:
        terms.append(q_segments[:, :, None] == kv_segments[:, None, :])
    if not terms:
        return None
    ok = terms[0]
    for t in terms[1:]:
        ok = ok & t
    return ok


def choose(mask: Mask, T: int, S: int, dtype, dropout_on: bool) -> str:
    """The implementation `attention` uses (see the module docstring)."""
    if mask.impl not in IMPLS:
        raise ValueError(f"unknown model.attention={mask.impl!r}; choose one of {list(IMPLS)}")
    if mask.impl != "auto":
        return mask.impl
    if not dropout_on and jax.default_backend() == "gpu" and _cudnn_expressible(mask, T, S, dtype):
        return "cudnn"
    return "plain" if T * S <= PLAIN_MAX_SCORES else "blockwise"


def _cudnn_expressible(mask: Mask, T: int, S: int, dtype) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and isinstance(mask.q_start, int) and mask.q_start == 0 and T == S
            and mask.q_segments is None and (mask.window is None or isinstance(mask.window, int))
            and (mask.window is None or mask.causal)
            and (mask.kv_valid is None or mask.right_padded))


def attention(q: Array, k: Array, v: Array, mask: Mask, *, scale: float | None = None,
              dropout_rate: float = 0.0, dropout_key: Array | None = None) -> Array:
    """Scaled dot-product attention `q: BTNH`, `k: BSKH`, `v: BSKV` → `BTNV` (K divides N for grouped
    queries; `V` may differ from `H`, as in MLA). Softmax in float32. Every family attends here."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # Under a `sequence` mesh axis each device holds a slice of the queries and needs every key and value
    # of their rows: gather K/V along the length (a no-op otherwise).
    heads = "kv_heads" if k.shape[2] != q.shape[2] else "heads"
    k, v = (constrain(t, ("batch", None, heads, "head_dim")) for t in (k, v))
    drop = dropout_key is not None and dropout_rate > 0.0
    T, S = q.shape[1], k.shape[1]
    impl = choose(mask, T, S, q.dtype, drop)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask, scale, dropout_rate if drop else 0.0, dropout_key)
    if impl == "plain":
        return _plain(q, k, v, mask, scale, dropout_rate if drop else 0.0, dropout_key)
    width = v.shape[-1]
    if width != q.shape[-1]:  # cuDNN wants one head width: pad the values, cut the output
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - width)])
    lengths = None if mask.kv_valid is None else mask.kv_valid.astype(jnp.int32).sum(-1)
    window = None if mask.window is None else (int(mask.window) - 1, 0)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=mask.causal,
                                       key_value_seq_lengths=lengths, local_window_size=window,
                                       implementation="cudnn")
    return out[..., :width]


def causal_spans(mask: Mask, T: int, S: int) -> list[tuple[int, int, int]] | None:
    """Query row blocks `(t0, t1, end)` for the plain path: under a causal mask with a static `q_start`,
    queries `t0 … t1-1` can see no key at or past slot `end = q_start + t1`, so their scores stop there.
    `n = min(CAUSAL_BLOCKS, ⌈T / CAUSAL_MIN_ROWS⌉)` blocks of equal rows (at T = S that computes
    (n+1)/2n of the scores); None when one block would cover every key (decoding, non-causal masks) and
    when a `sequence` mesh axis splits the queries (blocks would cut across its shards)."""
    mesh = active_mesh()
    if mesh is not None and sequence_parallel_size(mesh) > 1:
        return None
    if not (mask.causal and isinstance(mask.q_start, int)):
        return None
    n = min(CAUSAL_BLOCKS, -(-T // CAUSAL_MIN_ROWS))
    rows = -(-T // n)
    spans = [(t0, min(T, t0 + rows), min(S, mask.q_start + min(T, t0 + rows))) for t0 in range(0, T, rows)]
    return None if len(spans) == 1 and spans[0][2] == S else spans


def _plain(q, k, v, mask, scale, rate, key):
    """Scores `[B, K, T, G, S]` for the `G = N / K` query heads of each kv head, softmax in float32 (masked
    scores set to `MASKED`), dropout on the probabilities; see `_dense_attention`.

    Under a causal mask the rows go in blocks (`causal_spans`), each against the keys it can see: fewer
    scores to compute and smaller arrays per pass (at 8 × 256, 9/3 heads: 61 vs 76 ms forward + backward on
    CPU, 4 blocks). Each block draws its dropout bits from `fold_in(key, block)`. A query with no allowed key gets
    the unsplit softmax's answer, the mean of all `S` values (see the module docstring), not that of its
    block's keys."""
    T, S = q.shape[1], k.shape[1]
    rate = rate if key is not None else 0.0
    dense = mask.dense(T, S)
    ok = None if dense is None else dense[:, :, :, None, :]          # [B|1, 1, T|1, 1, S]
    spans = causal_spans(mask, T, S)
    if spans is None:
        return _dense_attention(q, k, v, ok, scale, rate, key)
    out = jnp.concatenate([
        _dense_attention(q[:, t0:t1], k[:, :end], v[:, :end], ok[:, :, t0:t1, :, :end], scale, rate,
                         None if key is None else jax.random.fold_in(key, i))
        for i, (t0, t1, end) in enumerate(spans)], axis=1)
    N, K = q.shape[2], k.shape[2]
    mean_v = jnp.repeat(v.astype(jnp.float32).mean(1), N // K, axis=1).astype(out.dtype)   # [B, N, V]
    no_key = ~dense.any(-1)[:, 0, :, None, None]                                           # [B|1, T, 1, 1]
    return jnp.where(no_key, mean_v[:, None], out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dense_attention(q, k, v, ok, scale, rate, key):
    """Attention with every score of a row in one `[B, K, T, G, S]` array: `q: BTNH`, `k: BSKH`, `v: BSKV`
    → `BTNV`, `ok` broadcastable to the scores (True = may attend) or None.

    Written out, with its own backward, for the CPU: the query heads of one kv head are laid out as extra
    rows (`T·G` rows per `(B, K)`), so grouped queries share K/V without copies and the head transposes
    move only `[B, T, N, H]`-sized arrays, never scores. The forward keeps no probabilities, only each
    row's max `m` and sum `l`; the backward recomputes `P = exp(S − m) / l` from `q·kᵀ` (one more small product,
    one fewer `[B, K, T, G, S]` array held per layer) and, as flash attention does, takes the softmax
    backward's row term from the output: `Σ_s P_s·dP_s = Σ_v dO_v·O_v`. Products whose result contracts
    the rows (`dK = dSᵀ·Q`, `dV = Pᵀ·dO`) transpose the small operand, not the scores.
    """
    return _dense_fwd(q, k, v, ok, scale, rate, key)[0]


def _heads_major(q, k, v):
    B, T, N, H = q.shape
    K = k.shape[2]
    qr = jnp.einsum("BTKGH->BKTGH", q.reshape(B, T, K, N // K, H))
    return qr, jnp.einsum("BSKH->BKSH", k), jnp.einsum("BSKV->BKSV", v)


def _scores(qr, kr, ok, scale):
    x = jnp.einsum("BKTGH,BKSH->BKTGS", qr, kr, preferred_element_type=jnp.float32) * scale
    return x if ok is None else jnp.where(ok, x, MASKED)


def _dense_fwd(q, k, v, ok, scale, rate, key):
    B, T, N, _ = q.shape
    qr, kr, vr = _heads_major(q, k, v)
    x = _scores(qr, kr, ok, scale)
    m = x.max(-1, keepdims=True)
    p = jnp.exp(x - m)
    l = p.sum(-1, keepdims=True)
    keep = None
    if rate > 0.0:
        keep, kept_scale = keep_mask(key, rate, p.shape)
        p = jnp.where(keep, p * kept_scale, 0.0)
    o = (jnp.einsum("BKTGS,BKSV->BKTGV", p.astype(v.dtype), vr, preferred_element_type=jnp.float32) / l
         ).astype(q.dtype)
    out = jnp.einsum("BKTGV->BTKGV", o).reshape(B, T, N, -1)
    return out, (qr, kr, vr, ok, o, m, l, keep, key)


def _dense_bwd(scale, rate, res, g):
    qr, kr, vr, ok, o, m, l, keep, key, g = after_cotangent(res, g)
    B, K, T, G, H = qr.shape
    gr = jnp.einsum("BTKGV->BKTGV", g.reshape(B, T, K, G, -1))
    # softmax probabilities (m and l kept apart: in a row with no allowed key m is MASKED, and m + log(l)
    # would round to m)
    p = jnp.exp(_scores(qr, kr, ok, scale) - m) / l
    dp = jnp.einsum("BKTGV,BKSV->BKTGS", gr, vr, preferred_element_type=jnp.float32)
    if keep is not None:
        p_kept = jnp.where(keep, p * keep_scale(rate), 0.0)
        dp = jnp.where(keep, dp * keep_scale(rate), 0.0)
    else:
        p_kept = p
    row = jnp.sum(gr.astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True)
    ds = p * (dp - row) * scale
    if ok is not None:
        ds = jnp.where(ok, ds, 0.0)
    ds = ds.astype(qr.dtype)
    dq = jnp.einsum("BKTGS,BKSH->BTKGH", ds, kr).reshape(B, T, K * G, H)
    # rows-contracting products: transpose the [.., T·G, H] operand (small), not the scores
    q_t = jax.lax.optimization_barrier(jnp.einsum("BKTGH->BKHTG", qr))
    dk = jnp.einsum("BKHS->BSKH", jnp.einsum("BKHTG,BKTGS->BKHS", q_t, ds))
    g_t = jax.lax.optimization_barrier(jnp.einsum("BKTGV->BKVTG", gr))
    dv = jnp.einsum("BKVS->BSKV", jnp.einsum("BKVTG,BKTGS->BKVS", g_t, p_kept.astype(vr.dtype)))
    return dq, dk.astype(kr.dtype), dv.astype(vr.dtype), None, None


_dense_attention.defvjp(_dense_fwd, _dense_bwd)


def _blocks(x: Array | None, n: int, b: int) -> Array | None:
    """`[B, L, ...]` → `[n, B, b, ...]` (zero-padded to `n·b` along L), None stays None."""
    if x is None:
        return None
    x = jnp.pad(x, [(0, 0), (0, n * b - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, b, *x.shape[2:]), 1, 0)


def blockwise_attention(q: Array, k: Array, v: Array, mask: Mask, scale: float, dropout_rate: float = 0.0,
                        dropout_key: Array | None = None) -> Array:
    """Flash-style attention: `q: BTNH`, `k: BSKH`, `v: BSKV` → `BTNV`, never holding more than one
    `[B, K, G, bq, bk]` block of scores (G = N / K query heads per key head, bq = bk = `mask.block`).

    For each query block, keys are visited block by block with the online softmax (float32):

        m' = max(m, max_s x_s),   l' = l·e^(m−m') + Σ_s e^(x_s−m'),   a' = a·e^(m−m') + Σ_s e^(x_s−m')·v_s

    and the output is `a / l`. Masked scores are `MASKED` (as in the plain path), key slots past `S`
    (block padding) are −∞ and so weigh nothing. Attention dropout multiplies each probability by a keep
    bit of `jaxft.models.dropout.keep_mask` (and 1/keep probability), drawn per (query block, key block)
    from `dropout_key`; `l` sums the undropped ones, as dropout acts after the softmax. Both loops run
    under `jax.checkpoint`, so the backward pass keeps only each key step's running `(m, l, a)` and
    recomputes the scores.
    """
    B, T, N, H = q.shape
    S, K, V = k.shape[1], k.shape[2], v.shape[-1]
    G = N // K
    bq, bk = min(mask.block, T), min(mask.block, S)
    nq, nk = -(-T // bq), -(-S // bk)
    qb = _blocks(q.reshape(B, T, K, G, H), nq, bq)                              # [nq, B, bq, K, G, H]
    q_slots = (mask.q_start + jnp.arange(nq * bq, dtype=jnp.int32)).reshape(nq, bq)
    q_seg = _blocks(mask.q_segments, nq, bq)
    kv_slots = jnp.arange(nk * bk, dtype=jnp.int32).reshape(nk, bk)
    key_xs = (jnp.arange(nk), _blocks(k, nk, bk), _blocks(v, nk, bk), kv_slots,
              _blocks(mask.kv_valid, nk, bk), _blocks(mask.kv_segments, nk, bk))

    def query_block(xs):
        qi, q_blk, q_slot, q_sg = xs

        @jax.checkpoint
        def key_step(carry, kxs):
            m, l, acc = carry
            ki, k_blk, v_blk, kv_slot, kv_ok, kv_sg = kxs
            x = jnp.einsum("BTKGH,BSKH->BKGTS", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            ok = allowed(mask, q_slot, kv_slot, kv_ok, q_sg, kv_sg)
            if ok is not None:
                x = jnp.where(ok[:, None, None], x, MASKED)                   # ok: [B|1, 1, 1, bq|1, bk]
            x = jnp.where(kv_slot < S, x, -jnp.inf)
            m_new = jnp.maximum(m, x.max(-1))
            p = jnp.exp(x - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(-1)
            if dropout_rate > 0.0:
                key = jax.random.fold_in(jax.random.fold_in(dropout_key, qi), ki)
                keep, keep_scale = keep_mask(key, dropout_rate, p.shape)
                p = jnp.where(keep, p * keep_scale, 0.0)
            pv = jnp.einsum("BKGTS,BSKV->BTKGV", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
            acc = acc * jnp.moveaxis(correction, -1, 1)[..., None] + pv
            return (m_new, l, acc), None

        init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, bq, K, G, V), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_step, init, key_xs)
        return (acc / jnp.moveaxis(l, -1, 1)[..., None]).astype(q.dtype)        # [B, bq, K, G, V]

    out = jax.lax.map(jax.checkpoint(query_block), (jnp.arange(nq), qb, q_slots, q_seg))
    out = jnp.moveaxis(out, 0, 1).reshape(B, nq * bq, N, V)
    return out[:, :T]
