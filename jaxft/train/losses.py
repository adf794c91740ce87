"""Per-task losses. Each returns *sums* over the batch plus the weight they were summed over,

    loss_fn(model, batch, dropout_rng) -> (loss_sum, {"weight": w, <metric>_sum: ...})

so that gradient accumulation and multi-device reductions divide once, by the total weight, and give
exactly the large-batch result (a mean of means would not when micro-batches differ in weight).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def classification_loss(model, batch, dropout_rng):
    """Softmax cross-entropy of `logits [B, C]` against integer labels; padding rows have weight 0."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"], dropout_rng=dropout_rng)
    w = batch["weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(ce * w), {"weight": jnp.sum(w), "correct": jnp.sum(correct * w), "logits": logits}


LOSSES = {"sequence-classification": classification_loss}


def make_causal_lm_loss(aux_loss_coef: float = 0.0):
    """Next-token cross-entropy on the tokens whose `loss_mask` is 1 (plus, for MoE models, the
    sequence-wise balance loss × `aux_loss_coef`, summed over MoE layers).

    Position t predicts token t+1; a target counts when it is trained (`loss_mask`), real, and in the
    same packed document as its input (`segment_ids`; unpacked rows use the attention mask as their
    single segment, so padding is never a target). MoE models also report their router statistics:
    `moe_counts [layers, experts]` (tokens routed) and `moe_balance_loss`.
    """

    def causal_lm_loss(model, batch, dropout_rng):
        ids, seg = batch["input_ids"], batch.get("segment_ids", batch["attention_mask"])
        kw = dict(attention_mask=batch["attention_mask"], segment_ids=seg, dropout_rng=dropout_rng)
        stats = None
        if hasattr(model, "forward_with_router_stats"):
            logits, stats = model.forward_with_router_stats(ids, **kw)
        else:
            logits = model(ids, **kw)
        target_ok = (batch["loss_mask"][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        w = target_ok.astype(jnp.float32) * batch["weights"][:, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        loss_sum = jnp.sum(ce * w)
        aux = {"weight": jnp.sum(w), "tokens": jnp.sum(batch["attention_mask"] * batch["weights"][:, None]),
               "slots": jnp.asarray(ids.size, jnp.float32)}
        if stats is not None:
            # × the micro-batch's weight, so that dividing the summed loss by the total weight gives
            # mean CE + coef × balance loss, however the batch was split into micro-batches
            loss_sum = loss_sum + aux_loss_coef * stats.balance_loss.sum() * aux["weight"]
            aux.update(moe_counts=stats.counts, moe_balance_loss=stats.balance_loss.mean())
        return loss_sum, aux

    return causal_lm_loss


causal_lm_loss = make_causal_lm_loss()
LOSSES["causal-lm"] = causal_lm_loss
