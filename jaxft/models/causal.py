"""What every causal-LM family shares: positions, attention masks, and the KV cache.

A causal LM is called in one of two ways, both through the same layer code:

* **full sequence** (training, evaluation): `model(input_ids, attention_mask, segment_ids=, positions=)`.
  Query `t` may attend key `s` iff `s ≤ t`, key `s` is not padding, both belong to the same packed
  document (`segment_ids`), and, in sliding-window layers, `s > t − window`.
* **cached decoding** (`jaxft.generate`): `model.decode(ids, positions, valid, cache)` appends `T` new
  tokens to fixed-size key/value buffers `[B, S, K, H]` at slot `cache.index` and attends over all `S`
  slots; slots not yet written, and padding slots, are masked by `cache.valid`. Buffers never change
  shape, so one compiled decode step serves every token.

Masks are built on *slots* (indices in the key sequence), exactly as `transformers` builds them: with left
padding, a sliding window counts the pad slots too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

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


def slot_mask(q_slots: Array, kv_slots: Array, kv_valid: Array | None = None,
              q_segments: Array | None = None, kv_segments: Array | None = None,
              window: int | None = None) -> Array:
    """Boolean `[B, 1, T, S]` mask (True = may attend) for queries at `q_slots [T]` and keys at `kv_slots [S]`.

    `kv_valid [B, S]`: key is a real token; `q_segments [B, T]`, `kv_segments [B, S]`: packed document ids.
    """
    q, kv = q_slots[:, None], kv_slots[None, :]
    mask = kv <= q
    if window is not None:
        mask &= kv > q - window
    mask = mask[None, None]
    if kv_valid is not None:
        mask = mask & kv_valid.astype(bool)[:, None, None, :]
    if q_segments is not None:
        mask = mask & (q_segments[:, None, :, None] == kv_segments[:, None, None, :])
    return mask


def sequence_masks(input_ids: Array, attention_mask: Array | None, segment_ids: Array | None,
                   windows) -> dict:
    """`{window: mask}` for a full-sequence call; `windows` holds `None` (full attention) and window sizes."""
    slots = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
    return {w: slot_mask(slots, slots, attention_mask, segment_ids, segment_ids, w) for w in windows}


def layer_masks(masks: dict, windows, layers) -> tuple:
    """Each block's mask for `jaxft.models.layers.run_layers`: `(select, xs)` where `xs[i]` is block `i`'s
    per-layer input dict and `select(xs[i])` its mask from `masks` (`{window: mask}`, `windows[i]` = block
    `i`'s window). When blocks differ (Qwen2's sliding layers) `xs[i]` carries the index of its window,
    which a scan (`layers` stacked, not an `nnx.List`) sees as a traced value, so the distinct masks are
    stacked once and indexed; otherwise there is nothing per layer to carry.
    """
    distinct = list(dict.fromkeys(windows))
    if len(distinct) == 1:
        return (lambda _: masks[distinct[0]]), [{} for _ in windows]
    xs = [{"window": distinct.index(w)} for w in windows]
    if isinstance(layers, nnx.List):
        return (lambda x_i: masks[distinct[x_i["window"]]]), xs
    stacked = jnp.stack([masks[w] for w in distinct])
    return (lambda x_i: stacked[x_i["window"]]), xs


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


def cache_masks(cache: KVCache, valid: Array, windows) -> tuple[dict, KVCache]:
    """Mark the `T` new tokens' slots (`valid [B, T]`) and build `{window: mask}` for them."""
    T, S = valid.shape[1], cache.valid.shape[1]
    kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid.astype(bool), (0, cache.index))
    q_slots = cache.index + jnp.arange(T, dtype=jnp.int32)
    kv_slots = jnp.arange(S, dtype=jnp.int32)
    masks = {w: slot_mask(q_slots, kv_slots, kv_valid, window=w) for w in windows}
    return masks, cache._replace(valid=kv_valid)


def write(buffer: Array, new: Array, index: Array) -> Array:
    """Store `new [B, T, ...]` into `buffer [B, S, ...]` at slots `index … index+T-1`."""
    start = (0, index) + (0,) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


def finish_cache(cache: KVCache, keys, values, steps: int) -> KVCache:
    """The cache after a call that wrote `steps` tokens into the (already updated) buffers `keys`, `values`."""
    return cache._replace(keys=tuple(keys), values=tuple(values), index=cache.index + steps)
