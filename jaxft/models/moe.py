"""DeepSeekMoE: shared experts plus fine-grained routed experts, dispatched by sort/gather.

    y = shared(x) + Σ_{j<k} w_j · expert_{e_j}(x),      expert(x) = (act(x·G) ⊙ (x·U))·W_down

Routing runs in float32 whatever the compute dtype (`transformers` keeps `gate.weight` and the bias in
float32 too). With N tokens, E routed experts, k of them per token:

    logits = x·W_r                                        'ND,DE->NE'
    s = softmax(logits)      scoring_func softmax (DeepSeek-V2)
    s = sigmoid(logits)      scoring_func sigmoid (DeepSeek-V3)
    greedy                e = top-k of s
    group_limited_greedy  the E experts form n_group equal groups; group score = max of s in the group;
                          the topk_group best groups stay, the others' s become 0; e = top-k of that
    noaux_tc              c = s + b (b = `e_score_correction_bias`); group score = sum of the two largest c
                          in the group; the topk_group best groups stay (others −∞); e = top-k of c
    w_j = s[e_j] (the bias only chooses);  norm_topk_prob: w /= Σ_j w_j + 1e-20;  w *= routed_scaling_factor

`b` is a `Buffer`, not an `nnx.Param`: optimisers, which update `nnx.Param`s only, never touch it (DeepSeek-V3's
auxiliary-loss-free balancing moves it by `update_correction_bias` instead). To freeze the router itself,
give the optimiser zero updates for the parameters `is_router_param` selects.

Dispatch is dropless: the R = N·k (token, slot) rows are sorted by expert, each expert multiplies only
its own rows (a grouped matmul), and the rows are unsorted and summed with their weights, so the cost
grows with N·k, not with N·E. There is no capacity factor and no token is ever dropped; static shapes hold
the worst case (all R rows, however they fall on the experts). Grouped-matmul implementations (`impl`):

- `ragged_dot`: `jax.lax.ragged_dot`, a native grouped GEMM on TPU. On CPU, and on GPU with jaxlib 0.10
  (marin-community/marin#7012), XLA lowers it by materialising every group densely: cost ∝ E again.
- `blocks`: each expert's rows are padded to a multiple of a block of b rows; each block multiplies the
  weights of its one expert, gathered per block (`'MBD,MDF->MBF'`). Cost ∝ R + min(E, R)·b rows plus one
  weight gather per block. Plain XLA, so it stays sparse on every backend.
- `dense`: every expert on every token, combined with an `[N, E]` weight matrix that is zero off the
  top-k: cost ∝ N·E. The reference the dispatch is tested against; fastest for a handful of experts.
- `auto`: `ragged_dot` on TPU, `blocks` elsewhere.

Each MoE layer also returns `RouterStats`-style statistics over the real (unpadded) tokens: the number of
(token, slot) assignments per expert and the sequence-wise balance loss of DeepSeek-V2/V3
(`balance_loss`), for the train step to log and, scaled by a coefficient, to add to the loss.
"""

from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import parallel
from jaxft.models.layers import Dense, activation, gated, param

Array = jax.Array
IMPLS = ("auto", "ragged_dot", "blocks", "dense")


class Buffer(nnx.Variable):
    """A tensor a checkpoint carries but training does not (PyTorch's persistent `register_buffer`).

    Loaded and exported like a parameter (it names its `logical_axes`), but it is not an `nnx.Param`, so
    the optimiser, gradient and weight-decay machinery, which select `nnx.Param`, leave it alone.
    """


class RouterStats(NamedTuple):
    """Router statistics of the MoE layers of one forward pass, stacked over the L MoE layers.

    counts:       [L, E] float32, (real token, slot) assignments per expert; each row sums to k·tokens.
    balance_loss: [L] float32, the sequence-wise balance loss (`balance_loss`), unscaled; 1 when balanced.
    """

    counts: Array
    balance_loss: Array


