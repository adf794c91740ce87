"""Multi-head Latent Attention (MLA) of DeepSeek-V2/V3, with a KV cache of the compressed latent.

Letters: N heads, Q = q_lora_rank, R = kv_lora_rank, P = qk_nope_head_dim, O = qk_rope_head_dim (the
rotary part), V = v_head_dim, H = P + O.

    q       = q_proj(x)  or  q_b_proj(RMSNorm(q_a_proj(x)))          'BTD,DNH->BTNH' (via 'BTQ,QNH->BTNH')
    q_nope, q_rot = q[..., :P], rope(q[..., P:])
    c, k_rot = kv_a_proj_with_mqa(x) split [R, O]                     'BTD,DC->BTC', C = R + O
    c = RMSNorm(c);  k_rot = rope(k_rot)                              (one rotary key shared by all heads)
    k_nope, v = kv_b_proj(c) split [P, V]                             'BTR,RNW->BTNW', W = P + V
    out = softmax(scale · [q_nope, q_rot]·[k_nope, k_rot]ᵀ + mask) · v   then o_proj 'BTNV,NVD->BTD'

    scale = H^-½ · mscale², mscale = yarn_get_mscale(factor, mscale_all_dim) when RoPE is scaled (`rope.mla_softmax_mscale`)

The two latent norms use eps 1e-6 whatever `rms_norm_eps` says, as `transformers` builds them. RoPE
pairs channels `(2i, 2i+1)` (DeepSeek-V2 always, V3 when `rope_interleave`) or `(i, i+O/2)`.

Without a cache (training, evaluation) the latent is expanded into per-head keys and values as above.
With a cache (`jaxft.generate`), only the latent is stored — `c [B, S, 1, R]` as the cache's keys and
`k_rot [B, S, 1, O]` as its values, R + O numbers per token instead of N·(H + V) — and attention runs
in the latent space with `kv_b_proj` absorbed into the query and the output (W_k, W_v = its P and V parts):

    q_lat = q_nope · W_kᵀ                                             'BTNP,RNP->BTNR'
    out_lat = softmax(scale · [q_lat, q_rot]·[c, k_rot]ᵀ + mask) · c   (one shared key/value head)
    out = out_lat · W_v                                               'BTNR,RNV->BTNV'

which is the same function: q_nope·k_nope = q_nope·(c W_k) = (q_nope W_kᵀ)·c and Σ p·(c W_v) = (Σ p·c) W_v.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import causal, rope as rope_lib
from jaxft.models.attention import attention
from jaxft.models.layers import Dense, Keys, RMSNorm

Array = jax.Array
LATENT_EPS = 1e-6


def _attend(q: Array, k: Array, v: Array, mask, scale: float, rate: float, key) -> Array:
    """`attention` with values narrower than the queries/keys (`attention` handles the widths)."""
    return attention(q, k, v, mask, scale=scale, dropout_rate=rate, dropout_key=key)


class MLA(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        kw = dict(std=cfg.initializer_range, dtype=jnp.dtype(cfg.options.dtype), param_dtype=jnp.dtype(cfg.options.param_dtype),
                  rngs=rngs)
        D, N, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        P, O, V = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = Dense("BTD,DNH->BTNH", (D, N, P + O), ("embed", "heads", "head_dim"),
                                use_bias=False, **kw)
        else:
            Q = cfg.q_lora_rank
            self.q_a_proj = Dense("BTD,DQ->BTQ", (D, Q), ("embed", "q_lora"), use_bias=bias, **kw)
            self.q_a_layernorm = RMSNorm(Q, LATENT_EPS, axes=("q_lora",), dtype=kw["dtype"],
                                         param_dtype=kw["param_dtype"], rngs=rngs)
            self.q_b_proj = Dense("BTQ,QNH->BTNH", (Q, N, P + O), ("q_lora", "heads", "head_dim"),
                                  use_bias=False, **kw)
        self.kv_a_proj_with_mqa = Dense("BTD,DC->BTC", (D, R + O), ("embed", None), use_bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(R, LATENT_EPS, axes=("kv_lora",), dtype=kw["dtype"],
                                      param_dtype=kw["param_dtype"], rngs=rngs)
        self.kv_b_proj = Dense("BTR,RNW->BTNW", (R, N, P + V), ("kv_lora", "heads", "head_dim"), use_bias=False,
                               **kw)
        self.o_proj = Dense("BTNV,NVD->BTD", (N, V, D), ("heads", "head_dim", "embed"), use_bias=bias, **kw)
        self.lora = cfg.q_lora_rank is not None
        self.R, self.P = R, P
        self.scale, self.interleave, self.rate = cfg.softmax_scale, cfg.rope_interleave, cfg.attention_dropout

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, keys: Keys, kv=None, index=None):
        """`x [B, T, D]` → `(out [B, T, D], (c [B, T|S, 1, R], k_rot [B, T|S, 1, O]))`.

        With `kv = (c_cache, k_rot_cache)` the new latents are written at slot `index` and attention runs
        over the whole cache (the absorbed form); the updated buffers are returned.
        """
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.lora else self.q_proj(x)
        q_nope = q[..., :self.P]
        q_rot = rope_lib.apply(q[..., self.P:], cos, sin, self.interleave)
        ckv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(ckv[..., :self.R])[:, :, None]                               # [B, T, 1, R]
        k_rot = rope_lib.apply(ckv[:, :, None, self.R:], cos, sin, self.interleave)          # [B, T, 1, O]
        if kv is None:
            kv_b = self.kv_b_proj(c[:, :, 0])                                               # [B, T, N, P+V]
            k = jnp.concatenate([kv_b[..., :self.P], jnp.broadcast_to(
                k_rot, k_rot.shape[:2] + (kv_b.shape[2], k_rot.shape[-1]))], axis=-1)
            out = _attend(jnp.concatenate([q_nope, q_rot], -1), k, kv_b[..., self.P:], mask, self.scale,
                          self.rate, keys())
            return self.o_proj(out), (c, k_rot)
        c, k_rot = causal.write(kv[0], c, index), causal.write(kv[1], k_rot, index)         # [B, S, 1, ·]
        w = self.kv_b_proj.effective_kernel().astype(q.dtype)                                      # [R, N, P+V]
        q_lat = jnp.einsum("BTNP,RNP->BTNR", q_nope, w[..., :self.P])
        out_lat = _attend(jnp.concatenate([q_lat, q_rot], -1), jnp.concatenate([c, k_rot], -1), c, mask,
                          self.scale, self.rate, keys())
        out = jnp.einsum("BTNR,RNV->BTNV", out_lat, w[..., self.P:])
        return self.o_proj(out), (c, k_rot)
