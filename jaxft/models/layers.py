"""Building blocks shared by every model family.

Every parameter is an `nnx.Param` that carries `logical_axes`: one name per dimension (`embed`, `mlp`,
`heads`, `head_dim`, `vocab`, ...). Layers only name axes; `jaxft.parallel` maps names to mesh axes with
one rules table, so the same module runs unsharded on a laptop and FSDP/tensor-sharded on a pod.

Shapes are spelled in einsum strings: B batch, T query length, S key length, D model width,
N heads, K kv heads, H head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.lora import layer_scope, split_einsum
from jaxft.models.quant import recompute_dequantized
from jaxft.parallel import constrain

Array = jax.Array

# `model.remat`: what each block keeps for the backward pass; the rest is recomputed (jax.checkpoint).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,                                          # plain autodiff: keep every intermediate
    "full": jax.checkpoint_policies.nothing_saveable,      # keep only block inputs
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: str):
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown model.remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[remat]


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
    """`L` blocks of one structure → one module of their class whose every variable has a leading `[L]`
    axis, named `layers` in its logical axes (`model.scan_layers`; run it with `run_layers`).

    Each block is built as usual first (same initialisers, same parameter names below the stack), so a
    scanned model differs from a looped one only in where the layer index lives: in the parameter's
    leading axis instead of its path. Raises if the blocks differ in structure or static attributes.
    """
    graphdef, _ = nnx.split(layers[0])
    states = []
    for i, layer in enumerate(layers):
        g, state = nnx.split(layer)
        if g != graphdef:
            raise ValueError(f"layer {i} differs in structure from layer 0, so the layers cannot be "
                             f"scanned (model.scan_layers)")
        states.append(state)
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    for _, var in nnx.to_flat_state(nnx.state(stacked)):
        var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return stacked


def run_layers(layers: nnx.List | nnx.Module, remat: str, x: Array, call: Callable, xs: Sequence | None = None):
    """Run the blocks in order, `x, y_i = call(layer_i, x, i, xs[i])`, and return `(x, [y_0, …])`.

    `layers` is either an `nnx.List` of blocks (a Python loop: one copy of the block per layer in the
    compiled program) or one stacked block from `stack_layers` (`jax.lax.scan`: the block is traced and
    compiled once, so compile time no longer grows with depth). `i` is a Python int in the loop and a
    traced int32 in the scan, and `xs[i]` is that layer's slice of per-layer inputs (e.g. its KV cache);
    both modes compute the same function. `remat` rematerialises each block under a policy of
    `REMAT_POLICIES` (results unchanged, memory traded for compute); `call`'s closed-over arguments
    (masks, RoPE tables) are not saved per layer.
    """
    policy = remat_policy(remat)
    if isinstance(layers, nnx.List):
        ys = []
        for i, layer in enumerate(layers):
            xi = None if xs is None else xs[i]
            fn = lambda mod, h, i=i, xi=xi: _scoped(call, mod, h, i, xi)  # noqa: E731
            if remat != "none":
                # The block only reads its state, so nothing is written back (graph_updates=False), which
                # also lets it hold variables created outside the trace (e.g. a router bias `Buffer`).
                fn = nnx.remat(fn, policy=policy, graph_updates=False)
            x, y = fn(layer, x)
            ys.append(y)
        return x, ys
    graphdef, state = nnx.split(layers)

    def body(h, inputs):
        layer_state, i, xi = inputs
        return _scoped(call, nnx.merge(graphdef, layer_state), h, i, xi)

    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    stacked_xs = None if xs is None else jax.tree.map(lambda *a: jnp.stack(a), *xs)
    n = num_layers(layers)
    x, ys = jax.lax.scan(body, x, (state, jnp.arange(n, dtype=jnp.int32), stacked_xs))
    return x, [jax.tree.map(lambda a, i=i: a[i], ys) for i in range(n)]


def _scoped(call: Callable, layer, h, i, xi):
    """`call(layer, h, i, xi)` with block `i` as the adapters' layer scope (their dropout streams)."""
    with layer_scope(i):
        return call(layer, h, i, xi)


def num_layers(layers: nnx.List | nnx.Module) -> int:
    if isinstance(layers, nnx.List):
        return len(layers)
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def make_layers(build: Callable[[int], nnx.Module], n: int, scan: bool) -> nnx.List | nnx.Module:
    """The `n` blocks `build(i)` as an `nnx.List`, or stacked for `jax.lax.scan` when `scan`."""
    layers = [build(i) for i in range(n)]
    return stack_layers(layers) if scan else nnx.List(layers)