class GatedMLP(nnx.Module):
    """`down_proj(act(gate_proj(x)) · up_proj(x))`: the dense layers' MLP and the shared experts."""

    def __init__(self, cfg, width: int, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, std=cfg.initializer_range, dtype=jnp.dtype(cfg.options.dtype),
                  param_dtype=jnp.dtype(cfg.options.param_dtype), rngs=rngs)
        D = cfg.hidden_size
        self.gate_proj = Dense("BTD,DF->BTF", (D, width), ("embed", "mlp"), **kw)
        self.up_proj = Dense("BTD,DF->BTF", (D, width), ("embed", "mlp"), **kw)
        self.down_proj = Dense("BTF,FD->BTD", (width, D), ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(gated(self.act, self.gate_proj(x), self.up_proj(x)))


class Router(nnx.Module):
    """`(scores s [N, E], experts e [N, k], weights w [N, k])` of tokens `x [N, D]`, all in float32."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        E = cfg.n_routed_experts
        self.kernel = param(rngs, "normal", (cfg.hidden_size, E), ("embed", None), jnp.float32,
                            cfg.initializer_range)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = Buffer(jnp.zeros((E,), jnp.float32), logical_axes=(None,))
        self.method, self.scoring, self.k = cfg.topk_method, cfg.scoring_func, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def _keep_groups(self, choice: Array, group_score: Callable[[Array], Array], fill: float) -> Array:
        """`choice [N, E]` with the experts outside the `topk_group` best groups set to `fill`."""
        N, E = choice.shape
        groups = choice.reshape(N, self.n_group, E // self.n_group)
        _, best = jax.lax.top_k(group_score(groups), self.topk_group)                 # [N, topk_group]
        keep = jnp.any(best[:, :, None] == jnp.arange(self.n_group), axis=1)          # [N, n_group]
        return jnp.where(keep[:, :, None], groups, fill).reshape(N, E)

    def __call__(self, x: Array) -> tuple[Array, Array, Array]:
        logits = jnp.einsum("ND,DE->NE", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        s = jax.nn.softmax(logits, axis=-1) if self.scoring == "softmax" else jax.nn.sigmoid(logits)
        if self.method == "greedy":
            w, e = jax.lax.top_k(s, self.k)
        elif self.method == "group_limited_greedy":
            w, e = jax.lax.top_k(self._keep_groups(s, lambda g: g.max(-1), 0.0), self.k)
        else:  # noaux_tc
            choice = s + self.e_score_correction_bias[...]
            top2 = lambda g: jax.lax.top_k(g, 2)[0].sum(-1)
            _, e = jax.lax.top_k(self._keep_groups(choice, top2, -jnp.inf), self.k)
            w = jnp.take_along_axis(s, e, axis=-1)
        if self.norm:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        return s, e, w * self.scale


class Stacked(Dense):
    """One linear layer per expert, stacked: `kernel [E, I, O]` with axes `(expert, ...)`; per expert the
    `Dense` einsum `'NI,IO->NO'`.

    A `Dense` to everything that reads kernels: name tables, QLoRA storage (`quant`), LoRA adapters
    (`lora`, stacked per expert: `a [E, I, r]`, `b [E, r, O]`) and merging. The MoE dispatch applies it
    (`routed_experts`, through `ExpertWeights`); it is never called itself.
    """

    def __init__(self, shape, axes, std, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__("NI,IO->NO", shape, ("expert",) + tuple(axes), use_bias=False, std=std, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        raise TypeError("routed experts are applied by jaxft.models.moe.routed_experts, not called")

    def weights(self, rows: tuple[int, int]) -> ExpertWeights:
        """The kernel (dequantised if stored quantised) and, when adapted, the adapter's factors and the
        dropout multiplier of its input for `rows = (N tokens, k slots)`, in the compute dtype."""
        factors = None if self.lora is None else self.lora.factors()
        if factors is None:
            return ExpertWeights(self.weight())
        a, b = factors
        return ExpertWeights(self.weight(), a, b, self.lora.input_mask(rows + (a.shape[-2],)))


class ExpertWeights(NamedTuple):
    """One routed-expert projection as the dispatch applies it: `kernel [E, I, O]`, and with a LoRA
    adapter its factors `a [E, I, r]`, `b [E, r, O]` (scale folded into `b`) and the dropout multiplier
    of the adapter's input per (token, slot) `mask [N, k, I]` (None: no dropout). Row n·k + j of the
    dispatch (token n, slot j, expert e = e[n, j]) computes

        y = x·kernel[e] + ((x ⊙ mask[n, j])·a[e])·b[e]
    """

    kernel: Array
    a: Array | None = None
    b: Array | None = None
    mask: Array | None = None


def _as_weights(w) -> ExpertWeights:
    return w if isinstance(w, ExpertWeights) else ExpertWeights(w)


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights: `gate_proj, up_proj [E, D, F]`, `down_proj [E, F, D]`."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
        kw = dict(std=cfg.initializer_range, dtype=jnp.dtype(cfg.options.dtype),
                  param_dtype=jnp.dtype(cfg.options.param_dtype), rngs=rngs)
        self.gate_proj = Stacked((E, D, F), ("embed", "mlp"), **kw)
        self.up_proj = Stacked((E, D, F), ("embed", "mlp"), **kw)
        self.down_proj = Stacked((E, F, D), ("mlp", "embed"), **kw)


def block_size(rows: int, experts: int) -> int:
    """Rows per block for `blocks`: the largest power of two ≤ R / (2·min(E, R)), clipped to [1, 128].

    The static shape holds R + min(E, R)·b rows (each non-empty expert may leave one block partly empty),
    so this bounds the padding by half the R real rows; halving b again would cut it to a quarter but
    double the per-block weight gathers, which cost more on CPU (measured with scripts/bench_moe.py).
    """
    m = max(1, min(experts, rows))
    return int(min(128, 2 ** math.floor(math.log2(max(1, rows // (2 * m))))))


def _ffn_ragged(xs, sizes, gate, up, down, act, masks):
    """`'RD,EDF->RF'` on each expert's rows with `jax.lax.ragged_dot` (rows sorted by expert); `masks`:
    each projection's adapter dropout multiplier per row `[R, I]`, or None."""
    def proj(x, w: ExpertWeights, mask):
        y = jax.lax.ragged_dot(x, w.kernel, sizes)
        if w.a is None:
            return y
        xa = x if mask is None else x * mask
        return y + jax.lax.ragged_dot(jax.lax.ragged_dot(xa, w.a, sizes), w.b, sizes)

    h = gated(act, proj(xs, gate, masks[0]), proj(xs, up, masks[1]))
    return proj(h, down, masks[2])


def _ffn_blocks(xs, sizes, e_sorted, gate, up, down, act, masks):
    """The same in blocks of b rows, each from one expert (rows sorted by expert, R rows in all).

    Expert e's rows go to blocks `first[e] … first[e] + ceil(n_e/b) − 1` (zero rows pad the last one); at
    most `min(ceil(R/b) + min(E, R), R)` blocks are ever needed (each non-empty expert wastes at most one
    partial block, and every block holds a row), which fixes the static shape M. Rows of the sentinel
    expert `E` (another device's expert) sort last and are left out (their output is 0).
    """
    (R, D), E = xs.shape, gate.kernel.shape[0]
    b = block_size(R, E)
    M = min(-(-R // b) + min(E, R), R)
    n_blocks = -(-sizes // b)                                                          # [E]
    first_block = jnp.append(jnp.cumsum(n_blocks) - n_blocks, M)                       # [E + 1]: sentinel → M
    first_row = jnp.append(jnp.cumsum(sizes) - sizes, sizes.sum())
    slot = first_block[e_sorted] * b + jnp.arange(R) - first_row[e_sorted]             # [R] padded row
    pad = lambda t: jnp.zeros((M * b, t.shape[-1]), t.dtype).at[slot].set(t, mode="drop").reshape(M, b, -1)  # noqa: E731
    xp = pad(xs)
    owner = jnp.minimum(jnp.searchsorted(jnp.cumsum(n_blocks), jnp.arange(M), side="right"), E - 1)

    def proj(x, w: ExpertWeights, mask):
        y = jnp.einsum("MBI,MIO->MBO", x, w.kernel[owner])
        if w.a is None:
            return y
        xa = x if mask is None else x * pad(mask)
        return y + jnp.einsum("MBr,MrO->MBO", jnp.einsum("MBI,MIr->MBr", xa, w.a[owner]), w.b[owner])

    h = gated(act, proj(xp, gate, masks[0]), proj(xp, up, masks[1]))
    y = proj(h, down, masks[2]).reshape(M * b, D)
    return y.at[slot].get(mode="fill", fill_value=0)


def _ffn_dense(x, local, mine, gate, up, down, act):
    """Every expert on every token: `[N, E, D]` out. An adapter's dropout multiplier of (token n, slot j)
    goes to expert `e[n, j]` of token n (the experts a token did not choose get weight 0 anyway)."""
    (N, D), E = x.shape, gate.kernel.shape[0]
    to_experts = lambda m: jnp.ones((N, E, m.shape[-1]), m.dtype).at[  # noqa: E731
        jnp.arange(N)[:, None], jnp.where(mine, local, E)].set(m, mode="drop")

    def proj(x, w: ExpertWeights, shared: bool):  # shared: one input row per token (`x [N, I]`), else `[N, E, I]`
        y = jnp.einsum("NI,EIO->NEO" if shared else "NEI,EIO->NEO", x, w.kernel)
        if w.a is None:
            return y
        if w.mask is not None:
            x, shared = (x[:, None] if shared else x) * to_experts(w.mask), False
        h = jnp.einsum("NI,EIr->NEr" if shared else "NEI,EIr->NEr", x, w.a)
        return y + jnp.einsum("NEr,ErO->NEO", h, w.b)

    h = gated(act, proj(x, gate, True), proj(x, up, True))
    return proj(h, down, False)


def routed_experts(x: Array, e: Array, w: Array, gate: Array | ExpertWeights, up: Array | ExpertWeights,
                   down: Array | ExpertWeights, act: Callable[[Array], Array], impl: str = "auto",
                   first: int | Array = 0) -> Array:
    """`y[n] = Σ_j w[n, j] · expert_{e[n, j]}(x[n])` for tokens `x [N, D]`, experts `e [N, k]`, weights `w [N, k]`.

    `gate, up: [E, D, F]`, `down: [E, F, D]` (kernels, or `ExpertWeights` with per-expert LoRA adapters)
    hold experts `first … first+E−1`; a (token, slot) whose expert is another one contributes 0 (under
    expert parallelism each device passes its own experts, and the devices' partial sums add up to `y`).
    Each weighted contribution is cast to `x`'s dtype before the sum over j, as `transformers` accumulates
    them.
    """
    gate, up, down = _as_weights(gate), _as_weights(up), _as_weights(down)
    (N, D), E, k = x.shape, gate.kernel.shape[0], e.shape[1]
    if impl == "auto":
        impl = "ragged_dot" if jax.default_backend() == "tpu" else "blocks"
    local = e - first
    mine = (local >= 0) & (local < E)
    w = jnp.where(mine, w, 0.0)
    if impl == "dense":
        y = _ffn_dense(x, local, mine, gate, up, down, act)
        combine = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], local].add(w, mode="drop")
        return (y.astype(jnp.float32) * combine[..., None]).astype(x.dtype).sum(1)
    if impl not in ("ragged_dot", "blocks"):
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {IMPLS}")
    flat = jnp.where(mine, local, E).reshape(-1)                # [R], R = N·k, row r = (token r//k, slot r%k)
    order = jnp.argsort(flat, stable=True)                      # rows sorted by expert, others' rows (E) last
    e_sorted = flat[order]
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)      # rows per expert (others' rows not counted)
    xs = x[order // k]                                          # [R, D] sorted by expert
    masks = [None if p.mask is None else p.mask.reshape(N * k, -1)[order] for p in (gate, up, down)]
    if impl == "ragged_dot":
        ys = _ffn_ragged(xs, sizes, gate, up, down, act, masks)
    else:
        ys = _ffn_blocks(xs, sizes, e_sorted, gate, up, down, act, masks)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(N * k), unique_indices=True)
    y = jnp.where(mine[..., None], ys[inverse].reshape(N, k, D), 0)
    return (y.astype(jnp.float32) * w[..., None]).astype(x.dtype).sum(1)


def expert_parallel(x: Array, e: Array, w: Array, gate: Array | ExpertWeights, up: Array | ExpertWeights,
                    down: Array | ExpertWeights, act: Callable[[Array], Array], impl: str, mesh) -> Array:
    """`routed_experts` of tokens `x [B, T, D]` (`e, w [B, T, k]`) with the experts split over the mesh.

    A `jax.shard_map` over the whole mesh, where every device holds the tokens of its batch shard (the
    same on every device of an `expert` group) and `E/ep` experts with `F/tp` of their width:

        1. all-gather its experts' model-width dimension over `fsdp` (FSDP, for its experts only);
        2. run its experts on its tokens (`routed_experts` with `first` = its first expert; rows routed to
           other devices' experts contribute 0);
        3. sum the partial outputs over the `expert` and `tensor` axes (one all-reduce of `[tokens, D]`).

    So tokens never leave their devices and no device holds more than its own experts' weights: the
    communication is explicit and bounded instead of whatever XLA's automatic partitioning picks for the
    sort/gather dispatch (on 8 CPU devices it gathered every token's routing to every device). The
    backward pass is the transpose: a reduce-scatter of the weight gradients over `fsdp`. Same math as
    the unsharded layer (tested: training losses equal one device's within 1e-4).

    LoRA adapters of the experts (`ExpertWeights`) are split like their kernels: `a` and `b` by expert,
    the model-width side gathered over `fsdp` as the kernel's is, the MLP-width side left in its `tensor`
    shards (the down projection's adapter then yields a partial sum over `tensor`, which the final
    all-reduce adds up, as for the kernel). The dropout multipliers travel with their tokens.
    """
    def axes(entry) -> tuple[str, ...]:
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    gate, up, down = _as_weights(gate), _as_weights(up), _as_weights(down)
    xs = parallel.spec(("batch", "length", None), x.shape, mesh)
    ws = parallel.spec(("batch", "length", None), e.shape, mesh)
    g_spec = parallel.spec(("expert", "embed", "mlp"), gate.kernel.shape, mesh)
    d_spec = parallel.spec(("expert", "mlp", "embed"), down.kernel.shape, mesh)
    expert_axes, width_axes = axes(g_spec[0]), axes(g_spec[2])
    n_local = gate.kernel.shape[0] // math.prod(mesh.shape[a] for a in expert_axes)
    # per projection kind: the logical axes of kernel, a, b and mask, and the dimension of kernel, a and b
    # (their model width) gathered over fsdp inside, or None
    layout = {"gate": (("expert", "embed", "mlp"), ("expert", "embed", "lora_rank"), ("expert", "lora_rank", "mlp"),
                       ("batch", "length", None, None)),
              "down": (("expert", "mlp", "embed"), ("expert", "mlp", "lora_rank"), ("expert", "lora_rank", "embed"),
                       ("batch", "length", None, "mlp"))}
    gathered = {"gate": (1, 1, None), "down": (2, None, 2)}   # kernel, a, b
    B, T, k = e.shape
    projections = []
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        kind = "down" if name == "down" else "gate"
        if p.mask is not None:
            p = p._replace(mask=p.mask.reshape(B, T, k, -1))
        specs = ExpertWeights(*(None if t is None else parallel.spec(a, t.shape, mesh) for t, a in zip(p, layout[kind])))
        projections.append((p, specs, gathered[kind]))

    def local(x, e, w, *weights):
        def gather(a, spec, dim):
            return jax.lax.all_gather(a, axes(spec[dim]), axis=dim, tiled=True) if dim is not None and spec[dim] else a

        B, T, D = x.shape
        ews = []
        for p, (_, specs, dims) in zip(weights, projections):
            p = ExpertWeights(*(None if t is None else gather(t, s, d) for t, s, d in zip(p[:3], specs, dims)),
                              None if p.mask is None else p.mask.reshape(B * T, k, -1))
            ews.append(p)
        first = jax.lax.axis_index(expert_axes) * n_local if expert_axes else 0
        y = routed_experts(x.reshape(B * T, D), e.reshape(B * T, -1), w.reshape(B * T, -1), *ews, act, impl, first)
        summed = expert_axes + width_axes
        if summed:
            y = jax.lax.psum(y.astype(jnp.float32), summed).astype(x.dtype)
        return y.reshape(B, T, D)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(xs, ws, ws, *(specs for _, specs, _ in projections)),
                       out_specs=xs, check_vma=False)
    return fn(x, e, w, *(p for p, _, _ in projections))


