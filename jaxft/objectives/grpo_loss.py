"""GRPO's advantages and loss, as TRL 1.16's `GRPOTrainer` computes them (Shao et al. 2024; DAPO, Dr. GRPO).

For a group of G completions of one prompt with total rewards r (Σ weight · reward):

    A = (r − mean_group(r)) / (std(r) + 1e-4)       std: the group's (scale_rewards=group, unbiased as
                                                     torch.std), the whole batch's (batch), or none (no division)

Per completion token t, with log-probabilities logp (current policy), old (at rollout time; = logp, detached,
when each rollout is used once), ref (the reference model), ratio ρ = exp(logp − old):

    loss_t = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·(exp(ref − logp) − (ref − logp) − 1)

aggregated over the completion tokens m (a mask) as `loss_type` says:

    grpo      mean over sequences of Σ_t loss_t·m_t / Σ_t m_t
    bnpo      Σ loss·m / Σ m                        (TRL: per micro-batch; here over the whole batch)
    dapo      Σ loss·m / Σ m over the whole batch   (TRL: the accumulated generation batch, the same)
    dr_grpo   Σ loss·m / (rows · max_completion_length)

Every aggregation is a sum divided by a weight, so the loss returns `(sum, {"weight": ...})` as every jaxft
loss does: gradient accumulation sums micro-batches and divides once, and equals the one-batch loss exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import GRPOSection
from jaxft.models.lora import adapters_off
from jaxft.train.losses import _chunks

ADV_EPS = 1e-4   # TRL's: A = (r − mean) / (std + 1e-4)
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def advantages(rewards: np.ndarray, num_generations: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """`(A [N], std [N])` in float32 from total rewards `[N]`, rows grouped by `num_generations` consecutive
    rows (a prompt's completions); `std` is the one A was divided by (or would have been, for `none`)."""
    r = np.asarray(rewards, np.float32)
    groups = r.reshape(-1, num_generations)
    mean = np.repeat(groups.mean(axis=1, dtype=np.float32), num_generations).astype(np.float32)
    if scale == "batch":
        std = np.full_like(r, r.std(ddof=1, dtype=np.float32) if r.size > 1 else 0.0)
    else:
        std = np.repeat(groups.std(axis=1, ddof=1, dtype=np.float32), num_generations).astype(np.float32)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + np.float32(ADV_EPS))
    return adv.astype(np.float32), std


def token_logps(model, h, targets, chunk_tokens: int):
    """`[B, T]` log p(targets[b, t]) from hidden states `h [B, T, D]` through the model's head, in chunks of
    about `chunk_tokens` tokens (every row's next `c` positions) so that `[B, T, vocab]` logits never exist;
    each chunk's logits are recomputed in the backward pass (`jax.checkpoint`) rather than kept."""
    B, T = targets.shape
    c = T if chunk_tokens <= 0 else min(T, max(1, chunk_tokens // B))

    def chunk(h_c, t_c):
        logp = jax.nn.log_softmax(model.logits(h_c).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]

    if c >= T:
        return chunk(h, targets)

    @jax.checkpoint
    def body(_, xs):
        return None, chunk(*xs)

    _, out = jax.lax.scan(body, None, _chunks((h, targets), c))   # [n, B, c]
    return jnp.moveaxis(out, 0, 1).reshape(B, -1)[:, :T]


def sequence_token_logps(model, batch: dict, chunk_tokens: int, dropout_rng=None):
    """`[B, T]`: at position t, log p of token t + 1 of each right-padded row (0 past the row's end)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    h, _ = model.hidden(ids, attention_mask=attention, segment_ids=attention, dropout_rng=dropout_rng,
                        right_padded=True)
    return token_logps(model, h, jnp.pad(ids[:, 1:], ((0, 0), (0, 1))), chunk_tokens)


def per_token_terms(g: GRPOSection, logp, old, adv, ref=None) -> dict:
    """The per-token loss `[B, T]` and the indicators / KL TRL logs, for advantages `adv [B]`."""
    a = adv[:, None]
    ratio = jnp.exp(logp - old)
    eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
    clipped = jnp.clip(ratio, 1 - g.epsilon, 1 + eps_high)
    loss = -jnp.minimum(ratio * a, clipped * a)
    out = {"loss": loss}
    if g.beta:
        d = ref - logp
        out["kl"] = jnp.exp(d) - d - 1
        out["loss"] = loss + g.beta * out["kl"]
    low = (ratio < 1 - g.epsilon) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    out.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high})
    return out


def aggregate(g: GRPOSection, loss, mask, rows):
    """`(Σ, weight)` of the per-token `loss [B, T]` over the completion-token `mask [B, T]` (row weights already
    in it) for `g.loss_type`; `rows [B]` are the row weights (0 for padding rows)."""
    if g.loss_type == "grpo":
        per_row = jnp.sum(loss * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.sum(per_row * rows), jnp.sum(rows)
    total = jnp.sum(loss * mask)
    if g.loss_type == "dr_grpo":
        return total, jnp.sum(rows) * g.max_completion_length
    return total, jnp.sum(mask)   # bnpo, dapo


def grpo_sums(g: GRPOSection, logp, old, adv, mask, rows, ref=None) -> tuple:
    """`(Σ loss, {"weight", "completion_tokens", "kl"?, clip ratios})`: the loss as a sum and its weight, and
    the metrics as sums over completion tokens (divided by `completion_tokens` when logged)."""
    terms = per_token_terms(g, logp, old, adv, ref)
    total, weight = aggregate(g, terms["loss"], mask, rows)
    sg = jax.lax.stop_gradient
    aux = {"weight": weight, "completion_tokens": jnp.sum(mask), "sequences": jnp.sum(rows)}
    for k in CLIP_METRICS + (("kl",) if g.beta else ()):
        aux[k] = jnp.sum(sg(terms[k].astype(jnp.float32)) * mask)
    return total, aux


def make_grpo_loss(g: GRPOSection, chunk_tokens: int):
    """`(model, batch, dropout_rng, reference=None) -> (Σ loss, sums)` on a batch of right-padded
    prompt + completion rows: `loss_mask` 1 on completion tokens, `advantages [B]`, `weights [B]`, and with
    μ > 1 `old_logps [B, T]` (the policy's at rollout time; else the current ones, detached). With β > 0 the
    reference log-probs come from `reference` (a frozen copy, full fine-tuning) or from the model with its
    LoRA adapters off, under `stop_gradient`."""

    def grpo_loss(model, batch, dropout_rng, reference=None):
        logp = sequence_token_logps(model, batch, chunk_tokens, dropout_rng)
        rows = batch["weights"]
        # position t scores token t + 1: a completion token there is trained
        mask = jnp.pad(batch["loss_mask"][:, 1:], ((0, 0), (0, 1))).astype(jnp.float32) * rows[:, None]
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
        ref = None
        if g.beta:
            if reference is None:
                with adapters_off():
                    ref = sequence_token_logps(model, batch, chunk_tokens)
            else:
                ref = sequence_token_logps(reference, batch, chunk_tokens)
            ref = jax.lax.stop_gradient(ref)
        return grpo_sums(g, logp, old, batch["advantages"], mask, rows, ref)

    return grpo_loss