def residual(x: Array) -> Array:
    """Pin the residual stream `[B, T, D]` to batch sharding (a no-op without an active mesh)."""
    return constrain(x, ("batch", "length", "embed"))


def param(rngs: nnx.Rngs | None, init: str, shape: Sequence[int], axes: Sequence[str | None],
          dtype, std: float = 0.02) -> nnx.Param:
    """A parameter with logical axis names. `init` is `normal` (N(0, std²)), `zeros` or `ones`."""
    shape = tuple(int(s) for s in shape)
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown initialiser {init!r}")
    return nnx.Param(value, logical_axes=tuple(axes))


class Dense(nnx.Module):
    """A linear map written as an einsum, e.g. `'BTD,DNH->BTNH'` for a query projection.

    The kernel's shape and axes follow the einsum's second operand; the optional bias has the output's
    trailing (non-batch) dimensions. Computation runs in `dtype`, parameters are stored in `param_dtype`.
    `lora` is a LoRA adapter (`jaxft.models.lora.LoRA`) when one is attached (`jaxft.lora.apply_lora`);
    `quant` replaces `kernel` when the frozen base is stored quantised (`jaxft.models.quant.QuantKernel`).
    """

    lora = None
    quant = None

    def __init__(self, einsum: str, kernel_shape: Sequence[int], kernel_axes: Sequence[str], *,
                 use_bias: bool = True, std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.einsum = einsum
        self.dtype = dtype
        self.kernel = param(rngs, "normal", kernel_shape, kernel_axes, param_dtype, std)
        out = einsum.split("->")[1]
        rhs = einsum.split("->")[0].split(",")[1]
        out_dims = [c for c in out if c in rhs]  # output dims that come from the kernel
        if use_bias:
            shape = [kernel_shape[rhs.index(c)] for c in out_dims]
            axes = [kernel_axes[rhs.index(c)] for c in out_dims]
            self.bias = param(rngs, "zeros", shape, axes, param_dtype)
        else:
            self.bias = None

    def __call__(self, x: Array) -> Array:
        if self.quant is None:
            y = linear(self.einsum, x.astype(self.dtype), self.weight())
        else:
            product = lambda quant, x: linear(self.einsum, x, quant.dequantize(self.dtype))  # noqa: E731
            y = recompute_dequantized(product)(self.quant, x.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x.astype(self.dtype))
        return y

    def weight(self) -> Array:
        """The base kernel in the compute dtype (dequantised here, inside the jitted step, when quantised)."""
        if self.quant is not None:
            return self.quant.dequantize(self.dtype)
        return self.kernel[...].astype(self.dtype)

    def effective_kernel(self) -> Array:
        """The kernel the layer applies, in its parameter dtype: `W` (dequantised), plus `scale·A·B` when an
        adapter is attached (used where a kernel is read directly, e.g. MLA's absorbed decoding, merging)."""
        if self.quant is not None:
            base, dtype = self.quant.dequantize(jnp.float32), self.quant.param_dtype
        else:
            base, dtype = self.kernel[...], self.kernel.dtype
        if self.lora is None:
            return base.astype(dtype)
        return (base.astype(jnp.float32) + self.lora.delta()).astype(dtype)

    def kernel_spec(self) -> tuple[tuple[int, ...], tuple, object]:
        """`(shape, logical axes, dtype)` of the base kernel, stored plainly or quantised."""
        if self.quant is not None:
            return self.quant.shape, self.quant.axes, self.quant.param_dtype
        return tuple(self.kernel.shape), tuple(self.kernel.get_metadata()["logical_axes"]), self.kernel.dtype


class Embed(nnx.Module):
    """A lookup table `[V, D]` (`vocab`, `embed`)."""

    def __init__(self, num: int, features: int, *, axes=("vocab", "embed"), std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype, self.axes = dtype, tuple(axes)
        self.embedding = param(rngs, "normal", (num, features), axes, param_dtype, std)

    def __call__(self, ids: Array) -> Array:
        # Gather from the table with its model width whole (the FSDP all-gather of the weight), so the
        # looked-up rows come out batch-sharded like the rest of the residual stream.
        table = constrain(self.embedding[...], (self.axes[0], None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Logits against the table (tied output embeddings): `'BTD,VD->BTV'`."""
        return linear("BTD,VD->BTV", x, self.embedding[...].astype(x.dtype))


def after_cotangent(residuals: tuple, cotangent):
    """`(*residuals, cotangent)` passed through one optimisation barrier, for a custom backward pass to
    compute from. Whatever the backward derives from the residuals alone (a recomputed activation, a
    transposed input) then cannot be scheduled into, or merged with (CSE), the forward pass, where it
    would be held from the forward to the backward: the memory the custom backward exists to save."""
    return jax.lax.optimization_barrier((*residuals, cotangent))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def linear(einsum: str, x: Array, w: Array) -> Array:
    """`jnp.einsum(einsum, x, w)` for a layer's einsum (`x`: batch dims then input dims, `w`: kernel), with
    a backward pass laid out for speed (see `_linear_bwd`)."""
    return jnp.einsum(einsum, x, w)


def _linear_fwd(einsum, x, w):
    return jnp.einsum(einsum, x, w), (x, w)


def _linear_bwd(einsum, res, g):
    """`dx = g·Wᵀ` and `dW = xᵀ·g`, the latter contracting the token axes. Of `x` and `g`, the smaller is
    moved token-last and held there by an optimisation barrier, so `dW` is a plain `[in, tokens] ×
    [tokens, out]` product (or its transpose). Left to itself, XLA on CPU transposed the cotangent `g`,
    often the larger (e.g. `[tokens, 1536]` against `[tokens, 576]` for an MLP input projection, or the
    `[tokens, vocab]` logit cotangent), fusing the element-wise backward that produced it (SiLU's, for
    one) into the transpose, and then computed that chain again untransposed for `dx`."""
    x, w, g = after_cotangent(res, g)
    return linear_grads(einsum, x, w, g)


def linear_grads(einsum: str, x: Array, w: Array, g: Array) -> tuple[Array, Array]:
    """`(dx, dW)` of `jnp.einsum(einsum, x, w)` for the output cotangent `g`, laid out as `_linear_bwd` says."""
    lhs, rhs, out, batch, ins, outs = split_einsum(einsum)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, w)
    if x.size <= g.size:
        x_t = jax.lax.optimization_barrier(jnp.einsum(f"{lhs}->{ins}{batch}", x))
        dw, dw_dims = jnp.einsum(f"{ins}{batch},{out}->{ins}{outs}", x_t, g), ins + outs
    else:
        g_t = jax.lax.optimization_barrier(jnp.einsum(f"{out}->{outs}{batch}", g))
        dw, dw_dims = jnp.einsum(f"{outs}{batch},{lhs}->{outs}{ins}", g_t, x), outs + ins
    if dw_dims != rhs:
        dw = jnp.einsum(f"{dw_dims}->{rhs}", jax.lax.optimization_barrier(dw))
    return dx, dw


linear.defvjp(_linear_fwd, _linear_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32 (as PyTorch does for float32 inputs)."""

    def __init__(self, features: int, eps: float, *, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, "ones", (features,), ("embed",), param_dtype)
        self.bias = param(rngs, "zeros", (features,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, x: Array) -> Array:
        bias = None if self.bias is None else self.bias[...]
        return layer_norm(x, self.scale[...], bias, self.eps, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array | None, eps: float, dtype) -> Array:
    """`((x − μ) / sqrt(σ² + eps)) · scale + bias` over the last axis, in float32, cast to `dtype`; `bias`
    may be None. The backward pass keeps only `x` and the `[..., 1]` means `μ` and reciprocal deviations
    `r`. With `n = (x − μ)·r` and `dn = dy·scale` (float32):

        dx = r · (dn − mean(dn) − n · mean(dn · n)),    dscale = Σ_rows dy · n,    dbias = Σ_rows dy

    Plain autodiff kept three more `x`-sized float32 arrays per norm (`x − μ`, the normalised and the
    scaled values); a BERT or GPT-2 block has two norms."""
    return _ln_fwd(x, scale, bias, eps, dtype)[0]


def _ln_fwd(x, scale, bias, eps, dtype):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    r = jax.lax.rsqrt(var + eps)
    y = (x32 - mean) * r * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype), (x, mean, r, scale, bias)


def _ln_bwd(eps, dtype, res, dy):
    x, mean, r, scale, bias, dy = after_cotangent(res, dy)
    n = (x.astype(jnp.float32) - mean) * r
    dy32 = dy.astype(jnp.float32)
    dn = dy32 * scale.astype(jnp.float32)
    dx = r * (dn - jnp.mean(dn, axis=-1, keepdims=True) - n * jnp.mean(dn * n, axis=-1, keepdims=True))
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    dscale = jnp.sum(rows(dy32 * n), axis=0).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(rows(dy32), axis=0).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_ln_fwd, _ln_bwd)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # names as `transformers` spells them in config.json (`hidden_act`, `activation_function`)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str, field: str = "hidden_act") -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {field}={name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def activate(act: Callable[[Array], Array], x: Array) -> Array:
    """`act(x)` (the activation of a plain, ungated MLP) keeping only `x` for the backward pass, which
    recomputes the derivative from it. Plain autodiff kept the activation's intermediates: for the exact
    GELU `x·erfc(−x/√2)/2`, four `[tokens, mlp]` float32 arrays per layer (the product, `erfc`, the `exp`
    of its derivative and a copy of `x`)."""
    return act(x)


def _activate_fwd(act, x):
    return act(x), (x,)


def _activate_bwd(act, res, dy):
    x, dy = after_cotangent(res, dy)
    return jax.vjp(act, x)[1](dy)


activate.defvjp(_activate_fwd, _activate_bwd)


_LAYER_STREAM = 0x7A7E25  # separates per-layer streams from the model's own draws


class Keys:
    """Deterministic stream of dropout keys derived from one key, or `None`s when not training.

    Each call returns a fresh key folded from the base key with a trace-time counter, so the same
    model code draws the same masks for the same base key: dropout is seeded and reproducible.
    """

    def __init__(self, key: Array | None):
        self.key, self.count = key, 0

    def __call__(self) -> Array | None:
        if self.key is None:
            return None
        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    def layer(self, i: int | Array) -> "Keys":
        """The stream of block `i`: derived from the layer index, not from how many keys were drawn
        before, so a scanned block (traced once for all layers) draws the same masks as a looped one."""
        if self.key is None:
            return Keys(None)
        return Keys(jax.random.fold_in(jax.random.fold_in(self.key, _LAYER_STREAM), i))


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, as `transformers`' `LlamaRMSNorm`:

        y = scale · (x / sqrt(mean(x²) + eps))

    The normalisation runs in float32, the result is cast to the compute dtype before the scale multiply.
    `axes` names the scale's dimension: `embed` for the block norms, `head_dim` for Qwen3's q/k norms,
    which normalise each head's `H` channels separately.
    """

    def __init__(self, features: int, eps: float, *, axes: tuple[str] = ("embed",), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, "ones", (features,), axes, param_dtype)

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
    """`scale · (x / sqrt(mean(x²) + eps))` over the last axis (normalised in float32, cast to `dtype`
    before the scale multiply), with a backward pass that keeps only `x` and the `[..., 1]` reciprocal
    norms `r`. With `n = x·r` and `dn = dy·scale` (float32):

        dx = r · (dn − n · mean(dn · n)),    dscale = Σ_rows dy · n

    Plain autodiff kept three `x`-sized arrays per norm (x², the normalised and the scaled values); the
    input `x` is the residual stream, which the block keeps anyway."""
    return _rms_fwd(x, scale, eps, dtype)[0]


def _rms_fwd(x, scale, eps, dtype):
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return scale.astype(dtype) * (x32 * r).astype(dtype), (x, r, scale)


def _rms_bwd(eps, dtype, res, dy):
    x, r, scale, dy = after_cotangent(res, dy)
    n = x.astype(jnp.float32) * r
    dy32 = dy.astype(jnp.float32)
    dn = dy32 * scale.astype(jnp.float32)
    dx = r * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
    dscale = jnp.sum((dy32 * n).reshape(-1, n.shape[-1]), axis=0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_fwd, _rms_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(act: Callable[[Array], Array], g: Array, u: Array) -> Array:
    """The gated unit of a GLU MLP, `act(g) · u` (SwiGLU for SiLU), keeping only `g` and `u` for the
    backward pass, which recomputes `act(g)` and its derivative: `du = dh · act(g)`, `dg = act'(g) · dh · u`.
    Plain autodiff kept `act(g)` and the activation's own intermediates (for SiLU: the sigmoid and its
    product with `g`), three more `[tokens, mlp]` arrays per layer."""
    return act(g) * u


def _gated_fwd(act, g, u):
    return act(g) * u, (g, u)


def _gated_bwd(act, res, dh):
    g, u, dh = after_cotangent(res, dh)
    a, act_vjp = jax.vjp(act, g)
    (dg,) = act_vjp(dh * u)
    return dg, dh * a


gated.defvjp(_gated_fwd, _gated_bwd)
