"""Per-task losses. Each returns *sums* over the batch plus the weight they were summed over,

    loss_fn(model, batch, dropout_rng) -> (loss_sum, {"weight": w, <metric>_sum: ...})

so that gradient accumulation and multi-device reductions divide once, by the total weight, and give
exactly the large-batch result (a mean of means would not when micro-batches differ in weight).

Label smoothing (`train.label_smoothing` = ε) trains on (1 − ε)·CE + ε·mean over the C classes (the
vocabulary, for a causal LM) of −log p, as `torch.nn.functional.cross_entropy(label_smoothing=ε)`. Tasks
evaluate with the plain CE (ε = 0): eval loss and perplexity stay comparable across runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxft.config import LOSS_CHUNK_TOKENS
from jaxft.models.layers import linear_grads
from jaxft.parallel import constrain

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Per-position `(1 − ε)·(−log p[label]) + ε·mean_c(−log p_c)` over the last axis of `logits`."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def weighted_cross_entropy_sum(logits: Array, labels: Array, weights: Array, label_smoothing: float = 0.0) -> Array:
    """`Σ weights · cross_entropy(logits, labels, ε)` (a float32 scalar) whose backward pass holds only the
    gradient of the logits, `dL/dlogits = w · (softmax(logits) − target)` with `target = (1 − ε)·onehot + ε/C`,
    computed in the forward pass. Plain autodiff of the same sum keeps the float32 log-probabilities (or
    the logits) for the backward and builds the softmax and the gradient there: for an LM head that is
    two or three `[B, T, vocab]` arrays live at once where this keeps one, in the logits' dtype."""
    return _ce_sum(logits, labels, weights, label_smoothing)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce_sum(logits, labels, weights, label_smoothing):
    return _ce_sum_fwd(logits, labels, weights, label_smoothing)[0]


def _ce_sum_fwd(logits, labels, weights, label_smoothing):
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
    ce = lse - picked
    if label_smoothing:
        ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - x.mean(-1))
    w = weights.astype(jnp.float32)
    onehot = jnp.arange(x.shape[-1]) == labels[..., None]
    target = (1.0 - label_smoothing) * onehot + label_smoothing / x.shape[-1]
    grad = ((jnp.exp(x - lse[..., None]) - target) * w[..., None]).astype(logits.dtype)
    return jnp.sum(ce * w), grad


def _ce_sum_bwd(label_smoothing, grad, g):
    return grad * g.astype(grad.dtype), None, None   # labels and weights are data: no gradient


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def make_classification_loss(label_smoothing: float = 0.0):
    """Softmax cross-entropy (label-smoothed by ε) of `logits [B, C]` against integer labels; padding rows
    have weight 0."""

    def classification_loss(model, batch, dropout_rng):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], dropout_rng=dropout_rng)
        w = batch["weights"]
        ce = cross_entropy(logits, batch["labels"], label_smoothing)
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        return jnp.sum(ce * w), {"weight": jnp.sum(w), "correct": jnp.sum(correct * w), "logits": logits}

    return classification_loss


classification_loss = make_classification_loss()
LOSSES = {"sequence-classification": classification_loss}