def balance_loss(s: Array, e: Array, mask: Array) -> Array:
    """Sequence-wise balance loss (DeepSeek-V3 eqs. 17–20; DeepSeek-V2's `seq_aux`), averaged over rows.

    For each row with T real tokens (`mask [B, T]`), scores `s [B, T, E]` and chosen experts `e [B, T, k]`:

        f_i = E / (k·T) · Σ_t 1[i ∈ e_t]          (load; stop-gradient: it counts choices)
        P_i = 1/T · Σ_t s_{t,i} / Σ_j s_{t,j}     (mean normalised affinity)
        L   = Σ_i f_i · P_i                       (= 1 for uniform routing)

    Rows without real tokens are left out of the mean.
    """
    E, k = s.shape[-1], e.shape[-1]
    m = mask.astype(jnp.float32)
    T = m.sum(-1)                                                                   # [B]
    chosen = (e[..., None] == jnp.arange(E)).sum(-2).astype(jnp.float32)            # [B, T, E]
    f = jnp.einsum("BTE,BT->BE", chosen, m) * E / (k * jnp.maximum(T, 1.0))[:, None]
    p = jnp.einsum("BTE,BT->BE", s / s.sum(-1, keepdims=True), m) / jnp.maximum(T, 1.0)[:, None]
    per_row = jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1)
    rows = (T > 0).astype(jnp.float32)
    return jnp.sum(per_row * rows) / jnp.maximum(rows.sum(), 1.0)


