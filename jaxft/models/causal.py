"""What every causal-LM family shares: positions, attention masks, the KV cache, and the `CausalLM` base
that owns the output head, the logits, the cache and decoding.

A causal LM is called in one of two ways, both through the same layer code:

* **full sequence** (training, evaluation): `model(input_ids, attention_mask, segment_ids=, positions=)`.
  Query `t` may attend key `s` iff `s ≤ t`, key `s` is not padding, both belong to the same packed
  document (`segment_ids`), and, in sliding-window layers, `s > t − window`.
* **cached decoding** (`jaxft.generate`): `model.decode(ids, positions, valid, cache)` appends `T` new
  tokens to fixed-size key/value buffers `[B, S, K, H]` at slot `cache.index` and attends over all `S`
  slots; slots not yet written, and padding slots, are masked by `cache.valid`. Buffers never change
  shape, so one compiled decode step serves every token.

Both describe their attention mask with one `jaxft.models.attention.Mask` (no dense `[B, 1, T, S]` array):
masks are on *slots* (indices in the key sequence), exactly as `transformers` builds them: with left
padding, a sliding window counts the pad slots too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.attention import NO_WINDOW, Mask
from jaxft.models.layers import Dense, Embed, Keys
from jaxft.models.options import RunOptions
from jaxft.parallel import constrain

Array = jax.Array


def positions_from_segments(segment_ids: Array) -> Array:
    """Positions that restart at 0 at each document of a packed row: `[[1,1,1,2,2]] → [[0,1,2,0,1]]`.

    A document starts wherever the segment id differs from the previous token's.
    """
    t = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    new_doc = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], dtype=bool),
                               segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    start = jax.lax.cummax(jnp.where(new_doc, t, 0), axis=segment_ids.ndim - 1)
    return t - start


def default_positions(input_ids: Array, segment_ids: Array | None) -> Array:
    """`[B, T]` positions when the caller gives none: per document for packed rows, else `0 … T-1`.

    As in `transformers`' forward, padding does not shift positions (right padding changes nothing;
    `jaxft.generate` derives positions from the mask for left-padded prompts, like HF `generate`).
    """
    if segment_ids is not None:
        return positions_from_segments(segment_ids)
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def sequence_mask(attention_mask: Array | None, segment_ids: Array | None, options: RunOptions,
                  right_padded: bool = False) -> Mask:
    """The causal `Mask` of a full-sequence call: keys must be real (`attention_mask`) and in the query's
    packed document (`segment_ids`); each block adds its own window (`layer_masks`)."""
    return Mask(kv_valid=None if attention_mask is None else attention_mask.astype(bool),
                q_segments=segment_ids, kv_segments=segment_ids, causal=True, right_padded=right_padded,
                impl=options.attention, block=options.attention_block)


def layer_masks(mask: Mask, windows, layers) -> tuple:
    """Each block's mask for `jaxft.models.layers.run_layers`: `(select, xs)` where `xs[i]` is block `i`'s
    per-layer input dict and `select(xs[i])` its mask, `mask` with block `i`'s window (`windows[i]`).
    When blocks differ (Qwen2's sliding layers) `xs[i]` carries the index of its window, which a scan
    (`layers` stacked, not an `nnx.List`) sees as a traced value, so the window becomes a traced int32
    (`attention.NO_WINDOW` for none); otherwise there is nothing per layer to carry.
    """
    distinct = list(dict.fromkeys(windows))
    if len(distinct) == 1:
        return (lambda _: mask.with_window(distinct[0])), [{} for _ in windows]
    xs = [{"window": distinct.index(w)} for w in windows]
    if isinstance(layers, nnx.List):
        return (lambda x_i: mask.with_window(distinct[x_i["window"]])), xs
    table = jnp.asarray([NO_WINDOW if w is None else w for w in distinct], jnp.int32)
    return (lambda x_i: mask.with_window(table[x_i["window"]])), xs


class KVCache(NamedTuple):
    """Per-layer key/value buffers `[B, S, K, H]`, which slots hold real tokens, and the next free slot."""

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    valid: Array   # [B, S] bool
    index: Array   # int32 scalar


def empty_cache(batch: int, length: int, kv_shapes, dtype) -> KVCache:
    """Zeroed buffers; `kv_shapes` lists `((K, Hk), (K, Hv))` per layer."""
    keys = tuple(jnp.zeros((batch, length) + tuple(k), dtype) for k, _ in kv_shapes)
    values = tuple(jnp.zeros((batch, length) + tuple(v), dtype) for _, v in kv_shapes)
    return KVCache(keys, values, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def cache_mask(cache: KVCache, valid: Array, options: RunOptions) -> tuple[Mask, KVCache]:
    """Mark the `T` new tokens' slots (`valid [B, T]`) and describe their mask: queries at slots
    `cache.index …`, keys at every slot of the buffers, written and not padding."""
    kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid.astype(bool), (0, cache.index))
    mask = Mask(q_start=cache.index, kv_valid=kv_valid, causal=True, impl=options.attention,
                block=options.attention_block)
    return mask, cache._replace(valid=kv_valid)


def write(buffer: Array, new: Array, index: Array) -> Array:
    """Store `new [B, T, ...]` into `buffer [B, S, ...]` at slots `index … index+T-1`."""
    start = (0, index) + (0,) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


def finish_cache(cache: KVCache, keys, values, steps: int) -> KVCache:
    """The cache after a call that wrote `steps` tokens into the (already updated) buffers `keys`, `values`."""
    return cache._replace(keys=tuple(keys), values=tuple(values), index=cache.index + steps)


class CausalLM(nnx.Module):
    """The base of every causal-LM family (`*ForCausalLM`): head, logits, KV cache and decoding.

    A family builds its backbone and calls `init_head`; it then provides

    * `backbone(input_ids, positions, mask, token_mask, keys, cache) -> (h [B, T, D], (keys, values), stats)`:
      `mask` is the `attention.Mask` of the call (each block sets its window), `token_mask`
      the `[B, T]` real-token mask (for router statistics), `cache` a `KVCache` or None; it returns the
      final hidden states, the per-layer buffers it wrote (empty lists without a cache) and the MoE
      `RouterStats` (None for dense models);
    * `input_embedding()`: the token `Embed` (the output matrix when embeddings are tied);
    * `kv_shapes()`: per layer `((K, Hk), (K, Hv))`, the trailing shapes of its cache buffers.

    Logits are float32 `[B, T, V]` pinned to vocabulary sharding; `hidden` and `logits` are exposed apart so
    a loss can compute the head chunk by chunk.
    """

    task = "causal-lm"
    max_positions: int | None = None   # the longest cache a family with learned positions can serve,
    positions_field = "max_position_embeddings"  # and the config field that sets it

    def init_head(self, hidden: int, vocab: int, tied: bool, std: float, options: RunOptions,
                  rngs: nnx.Rngs) -> None:
        self.tied = tied
        if not tied:
            self.lm_head = Dense("BTD,DV->BTV", (hidden, vocab), ("embed", "vocab"), use_bias=False, std=std,
                                 rngs=rngs, **options.kw())

    def input_embedding(self) -> Embed:
        raise NotImplementedError

    def kv_shapes(self) -> list:
        raise NotImplementedError

    def backbone(self, input_ids, positions, mask: Mask, token_mask, keys: Keys, cache: KVCache | None):
        raise NotImplementedError

    def logits(self, h: Array) -> Array:
        """`h [B, T, D]` → float32 logits `[B, T, V]` (tied: against the input embedding)."""
        logits = self.input_embedding().attend(h) if self.tied else self.lm_head(h)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def head_matrix(self) -> tuple[str, Array] | None:
        """The LM head as one product, `(einsum, W)` with `logits = einsum(h, W)`, when it is nothing more: tied
        (the input embedding) or an untied head without bias or LoRA adapter. None otherwise; the loss then
        calls `logits` (`jaxft.train.losses.chunked_cross_entropy`)."""
        if self.tied:
            return "BTD,VD->BTV", self.input_embedding().embedding[...]
        head = self.lm_head
        return (head.einsum, head.weight()) if head.bias is None and head.lora is None else None

    def hidden(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None,
               dropout_rng=None, right_padded: bool = False) -> tuple[Array, Any]:
        """`(h [B, T, D], router stats or None)` of a full-sequence call; see `__call__`. `right_padded`:
        the caller knows every row's padding is at its end (lets a GPU use the cuDNN kernel)."""
        if positions is None:
            positions = default_positions(input_ids, segment_ids)
        mask = sequence_mask(attention_mask, segment_ids, self.config.options, right_padded)
        token_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask
        h, _, stats = self.backbone(input_ids, positions, mask, token_mask, Keys(dropout_rng), None)
        return h, stats

    def forward_with_router_stats(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None,
                                  dropout_rng=None) -> tuple:
        """`(logits [B, T, V], RouterStats or None)`; statistics count the tokens `attention_mask` marks real."""
        h, stats = self.hidden(input_ids, attention_mask, segment_ids=segment_ids, positions=positions,
                               dropout_rng=dropout_rng)
        return self.logits(h), stats

    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None, dropout_rng=None):
        """`logits [B, T, V]` (float32) of the next token at every position. `attention_mask [B, T]`: 1 =
        token, 0 = padding; `segment_ids [B, T]`: packed document ids (no attention across documents;
        positions restart per document unless `positions` is given)."""
        return self.forward_with_router_stats(input_ids, attention_mask, segment_ids=segment_ids,
                                              positions=positions, dropout_rng=dropout_rng)[0]

    def init_cache(self, batch: int, length: int) -> KVCache:
        if self.max_positions is not None and length > self.max_positions:
            raise ValueError(f"prompt + new tokens = {length} exceeds the model's "
                             f"{self.positions_field}={self.max_positions}")
        return empty_cache(batch, length, self.kv_shapes(), jnp.dtype(self.config.options.dtype))

    def decode(self, input_ids, positions, valid, cache: KVCache):
        """Append `input_ids [B, T]` (at `positions`, `valid` = not padding) to `cache`; logits for them."""
        mask, cache = cache_mask(cache, valid, self.config.options)
        h, (k, v), _ = self.backbone(input_ids, positions, mask, valid, Keys(None), cache)
        return self.logits(h), finish_cache(cache, k, v, input_ids.shape[1])
