"""Per-task losses. Each returns *sums* over the batch plus the weight they were summed over,

    loss_fn(model, batch, dropout_rng) -> (loss_sum, {"weight": w, <metric>_sum: ...})

so that gradient accumulation and multi-device reductions divide once, by the total weight, and give
exactly the large-batch result (a mean of means would not when micro-batches differ in weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxft.config import LOSS_CHUNK_TOKENS

Array = jax.Array


def classification_loss(model, batch, dropout_rng):
    """Softmax cross-entropy of `logits [B, C]` against integer labels; padding rows have weight 0."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"], dropout_rng=dropout_rng)
    w = batch["weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(ce * w), {"weight": jnp.sum(w), "correct": jnp.sum(correct * w), "logits": logits}


LOSSES = {"sequence-classification": classification_loss}


def chunked_cross_entropy(model, h: Array, targets: Array, weights: Array, chunk_tokens: int) -> Array:
    """`Σ weights · CE(logits, targets)` with `logits = model.logits(h)`, computed over chunks of the sequence
    so that `[B, T, V]` logits never exist: `h [B, T, D]`, `targets`, `weights [B, T]`.

    Each chunk takes `c = max(1, chunk_tokens // B)` positions of every row (the batch axis stays whole, so
    its sharding is kept); its logits `[B, c, V]` are made, reduced to the weighted CE sum and dropped.
    The loop is a `jax.lax.scan` whose body runs under `jax.checkpoint`, so the backward pass recomputes
    each chunk's logits instead of keeping them: O(B·c·V) memory instead of O(B·T·V). When one chunk covers
    the sequence (`c ≥ T`, or `chunk_tokens` 0) it is the plain computation.
    """
    B, T = targets.shape
    c = T if chunk_tokens <= 0 else min(T, max(1, chunk_tokens // B))
    if c >= T:
        ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(h), targets)
        return jnp.sum(ce * weights)
    n = -(-T // c)
    pad = n * c - T   # the tail of the last chunk: zero hidden states, weight 0

    def chunks(x):  # [B, T, ...] → [n, B, c, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, c, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(total, xs):
        h_c, t_c, w_c = xs
        ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(h_c), t_c)
        return total + jnp.sum(ce * w_c), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(h), chunks(targets), chunks(weights)))
    return total


def make_causal_lm_loss(aux_loss_coef: float = 0.0, chunk_tokens: int = LOSS_CHUNK_TOKENS):
    """Next-token cross-entropy on the tokens whose `loss_mask` is 1 (plus, for MoE models, the
    sequence-wise balance loss × `aux_loss_coef`, summed over MoE layers).

    Position t predicts token t+1; a target counts when it is trained (`loss_mask`), real, and in the
    same packed document as its input (`segment_ids`; unpacked rows use the attention mask as their
    single segment, so padding is never a target). MoE models also report their router statistics:
    `moe_counts [layers, experts]` (tokens routed) and `moe_balance_loss`. The head and the loss run
    over chunks of about `chunk_tokens` tokens (`train.loss_chunk_tokens`, `chunked_cross_entropy`).
    """

    def causal_lm_loss(model, batch, dropout_rng):
        ids, seg = batch["input_ids"], batch.get("segment_ids", batch["attention_mask"])
        # jaxft.data fills every row from position 0, so its padding is on the right
        h, stats = model.hidden(ids, attention_mask=batch["attention_mask"], segment_ids=seg,
                                dropout_rng=dropout_rng, right_padded=True)
        target_ok = (batch["loss_mask"][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        w = target_ok.astype(jnp.float32) * batch["weights"][:, None]
        # position t's target is token t+1; the last position has none (weight 0)
        targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
        loss_sum = chunked_cross_entropy(model, h, targets, jnp.pad(w, ((0, 0), (0, 1))), chunk_tokens)
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