class MoE(nnx.Module):
    """Router + stacked routed experts + shared experts (`DeepseekV{2,3}MoE`).

    `__call__(x [B, T, D], mask [B, T] | None)` → `(y [B, T, D], counts [E], balance_loss [])`; every token
    is routed (padding too, as in `transformers`), only `mask`ed tokens count in the statistics.
    """

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.gate = Router(cfg, rngs)
        self.experts = Experts(cfg, rngs)
        self.shared_experts = GatedMLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs)
        self.act = activation(cfg.hidden_act)
        self.dtype, self.impl = jnp.dtype(cfg.options.dtype), cfg.moe_impl

    def __call__(self, x: Array, mask: Array | None = None, impl: str | None = None):
        B, T, D = x.shape
        s, e, w = self.gate(x.reshape(B * T, D))
        gate, up, down = (p.weights(e.shape) for p in
                          (self.experts.gate_proj, self.experts.up_proj, self.experts.down_proj))
        mesh = parallel.active_mesh()
        if mesh is not None and mesh.shape["expert"] > 1:
            k = e.shape[-1]
            y = expert_parallel(x.astype(self.dtype), e.reshape(B, T, k), w.reshape(B, T, k), gate, up, down,
                                self.act, impl or self.impl, mesh)
        else:
            y = routed_experts(x.reshape(B * T, D).astype(self.dtype), e, w, gate, up, down, self.act,
                               impl or self.impl).reshape(B, T, D)
        y = y + self.shared_experts(x)
        mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        E, k = s.shape[-1], e.shape[-1]
        counts = jnp.zeros((E,), jnp.float32).at[e.reshape(-1)].add(
            jnp.repeat(mask.reshape(-1).astype(jnp.float32), k))
        loss = balance_loss(s.reshape(B, T, E), e.reshape(B, T, k), mask)
        return y, counts, loss


