"""optax chains and learning-rate schedules.

    [zero frozen slices' gradients] → clip_by_global_norm(optim.clip_norm) → adamw(schedule, b1, b2, eps,
    weight_decay, mask) → [× layer-wise lr decay] → [frozen slices' updates −0.0]

Weight decay is decoupled (AdamW) and, as in the Hugging Face convention, applies only to matrices
(`kernel`, `embedding`, LoRA's `lora.a` / `lora.b`), never to biases or normalisation scales. What
trains at all is decided before the optimizer (`jaxft.train.model.trainable_filter`): the chain only
ever sees trainable parameters. Schedules match `transformers`'
`get_{linear,cosine,constant}_schedule_with_warmup`: update k uses lr·f(k), rising linearly from 0
over the warmup, then decaying to 0 at the last step (linear, cosine) or staying flat (constant);
`cosine_restarts` is `get_cosine_with_hard_restarts_schedule_with_warmup` (`optim.cycles` cosine decays
to 0, each restarting at lr) and `polynomial` is `get_polynomial_decay_schedule_with_warmup`
(lr → `optim.end_lr` as (1 − progress)^`optim.power`).

Layer-wise decay (`optim.layer_decay` = d) multiplies each parameter's update, weight decay included, by
d^(L + 1 − depth) (`jaxft.layerwise`): the head 1, the last block d, block 0 d^L, the embeddings
d^(L+1): the same as torch AdamW param groups with those learning rates. Frozen slices of stacked
(scanned) blocks (`model.freeze_layers` with `model.scan_layers`) cannot be filtered out of the
trainable set, so their gradients are zeroed before clipping (the global norm is the trainable one's,
Adam's moments stay 0) and their updates are −0.0, which leaves every value, ±0 included, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.config import OptimSection

DECAYED = ("kernel", "embedding", "lora.a", "lora.b")


def warmup_steps(cfg: OptimSection, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(round(cfg.warmup_ratio * total_steps))


def schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    warm = warmup_steps(cfg, total_steps)
    if cfg.schedule in ("cosine_restarts", "polynomial"):
        return _hf_schedule(cfg, total_steps, warm)
    rise = optax.linear_schedule(0.0, cfg.lr, warm) if warm else None
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, max(1, total_steps - warm))
    else:
        after = optax.cosine_decay_schedule(cfg.lr, max(1, total_steps - warm))
    return optax.join_schedules([rise, after], [warm]) if rise else after


def _hf_schedule(cfg: OptimSection, total: int, warm: int) -> optax.Schedule:
    """`cosine_restarts` and `polynomial`, written as `transformers` writes them. The position in a cosine
    cycle is computed in integers, `((k − warm)·cycles mod (total − warm)) / (total − warm)`, so a restart
    lands exactly on its step (float32 `progress·cycles % 1` can fall just short of 1 there)."""
    span = max(1, total - warm)

    def lr(count):
        k = jnp.asarray(count, jnp.int32)
        rise = cfg.lr * k.astype(jnp.float32) / max(1, warm)
        done = jnp.maximum(k - warm, 0)
        if cfg.schedule == "cosine_restarts":
            cycle = jnp.mod(done * cfg.cycles, span).astype(jnp.float32) / span
            after = jnp.where(done >= span, 0.0, cfg.lr * 0.5 * (1.0 + jnp.cos(jnp.pi * cycle)))
        else:
            left = jnp.clip(span - done, 0, span).astype(jnp.float32) / span
            after = (cfg.lr - cfg.end_lr) * left ** cfg.power + cfg.end_lr
        return jnp.where(k < warm, rise, after)

    return lr


def decay_mask(params):
    """True for leaves named `...kernel`, `...embedding` or `...lora.a/b` (matrices), False for biases and
    norm scales.

    Works on nested dicts and on jaxft's flat `{"a.b.kernel": array}` parameter dicts alike.
    """
    def decayed(path) -> bool:
        name = _name(path)
        return any(name == d or name.endswith("." + d) for d in DECAYED)

    return jax.tree_util.tree_map_with_path(lambda path, _: decayed(path), params)


def _name(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "name", ""))) for p in path)


def scale_by_layer(layers, decay: float) -> optax.GradientTransformation:
    """Multiply each parameter's update by `layers.decay_scale` (`jaxft.layerwise.LayerMap`), per slice of a
    stacked one."""
    def update(updates, state, params=None):
        def scale(path, u):
            s = layers.decay_scale(_name(path), u.shape, decay)
            return u * jnp.asarray(s, u.dtype)
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def hold_slices(frozen: dict[str, np.ndarray], fill: float) -> optax.GradientTransformation:
    """Replace the entries of the parameters in `frozen` (path → bool mask broadcastable to the parameter,
    True = frozen) by `fill`: 0.0 for gradients, −0.0 for updates (x + (−0.0) is x for every x)."""
    def update(updates, state, params=None):
        def hold(path, u):
            mask = frozen.get(_name(path))
            return u if mask is None else jnp.where(jnp.asarray(mask), jnp.asarray(fill, u.dtype), u)
        return jax.tree_util.tree_map_with_path(hold, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimSection, total_steps: int, layers=None,
                   frozen_slices: dict[str, np.ndarray] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The chain above, over the trainable parameters. `layers`: the model's `jaxft.layerwise.LayerMap`
    (needed by `optim.layer_decay`); `frozen_slices`: path → per-slice mask of stacked parameters partly frozen."""
    lr = schedule(cfg, total_steps)
    chain = []
    if frozen_slices:
        chain.append(hold_slices(frozen_slices, 0.0))
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    if cfg.layer_decay is not None:
        if layers is None:
            raise ValueError("optim.layer_decay needs the model's layers (make_optimizer(layers=LayerMap...))")
        chain.append(scale_by_layer(layers, cfg.layer_decay))
    if frozen_slices:
        chain.append(hold_slices(frozen_slices, -0.0))
    return optax.chain(*chain), lr
