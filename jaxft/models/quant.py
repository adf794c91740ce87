"""A frozen base stored quantised (QLoRA, `model.quantize`), dequantised on the fly inside the step.

Two formats, both for `Dense` kernels (every linear layer of the model but the output head):

* `int8`: per output channel, symmetric. `s = max|W| over the kernel's input dims / 127`,
  `q = round(W / s)` in int8; `W ≈ q·s`, error ≤ s/2 per entry (1 byte per parameter + the scales).
* `nf4`: 4-bit NormalFloat (Dettmers et al. 2023), blocks of 64 consecutive entries along the kernel's
  last axis (fewer when that axis is shorter or not a multiple of 64), each block scaled by its absmax:
  `W ≈ NF4[c]·absmax`, error ≤ absmax · (largest gap between adjacent NF4 values) / 2 = 0.152·absmax.
  Two codes are packed per byte (0.5 bytes per parameter + a float32 absmax per block).

The quantised arrays are `QuantParam`s: `nnx.Param`s the trainer never selects (frozen, no gradient, no
optimizer state), placed with the kernel's own logical axes. `Dense` calls `dequantize` inside the jitted
step; a `Dense` does it in a region whose backward pass dequantises again rather than keep its float
kernel from the forward (`recompute_dequantized`). The routed experts' dispatch (`jaxft.models.moe`)
reads its dequantised kernels under plain autodiff. Quantisation
happens while loading, one parameter at a time (`jaxft.hf.load.load_model(quantize=...)`).
"""

from __future__ import annotations

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
FORMATS = ("int8", "nf4")

# The NF4 code book as published with QLoRA (bitsandbytes' `create_normal_map`): quantiles of N(0, 1) for
# 8 positive and 7 negative levels plus an exact zero, scaled to [-1, 1].
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_MAX_GAP = float(np.max(np.diff(NF4)))


def recompute_dequantized(fn):
    """`fn(quant, x)`, one product with a dequantised kernel, rematerialised with nothing saved: its
    backward pass keeps only the inputs (the codes, scales and `x`) and dequantises again, instead of
    keeping the float kernel from the forward. Without it the dequantised kernel was a residual of the
    forward (its matmul's backward reads it for `dx = g·Wᵀ`; seen with `saved_residuals`), so a backend
    that materialises it would hold a float copy of the whole quantised base at the step's peak, which
    QLoRA exists to avoid. (XLA on CPU fuses the dequantisation into each matmul either way: an 8-layer
    SmolLM2-shaped QLoRA step compiled to the same memory and ran as fast with and without this.)"""
    return nnx.remat(fn, policy=jax.checkpoint_policies.nothing_saveable, graph_updates=False)


def nf4_from_quantiles(offset: float = 0.9677083) -> np.ndarray:
    """The NF4 levels derived as the paper does (to check the table above against its construction)."""
    inv = NormalDist().inv_cdf
    pos = [inv(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-inv(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    v = np.array(sorted(pos + [0.0] + neg))
    return (v / np.abs(v).max()).astype(np.float32)


class QuantParam(nnx.Param):
    """Quantised storage of a frozen base weight (codes or scales); never trainable."""


def nf4_block(last: int, block: int = 64) -> int:
    """Block length along an axis of length `last`: 64, or the largest divisor of `last` below it."""
    return max(b for b in range(1, min(block, last) + 1) if last % b == 0)


class QuantKernel(nnx.Module):
    """A quantised `Dense` kernel of shape `shape` (logical axes `axes`, a scanned stack's `layers` axis
    first). `input_dims` are the kernel dimensions that contract with the input, counted from the end
    (negative), so they hold for a stacked kernel and for its per-layer slice inside a scan alike."""

    def __init__(self, w: Array, kind: str, axes, input_dims: tuple[int, ...]):
        if kind not in FORMATS:
            raise ValueError(f"unsupported model.quantize={kind!r}; choose one of {FORMATS}")
        self.kind, self.shape, self.axes, self.param_dtype = kind, tuple(w.shape), tuple(axes), w.dtype
        self.input_dims = tuple(sorted(d - w.ndim if d >= 0 else d for d in input_dims))
        w = w.astype(jnp.float32)
        if kind == "int8":
            s = jnp.max(jnp.abs(w), axis=self.input_dims, keepdims=True) / 127.0
            s = jnp.where(s == 0, 1.0, s)
            self.codes = QuantParam(jnp.clip(jnp.round(w / s), -127, 127).astype(jnp.int8), logical_axes=self.axes)
            keep = [d for d in range(-w.ndim, 0) if d not in self.input_dims]
            self.scale = QuantParam(jnp.squeeze(s, self.input_dims), logical_axes=tuple(self.axes[d] for d in keep))
            return
        last = w.shape[-1]
        if last % 2:
            raise ValueError(f"nf4 needs an even last dimension, got a kernel of shape {w.shape}")
        self.block = nf4_block(last)
        blocks = w.reshape(w.shape[:-1] + (last // self.block, self.block))
        absmax = jnp.max(jnp.abs(blocks), axis=-1)
        absmax = jnp.where(absmax == 0, 1.0, absmax)
        idx = jnp.argmin(jnp.abs(blocks[..., None] / absmax[..., None, None] - jnp.asarray(NF4)), axis=-1)
        idx = idx.reshape(w.shape).astype(jnp.uint8)
        self.codes = QuantParam((idx[..., 0::2] << 4) | idx[..., 1::2], logical_axes=self.axes)
        self.scale = QuantParam(absmax, logical_axes=self.axes[:-1] + (None,))

    def dequantize(self, dtype=jnp.float32) -> Array:
        """The float kernel (of this layer, inside a scan), in `dtype`."""
        codes, scale = self.codes[...], self.scale[...]
        if self.kind == "int8":
            return (codes.astype(jnp.float32) * jnp.expand_dims(scale, self.input_dims)).astype(dtype)
        idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(codes.shape[:-1] + (codes.shape[-1] * 2,))
        w = jnp.asarray(NF4)[idx.astype(jnp.int32)]
        w = w.reshape(w.shape[:-1] + (w.shape[-1] // self.block, self.block)) * scale[..., None]
        return w.reshape(w.shape[:-2] + (-1,)).astype(dtype)

    def error_bound(self) -> Array:
        """The largest error any entry may have, per scale entry (int8: s/2; nf4: absmax · max gap / 2)."""
        return self.scale[...] * (0.5 if self.kind == "int8" else NF4_MAX_GAP / 2)