ROUTER_PARAM = re.compile(r"(^|\.)mlp\.gate\.kernel$")


def is_router_param(path: str) -> bool:
    """True for a router weight, by its dotted parameter path (`model.layers.3.mlp.gate.kernel`).

    Freeze the router by masking these out of the optimiser, e.g.
    `optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)` with
    `labels = {p: "frozen" if is_router_param(p) else "train" for p in params}`.
    """
    return ROUTER_PARAM.search(path) is not None


def update_correction_bias(bias: Array, counts: Array, rate: float) -> Array:
    """DeepSeek-V3's auxiliary-loss-free balancing step for one MoE layer: `b_i += rate · sign(mean(n) − n_i)`.

    `counts [E]` are the assignments per expert over the last step (`RouterStats.counts` row): overloaded
    experts' bias goes down by `rate`, underloaded ones' up (DeepSeek-V3 used rate 0.001 in pretraining).
    """
    return bias + rate * jnp.sign(counts.mean() - counts).astype(bias.dtype)


def router_metrics(stats: RouterStats) -> dict[str, Array]:
    """Scalar metrics to log per step (over all MoE layers):

    `moe_load_max`, `moe_load_min`: the busiest / idlest expert's share × E (1 = perfectly balanced),
    `moe_load_ratio`: max over layers of busiest / idlest assignment count (an idle expert counts as 1),
    `moe_balance_loss`: mean of the layers' balance losses.
    """
    counts = stats.counts
    share = counts * counts.shape[-1] / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
    return {"moe_load_max": share.max(), "moe_load_min": share.min(),
            "moe_load_ratio": (counts.max(-1) / jnp.maximum(counts.min(-1), 1.0)).max(),
            "moe_balance_loss": stats.balance_loss.mean()}
