"""optax chains and learning-rate schedules.

    clip_by_global_norm(optim.clip_norm) → adamw(schedule, b1, b2, eps, weight_decay, mask)

Weight decay is decoupled (AdamW) and, as in the Hugging Face convention, applies only to matrices
(`kernel`, `embedding`, LoRA's `lora.a` / `lora.b`), never to biases or normalisation scales. What
trains at all is decided before the optimizer (`jaxft.train.model.trainable_filter`): the chain only
ever sees trainable parameters. Schedules match `transformers`'
`get_{linear,cosine,constant}_schedule_with_warmup`: update k uses lr·f(k), rising linearly from 0
over the warmup, then decaying to 0 at the last step (linear, cosine) or staying flat (constant).
"""

from __future__ import annotations

import jax
import optax

from jaxft.config import OptimSection

DECAYED = ("kernel", "embedding", "lora.a", "lora.b")


def warmup_steps(cfg: OptimSection, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(round(cfg.warmup_ratio * total_steps))


def schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    warm = warmup_steps(cfg, total_steps)
    rise = optax.linear_schedule(0.0, cfg.lr, warm) if warm else None
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, max(1, total_steps - warm))
    else:
        after = optax.cosine_decay_schedule(cfg.lr, max(1, total_steps - warm))
    return optax.join_schedules([rise, after], [warm]) if rise else after


def decay_mask(params):
    """True for leaves named `...kernel`, `...embedding` or `...lora.a/b` (matrices), False for biases and
    norm scales.

    Works on nested dicts and on jaxft's flat `{"a.b.kernel": array}` parameter dicts alike.
    """
    def decayed(path) -> bool:
        keys = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        name = ".".join(keys)
        return any(name == d or name.endswith("." + d) for d in DECAYED)

    return jax.tree_util.tree_map_with_path(lambda path, _: decayed(path), params)


def make_optimizer(cfg: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The chain above, over the trainable parameters."""
    lr = schedule(cfg, total_steps)
    chain = []
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain), lr
