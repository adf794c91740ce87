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


def causal_lm_loss(model, batch, dropout_rng):
    """Next-token cross-entropy on the tokens whose `loss_mask` is 1.

    Position t predicts token t+1; a target counts when it is trained (`loss_mask`), real, and in the
    same packed document as its input (`segment_ids`; unpacked rows use the attention mask as their
    single segment, so padding is never a target).
    """
    ids, seg = batch["input_ids"], batch.get("segment_ids", batch["attention_mask"])
    logits = model(ids, attention_mask=batch["attention_mask"], segment_ids=seg, dropout_rng=dropout_rng)
    target_ok = (batch["loss_mask"][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    w = target_ok.astype(jnp.float32) * batch["weights"][:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    return jnp.sum(ce * w), {"weight": jnp.sum(w), "tokens": jnp.sum(batch["attention_mask"] * batch["weights"][:, None]),
                             "slots": jnp.asarray(ids.size, jnp.float32)}


LOSSES["causal-lm"] = causal_lm_loss
