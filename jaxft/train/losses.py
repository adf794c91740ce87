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
