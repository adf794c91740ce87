"""LoRA adapters on `Dense` layers (Hu et al. 2021, as `peft` implements them).

A targeted `Dense` with kernel `W` (einsum `'BTD,DNH->BTNH'`, say) gets two small matrices, `A` over its
input dimensions and `B` over its output dimensions, joined by a rank axis `r`:

    y = x·W + scale · (dropout(x)·A)·B        A: [D, r]  (in dims + r)     B: [r, N, H]  (r + out dims)
    scale = alpha / r          (alpha / √r with rslora)

`A` starts uniform in ±1/√fan_in (peft's kaiming-uniform with a = √5) and `B` at zero, so a fresh adapter
changes nothing: the logits at step 0 are the base model's exactly. The adapters are `LoRAParam`s, an
`nnx.Param` subclass: the trainer selects them by type (`jaxft.lora.trainable_filter`), and Hugging Face
name tables skip them (they are jaxft-only; `jaxft.lora` writes them as a `peft` adapter instead).

Shardings: `A` keeps the base kernel's input axes and `B` its output axes (a scanned stack's `layers`
axis and the routed experts' `expert` axis lead both: one adapter per layer and per expert); the rank
axis `lora_rank` is never sharded. So an FSDP-sharded `embed` input stays
sharded in `A`, a tensor-sharded `heads` output stays sharded in `B`, and neither ever takes the base
weight's whole spec.

Dropout on the adapter input is active only when the train step provides a key (`adapter_dropout`);
each adapter draws its own mask from (step key, layer index, adapter id), so looped and scanned layers
draw the same masks.

Inside `adapters_off()` every adapter contributes 0: the model computes its base alone. Preference
objectives (`jaxft.objectives.preference`) use it for the reference pass of a LoRA run, inside the same jitted
step, so the reference model costs no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.dropout import dropout, keep_mask

Array = jax.Array

_KEY = contextvars.ContextVar("jaxft_adapter_dropout_key", default=None)
_LAYER = contextvars.ContextVar("jaxft_adapter_layer", default=None)
_OFF = contextvars.ContextVar("jaxft_adapters_off", default=False)
_STREAM = 0x10A4  # separates adapter dropout from the model's own dropout draws


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: trainable, and absent from Hugging Face checkpoints."""


@contextlib.contextmanager
def adapter_dropout(key: Array | None):
    """Adapters called inside draw their dropout masks from `key` (None: no dropout, as in evaluation)."""
    token = _KEY.set(key)
    try:
        yield
    finally:
        _KEY.reset(token)


