"""Rotary position embeddings (RoPE) with the scalings `transformers` defines.

A position `p` rotates each pair of query/key channels `(x_i, x_{i+h})` (half-rotation layout, Llama) or
`(x_{2i}, x_{2i+1})` (interleaved layout, DeepSeek) by the angle `p · inv_freq[i]`, where

    inv_freq[i] = θ^(-2i/d),   i = 0 … d/2-1,   d = rotary width (head_dim × partial_rotary_factor)

Scalings change `inv_freq` (and sometimes multiply cos/sin by an "attention factor"), exactly as
`transformers.modeling_rope_utils` does, computed in float32 like PyTorch:

    default   θ^(-2i/d)
    linear    inv_freq / factor
    dynamic   NTK: θ' = θ · (factor·L/L_max − (factor−1))^(d/(d−2)) when the longest position L of the
              call exceeds max_position_embeddings; otherwise default (so training lengths ≤ L_max are exact)
    llama3    long wavelengths / factor, short ones kept, a smooth ramp between
    yarn      per-frequency blend of interpolation and extrapolation, cos/sin × attention_factor (mscale)
    longrope  inv_freq / short_factor[i], or / long_factor[i] once L exceeds the original length;
              cos/sin × attention_factor

Read the settings with `rope_from_hf` from a `transformers` config: `AutoConfig` normalises both the Hub
spelling (`rope_scaling` + `rope_theta`) and the 5.x spelling (`rope_parameters`) into
`config.rope_parameters`. Any module (Llama-style attention, DeepSeek MLA) then calls
`cos_sin(rope, positions)` once per forward pass and `apply(x, cos, sin)` on its queries and keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class Rope:
    """Everything that determines the rotary angles; hashable, so it can live in a frozen model config."""

    rope_type: str = "default"
    theta: float = 10000.0
    dim: int = 64                                   # rotary width d (even)
    max_position_embeddings: int = 2048
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0                    # llama3
    high_freq_factor: float = 4.0                   # llama3
    beta_fast: float = 32.0                         # yarn
    beta_slow: float = 1.0                          # yarn
    truncate: bool = True                           # yarn
    attention_factor: float = 1.0                   # yarn / longrope: cos and sin are multiplied by it
    short_factor: tuple[float, ...] | None = None   # longrope
    long_factor: tuple[float, ...] | None = None    # longrope


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature `0.1·mscale·ln(scale) + 1` (1 for scale ≤ 1); DeepSeek reuses it."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_from_hf(hf, head_dim: int, field: str = "rope_parameters") -> Rope:
    """Read RoPE settings from a `transformers` config whose rotary width derives from `head_dim`.

    Raises naming the field for rope types jaxft does not implement and for per-layer-type settings.
    """
    params = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str):
        raise ValueError(f"unsupported {field}: per-layer-type RoPE settings {sorted(params)} are not "
                         f"supported by jaxft")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported {field}.rope_type={rope_type!r}; jaxft supports {list(ROPE_TYPES)}")
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    max_pos = int(hf.max_position_embeddings)
    orig = params.get("original_max_position_embeddings")
    kw: dict = dict(rope_type=rope_type, theta=theta, dim=dim, max_position_embeddings=max_pos,
                    original_max_position_embeddings=None if orig is None else int(orig))
    factor = params.get("factor")
    if rope_type in ("linear", "dynamic", "llama3"):
        kw["factor"] = float(_required(params, "factor", field, rope_type))
    if rope_type == "llama3":
        kw["low_freq_factor"] = float(_required(params, "low_freq_factor", field, rope_type))
        kw["high_freq_factor"] = float(_required(params, "high_freq_factor", field, rope_type))
        _required(params, "original_max_position_embeddings", field, rope_type)
    if rope_type == "yarn":
        orig = int(_required(params, "original_max_position_embeddings", field, rope_type))
        # DeepSeek-V3-style configs may leave `factor` out: it is then the context extension ratio.
        factor = float(max_pos / orig if factor is None else factor)
        attn = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attn is None:
            attn = (yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
                    if mscale and mscale_all else yarn_get_mscale(factor))
        kw.update(factor=factor, attention_factor=float(attn),
                  beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                  truncate=bool(params.get("truncate", True)))
    if rope_type == "longrope":
        orig = int(_required(params, "original_max_position_embeddings", field, rope_type))
        factor = float(max_pos / orig if factor is None else factor)
        attn = params.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        short = tuple(float(x) for x in _required(params, "short_factor", field, rope_type))
        long = tuple(float(x) for x in _required(params, "long_factor", field, rope_type))
        for name, f in (("short_factor", short), ("long_factor", long)):
            if len(f) != dim // 2:
                raise ValueError(f"{field}.{name} has {len(f)} entries; the rotary width {dim} needs {dim // 2}")
        kw.update(factor=factor, attention_factor=float(attn), short_factor=short, long_factor=long)
    return Rope(**kw)


def _required(params: dict, key: str, field: str, rope_type: str):
    if params.get(key) is None:
        raise ValueError(f"{field}.{key} is required for rope_type={rope_type!r}")
    return params[key]


def _exponents(dim: int) -> np.ndarray:
    """`2i/d` in float32, as `torch.arange(0, d, 2).float() / d`."""
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)


def _default(theta: float, dim: int) -> np.ndarray:
    return (np.float32(1.0) / np.float32(theta) ** _exponents(dim)).astype(np.float32)


def static_inv_freq(rope: Rope) -> np.ndarray:
    """`inv_freq [d/2]` (float32) for positions within the pretraining length.

    For `dynamic` and `longrope` this is the short-context value; `inv_freq` switches for longer calls.
    """
    d, base = rope.dim, rope.theta
    inv = _default(base, d)
    if rope.rope_type == "linear":
        return (inv / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(rope.factor), inv)
        smooth = (np.float32(old) / wavelen - np.float32(rope.low_freq_factor)) / np.float32(
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if rope.rope_type == "yarn":
        pos_freqs = np.float32(base) ** _exponents(d)
        extrapolation = np.float32(1.0) / pos_freqs
        interpolation = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
        orig = rope.original_max_position_embeddings

        def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in orig
            return (d * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extra = (1 - ramp).astype(np.float32)
        return (interpolation * (1 - extra) + extrapolation * extra).astype(np.float32)
    if rope.rope_type == "longrope":
        return _longrope(rope, rope.short_factor)
    return inv  # default, dynamic (short context)


def _longrope(rope: Rope, factors) -> np.ndarray:
    ext = np.asarray(factors, np.float32)
    return (np.float32(1.0) / (ext * np.float32(rope.theta) ** _exponents(rope.dim))).astype(np.float32)


def inv_freq(rope: Rope, positions: Array) -> Array:
    """`inv_freq [d/2]` for one call whose positions are `positions` (any shape).

    `dynamic` and `longrope` depend on the call's length `L = max(positions) + 1` (one value for the whole
    batch, as in `transformers`); the others are constants.
    """
    static = jnp.asarray(static_inv_freq(rope))
    if rope.rope_type not in ("dynamic", "longrope"):
        return static
    length = jnp.max(positions).astype(jnp.int32) + 1
    if rope.rope_type == "longrope":
        long = jnp.asarray(_longrope(rope, rope.long_factor))
        return jnp.where(length > rope.original_max_position_embeddings, long, static)
    d, max_pos, f = rope.dim, rope.max_position_embeddings, jnp.float32(rope.factor)
    ratio = f * length.astype(jnp.float32) / jnp.float32(max_pos) - (f - 1)
    base = jnp.float32(rope.theta) * ratio ** jnp.float32(d / (d - 2))
    scaled = 1.0 / base ** jnp.asarray(_exponents(d))
    return jnp.where(length > max_pos, scaled, static)


def cos_sin(rope: Rope, positions: Array) -> tuple[Array, Array]:
    """`cos, sin [..., d/2]` (float32) of the angles `positions[..., None] · inv_freq`, × attention factor."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq(rope, positions)
    scale = jnp.float32(rope.attention_factor)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply(x: Array, cos: Array, sin: Array, interleaved: bool = False) -> Array:
    """Rotate the last axis of `x [B, T, N, d]` by `cos, sin [B, T, d/2]` (computed in `x`'s dtype).

    Half-rotation (Llama): pairs `(x_i, x_{i+d/2})`, output in the same layout
        `[x1·cos − x2·sin, x2·cos + x1·sin]`  with `x1, x2 = x[..., :d/2], x[..., d/2:]`.
    Interleaved (DeepSeek `rope_interleave`): pairs `(x_{2i}, x_{2i+1})`; the output is in the
    half-rotation layout, as `transformers`' `apply_rotary_pos_emb_interleave` returns it.
    """
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def mla_softmax_mscale(hf, rope: Rope) -> float:
    """DeepSeek MLA's factor on the softmax scale `1/sqrt(qk_head_dim)`: `yarn_get_mscale(factor, mscale_all_dim)²`
    when RoPE is scaled (any `rope_type` but `default`) and `mscale_all_dim` is set, else 1.

    This is `transformers`' `yarn_apply_mscale`; it compensates the attention temperature that yarn's
    `attention_factor` (`mscale / mscale_all_dim`) leaves on cos/sin, so that long-context logits keep their scale.
    """
    mscale_all_dim = (getattr(hf, "rope_parameters", None) or {}).get("mscale_all_dim") or 0
    if rope.rope_type == "default" or not mscale_all_dim:
        return 1.0
    return yarn_get_mscale(rope.factor, float(mscale_all_dim)) ** 2
