"""The train and eval steps: small pure functions of (state, batch), jitted once.

The train state is a plain pytree `{"step", "params", "opt_state", "rng"}` whose `params` are the
model's parameters keyed by their dotted NNX path (`bert.layers.0.query.kernel`). Inside the step the
NNX module is rebuilt from them (`nnx.merge`), so the model code stays object-oriented while the step
stays functional: buffers are donated and nothing syncs with the host.

Gradient accumulation splits the batch into `grad_accum` micro-batches, sums their loss and gradient
*sums* in a `lax.scan`, and divides once by the total weight: the update equals the large-batch one.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class Functional:
    """An NNX module split into a static graph and a flat `{path: array}` parameter dict."""

    def __init__(self, model: nnx.Module):
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        flat = nnx.to_flat_state(params)
        self.paths = {".".join(map(str, p)): p for p, _ in flat}
        self.params = {".".join(map(str, p)): v.get_value() for p, v in flat}
        self.axes = {".".join(map(str, p)): v.get_metadata().get("logical_axes") for p, v in flat}

    def module(self, params: dict[str, jax.Array]) -> nnx.Module:
        nested: dict = {}
        for key, value in params.items():
            node = nested
            *head, last = self.paths[key]
            for part in head:
                node = node.setdefault(part, {})
            node[last] = value
        return nnx.merge(self.graphdef, nested, self.rest)


def _split_micro(batch: dict, n: int) -> dict:
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(fn: Functional, loss_fn: Callable, tx: optax.GradientTransformation,
                    lr: optax.Schedule, grad_accum: int = 1) -> Callable:
    def loss_and_grad(params, batch, key):
        def f(p):
            loss_sum, aux = loss_fn(fn.module(p), batch, key)
            return loss_sum, {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
        return jax.value_and_grad(f, has_aux=True)(params)

    def step(state, batch):
        params = state["params"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if grad_accum == 1:
            (loss_sum, aux), grads = loss_and_grad(params, batch, key)
        else:
            def body(carry, xs):
                i, micro = xs
                (l, a), g = loss_and_grad(params, micro, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            (l0, a0), g0 = jax.eval_shape(loss_and_grad, params, jax.tree.map(
                lambda x: x[0], _split_micro(batch, grad_accum)), key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
            (loss_sum, aux, grads), _ = jax.lax.scan(
                body, zeros, (jnp.arange(grad_accum), _split_micro(batch, grad_accum)))
        weight = jnp.maximum(aux["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss, grad_norm = loss_sum / weight, optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient skips the update: params and optimizer state stay as they were
        # (the step counter and the data still advance), and the consecutive-bad-step count grows.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(opt_state, state["opt_state"]), "rng": state["rng"],
                     "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1)}
        # Per-step loss and norms, plus the raw sums of the loss function (weight, correct, tokens, ...)
        # so that logging windows can be reduced exactly.
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "lr": lr(state["step"]),
                   "finite": finite.astype(jnp.float32), "bad_steps": new_state["bad_steps"]}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(fn: Functional, loss_fn: Callable) -> Callable:
    """`(params, batch) -> (loss_sum, aux)`, deterministic (no dropout)."""
    return jax.jit(lambda params, batch: loss_fn(fn.module(params), batch, None))


def init_state(fn: Functional, tx: optax.GradientTransformation, seed: int) -> dict:
    params = fn.params
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params),
            "rng": jax.random.key_data(jax.random.key(seed)), "bad_steps": jnp.zeros((), jnp.int32)}