@contextlib.contextmanager
def adapters_off():
    """Adapters called inside contribute 0 (the base model alone, e.g. a preference objective's reference)."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


@contextlib.contextmanager
def layer_scope(index):
    """Calls inside belong to block `index` (a Python int, or a traced one inside a scan)."""
    token = _LAYER.set(index)
    try:
        yield
    finally:
        _LAYER.reset(token)


def split_einsum(einsum: str) -> tuple[str, str, str, str, str, str]:
    """`'BTD,DNH->BTNH'` → `(lhs 'BTD', kernel 'DNH', out 'BTNH', batch dims 'BT', in dims 'D', out dims 'NH')`."""
    inputs, out = einsum.split("->")
    lhs, rhs = inputs.split(",")
    return (lhs, rhs, out, "".join(c for c in lhs if c not in rhs), "".join(c for c in rhs if c in lhs),
            "".join(c for c in rhs if c not in lhs))


class LoRA(nnx.Module):
    """The adapter of one `Dense`: `scale · (dropout(x)·A)·B`, computed in the layer's dtype."""

    def __init__(self, einsum: str, kernel_shape, kernel_axes, rank: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, adapter_id: int = 0, lead: tuple[int, ...] = (), lead_axes: tuple = (),
                 dtype=jnp.float32, param_dtype=jnp.float32, key: Array):
        """`einsum`, `kernel_shape`, `kernel_axes`: one layer's kernel; `lead`/`lead_axes`: the leading axes of
        a stack of them (a scanned stack's `layers`, the routed experts' `expert`), one adapter per slice."""
        lhs, rhs, out, batch, ins, outs = split_einsum(einsum)
        shape = dict(zip(rhs, kernel_shape))
        axes = dict(zip(rhs, kernel_axes))
        fan_in = math.prod(shape[c] for c in ins)
        lead, lead_axes = tuple(lead), tuple(lead_axes)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, lead + tuple(shape[c] for c in ins) + (rank,), jnp.float32, -bound, bound)
        self.a = LoRAParam(a.astype(param_dtype), logical_axes=lead_axes + tuple(axes[c] for c in ins) + ("lora_rank",))
        self.b = LoRAParam(jnp.zeros(lead + (rank,) + tuple(shape[c] for c in outs), param_dtype),
                           logical_axes=lead_axes + ("lora_rank",) + tuple(axes[c] for c in outs))
        self.dims = (lhs, batch, ins, outs, out)   # the einsum's parts, for `_adapter`
        self.delta_einsum = f"{ins}r,r{outs}->{rhs}"
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.rate, self.id, self.dtype = float(dropout), int(adapter_id), dtype

    def _dropout_key(self) -> Array | None:
        key = _KEY.get()
        if key is None or self.rate == 0.0:
            return None
        layer = _LAYER.get()
        key = jax.random.fold_in(jax.random.fold_in(key, _STREAM), -1 if layer is None else layer)
        return jax.random.fold_in(key, self.id)

    def input_mask(self, shape) -> Array | None:
        """The dropout multiplier of an adapter input of `shape` (0 or 1/(1-p) per entry, in the compute
        dtype), or None when no dropout applies (rate 0, evaluation). For code that applies the factors
        itself (the routed experts' dispatch)."""
        key = self._dropout_key()
        if key is None:
            return None
        keep, scale = keep_mask(key, self.rate, shape)
        return jnp.where(keep, jnp.asarray(scale, self.dtype), jnp.zeros((), self.dtype))

    def factors(self) -> tuple[Array, Array] | None:
        """`(A, scale·B)` in the compute dtype (with leading stacked axes, if any), or None inside
        `adapters_off()`."""
        if _OFF.get():
            return None
        return self.a[...].astype(self.dtype), self.b[...].astype(self.dtype) * jnp.asarray(self.scale, self.dtype)

    def __call__(self, x: Array) -> Array:
        if _OFF.get():
            return jnp.zeros((), self.dtype)  # broadcasts onto the layer's output: y + 0
        x = dropout(x, self.rate, self._dropout_key())
        a, b = self.a[...].astype(self.dtype), self.b[...].astype(self.dtype)
        return _adapter(self.dims, self.scale, x, a, b)

    def delta(self, a: Array | None = None, b: Array | None = None) -> Array:
        """`scale · A·B` in the base kernel's layout, float32 (a stacked adapter: one per slice, e.g. per
        layer and per expert)."""
        a = (self.a[...] if a is None else a).astype(jnp.float32)
        b = (self.b[...] if b is None else b).astype(jnp.float32)
        ins, rest = self.delta_einsum.split(",")
        outs, kernel = rest.split("->")
        return jnp.einsum(f"...{ins},...{outs}->...{kernel}", a, b) * (0.0 if _OFF.get() else self.scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _adapter(dims, scale, x, a, b):
    """`scale · (x·A)·B` for the einsum `dims` of its layer, with a backward pass laid out for speed."""
    return _adapter_fwd(dims, scale, x, a, b)[0]


def _adapter_fwd(dims, scale, x, a, b):
    lhs, batch, ins, outs, out = dims
    b = b * jnp.asarray(scale, b.dtype)               # scale the rank-r matrix, not the [B, T, out] output
    h = jnp.einsum(f"{lhs},{ins}r->{batch}r", x, a)
    return jnp.einsum(f"{batch}r,r{outs}->{out}", h, b), (x, a, b, h)


def _adapter_bwd(dims, scale, res, g):
    """Gradients of `y = h·B'` (`h = x·A`, `B' = scale·B`): `dB = scale·hᵀg`, `dh = g·B'ᵀ`, `dA = xᵀdh`,
    `dx = dh·Aᵀ`. The rank-r factors `h` and `dh` are moved rank-first (cheap: r columns) and held there
    by an optimisation barrier, so each weight gradient is a plain `[r, tokens] × [tokens, features]`
    product. Left to itself, XLA on CPU transposed the big cotangent `g` instead, and fused the whole
    elementwise backward chain of the later layers into each such transpose (recomputed per adapter):
    a MiniLM LoRA step took 1.6× the full fine-tuning step."""
    lhs, batch, ins, outs, out = dims
    x, a, b, h = res
    h_t = jax.lax.optimization_barrier(jnp.moveaxis(h, -1, 0))
    db = jnp.einsum(f"r{batch},{out}->r{outs}", h_t, g) * jnp.asarray(scale, g.dtype)
    gh = jnp.einsum(f"{out},r{outs}->{batch}r", g, b)
    gh_t = jax.lax.optimization_barrier(jnp.moveaxis(gh, -1, 0))
    da = jnp.moveaxis(jnp.einsum(f"r{batch},{lhs}->r{ins}", gh_t, x), 0, -1)
    dx = jnp.einsum(f"{batch}r,{ins}r->{lhs}", gh, a)
    return dx, da, db


_adapter.defvjp(_adapter_fwd, _adapter_bwd)
