"""Inverted dropout, the one implementation every layer, attention and LoRA adapter uses."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

_KEEP_LEVELS = 1 << 16  # dropout decides keep/drop with 16 random bits per entry


def keep_mask(key: Array, rate: float, shape: Sequence[int]) -> tuple[Array, float]:
    """`(keep, scale)` for inverted dropout: a boolean `keep` mask of `shape`, each entry kept with
    probability `q = round((1 − rate)·2¹⁶) / 2¹⁶`, and `scale = 1/q`, so that `E[keep·x·scale] = x` exactly.

    Why 16 bits: `jax.random.bernoulli` draws a 32-bit word per entry and turns it into a float; on CPU
    that threefry work was ~5% of a BERT training step. Here one 32-bit word gives two entries (cut
    along the last axis, so leading axes keep their sharding), about 3× less work. The rate is thereby
    rounded to a multiple of 2⁻¹⁶ (0.1 → 0.100006); the scale uses the rounded value, so no bias.
    """
    threshold = _threshold(rate)
    *lead, last = shape
    words = jax.random.bits(key, (*lead, -(-last // 2)), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :last]
    return halves.astype(jnp.uint32) < threshold, keep_scale(rate)


def _threshold(rate: float) -> int:
    threshold = round((1.0 - rate) * _KEEP_LEVELS)
    if not 0 < threshold <= _KEEP_LEVELS:
        raise ValueError(f"dropout rate {rate} rounds to 0 or 1 at 16-bit resolution; use 0 to switch it off")
    return threshold


def keep_scale(rate: float) -> float:
    """The `scale` of `keep_mask` for this rate: 1 / (the rounded keep probability)."""
    return _KEEP_LEVELS / _threshold(rate)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout (see `keep_mask`); the identity when `key` is None (evaluation) or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep, scale = keep_mask(key, rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))