def chunked_cross_entropy(model, h: Array, targets: Array, weights: Array, chunk_tokens: int,
                          label_smoothing: float = 0.0) -> Array:
    """`Σ weights · CE(logits, targets)` with `logits = model.logits(h)`, computed over chunks of the sequence
    so that `[B, T, V]` logits never exist: `h [B, T, D]`, `targets`, `weights [B, T]`.

    Each chunk takes `c = max(1, chunk_tokens // B)` positions of every row (the batch axis stays whole, so
    its sharding is kept); its logits `[B, c, V]` are made, reduced to the weighted CE sum and dropped.
    When the head is one matrix (`model.head_matrix()`: tied, or no bias or adapter) the gradient is
    taken in the same pass (`head_cross_entropy_sum`): nothing of the logits is kept and nothing is
    recomputed. Otherwise the loop is a `jax.lax.scan` whose body runs under `jax.checkpoint`, so the
    backward pass recomputes each chunk's logits instead of keeping them: O(B·c·V) memory instead of
    O(B·T·V); and when one chunk covers the sequence (`c ≥ T`, or `chunk_tokens` 0) it is the plain
    computation.
    """
    B, T = targets.shape
    c = T if chunk_tokens <= 0 else min(T, max(1, chunk_tokens // B))
    head = getattr(model, "head_matrix", lambda: None)()
    if head is not None:
        einsum, w = head
        return head_cross_entropy_sum(einsum, c, label_smoothing, h, w, targets, weights)
    if c >= T:
        return weighted_cross_entropy_sum(model.logits(h), targets, weights, label_smoothing)

    @jax.checkpoint
    def body(total, xs):
        h_c, t_c, w_c = xs
        return total + weighted_cross_entropy_sum(model.logits(h_c), t_c, w_c, label_smoothing), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunks((h, targets, weights), c))
    return total


def _chunks(xs, c: int):
    """Each `[B, T, ...]` array → `[n, B, c, ...]` (n = ⌈T / c⌉; the tail of the last chunk is zeros: zero
    hidden states, weight 0)."""
    def split(x):
        B, T = x.shape[:2]
        n = -(-T // c)
        x = jnp.pad(x, [(0, 0), (0, n * c - T)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, c, *x.shape[2:]), 1, 0)

    return tuple(split(x) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def head_cross_entropy_sum(einsum: str, c: int, label_smoothing: float, h: Array, w: Array, targets: Array,
                           weights: Array) -> Array:
    """`Σ weights · CE(einsum(h, w), targets)` for an LM head that is one product (`w`: `[V, D]` tied or
    `[D, V]`), in chunks of `c` positions per row, whose forward pass also computes the gradient:

        dlogits = weights · (softmax(logits) − target),   dh = dlogits · Wᵀ,   dW = Σ_chunks hᵀ · dlogits

    so the backward only scales `dh [B, T, D]` and `dW` by the incoming cotangent. No `[B, T, V]` array
    is kept (one chunk's logits live at a time), and unlike a checkpointed chunk loop nothing is
    recomputed: the three products of the head run once each, as without chunks."""
    return _head_ce(einsum, c, label_smoothing, h, w, targets, weights, grads=False)


def _head_ce(einsum, c, label_smoothing, h, w, targets, weights, grads: bool):
    """The loss (and, with `grads`, `(loss, (dh, dw))`) of `head_cross_entropy_sum`."""
    T = targets.shape[1]
    w_c = w.astype(h.dtype)

    def chunk(h_c, t_c, wt_c):
        logits = constrain(jnp.einsum(einsum, h_c, w_c).astype(jnp.float32), ("batch", "length", "vocab"))
        ce, dlogits = _ce_sum_fwd(logits, t_c, wt_c, label_smoothing)
        if not grads:
            return ce, None
        return ce, linear_grads(einsum, h_c, w_c, dlogits.astype(h.dtype))

    if c >= T:
        ce, d = chunk(h, targets, weights)
        return (ce, d) if grads else ce

    def body(carry, xs):
        total, dw = carry
        ce, d = chunk(*xs)
        if not grads:
            return (total + ce, dw), None
        return (total + ce, dw + d[1].astype(jnp.float32)), d[0]

    dw0 = jnp.zeros(w.shape, jnp.float32) if grads else jnp.zeros((), jnp.float32)
    (total, dw), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), _chunks((h, targets, weights), c))
    if not grads:
        return total
    B = h.shape[0]
    dh = jnp.moveaxis(dh, 0, 1).reshape(B, -1, *h.shape[2:])[:, :T]
    return total, (dh, dw)


def _head_ce_fwd(einsum, c, label_smoothing, h, w, targets, weights):
    total, (dh, dw) = _head_ce(einsum, c, label_smoothing, h, w, targets, weights, grads=True)
    return total, (dh, dw.astype(w.dtype))


def _head_ce_bwd(einsum, c, label_smoothing, res, g):
    dh, dw = res
    return dh * g.astype(dh.dtype), dw * g.astype(dw.dtype), None, None   # targets, weights: data


head_cross_entropy_sum.defvjp(_head_ce_fwd, _head_ce_bwd)


def make_causal_lm_loss(aux_loss_coef: float = 0.0, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                        label_smoothing: float = 0.0):
    """Next-token cross-entropy on the tokens whose `loss_mask` is 1 (plus, for MoE models, the
    sequence-wise balance loss × `aux_loss_coef`, summed over MoE layers).

    Position t predicts token t+1; a target counts when it is trained (`loss_mask`), real, and in the
    same packed document as its input (`segment_ids`; unpacked rows use the attention mask as their
    single segment, so padding is never a target). MoE models also report their router statistics:
    `moe_counts [layers, experts]` (tokens routed) and `moe_balance_loss`. The head and the loss run
    over chunks of about `chunk_tokens` tokens (`train.loss_chunk_tokens`, `chunked_cross_entropy`);
    `label_smoothing` smooths the CE over the vocabulary.
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
        loss_sum = chunked_cross_entropy(model, h, targets, jnp.pad(w, ((0, 0), (0, 1))), chunk_tokens,
                                         label_smoothing)
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
