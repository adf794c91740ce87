"""The train and eval steps: small pure functions of (state, batch), jitted once.

The train state is a plain pytree `{"step", "params", "opt_state", "rng"}` whose `params` are the
model's parameters keyed by their dotted NNX path (`bert.layers.0.query.kernel`). Inside the step the
NNX module is rebuilt from them (`nnx.merge`), so the model code stays object-oriented while the step
stays functional: buffers are donated and nothing syncs with the host.

Sharding: the parameters keep the `NamedSharding`s they were loaded with (`jaxft.parallel` rules);
every optimizer-state leaf that mirrors a parameter (Adam's moments) gets that parameter's sharding, the
rest (counts, the RNG key) is replicated, and the step's outputs are pinned to the same shardings, so
FSDP-sharded state stays sharded from step to step. The step is traced with the mesh active, which
turns the models' `parallel.constrain` calls on.

Gradient accumulation splits the batch into `grad_accum` micro-batches, sums their loss and gradient
*sums* in a `lax.scan`, and divides once by the total weight: the update equals the large-batch one.
Micro-batch j takes rows j, j+n, j+2n, ... of the batch, so each device's micro-batch rows are already
on it (a contiguous split would move rows between devices).

An objective may hold a frozen second model beside the train state (a preference objective's reference,
`jaxft.objectives.preference`): a `Functional` whose variables are all frozen. Its arrays are passed to the jitted
steps as an argument of their own, like the model's frozen ones (never donated, never in the optimizer), and
the loss receives the rebuilt module as a fourth argument: `loss_fn(model, batch, rng, frozen_model)`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from jaxft import parallel
from jaxft.compilation import jit_options
from jaxft.models.lora import adapter_dropout


class Functional:
    """An NNX module split into a static graph, its trainable parameters and its frozen ones, each a flat
    `{path: array}` dict.

    What trains is decided by variable type through the NNX filter `trainable` (default: every
    `nnx.Param`; with LoRA the adapters' `LoRAParam`s and a trained head, see `jaxft.lora`); every other
    variable is frozen: other parameters, a quantised base, buffers such as DeepSeek-V3's router bias. The
    train step differentiates with respect to `params` only, so a frozen base gets no gradient, no
    optimizer state and is never donated: it is passed to the jitted steps as an argument of its own
    (`frozen`), not closed over (which would embed it in the program as a constant).

    `mesh` is the mesh the parameters are placed on (None for unsharded ones).
    """

    def __init__(self, model: nnx.Module, trainable=nnx.Param):
        self.graphdef, params, frozen, self.rest = nnx.split(model, trainable, nnx.Variable, ...)
        self.paths, self.params, self.axes = {}, {}, {}
        self.frozen: dict[str, jax.Array] = {}
        for state, out in ((params, self.params), (frozen, self.frozen)):
            for p, v in nnx.to_flat_state(state):
                key = ".".join(map(str, p))
                self.paths[key] = p
                out[key] = v.get_value()
                self.axes[key] = v.get_metadata().get("logical_axes")
        self.mesh = parallel.mesh_of({**self.params, **self.frozen})

    def module(self, params: dict[str, jax.Array], frozen: dict[str, jax.Array] | None = None) -> nnx.Module:
        """The module with these trainable parameters (and frozen ones, default: the model's own)."""
        nested: dict = {}
        for key, value in {**(self.frozen if frozen is None else frozen), **params}.items():
            node = nested
            *head, last = self.paths[key]
            for part in head:
                node = node.setdefault(part, {})
            node[last] = value
        return nnx.merge(self.graphdef, nested, self.rest)

    def param_shardings(self, mesh=None) -> dict[str, NamedSharding]:
        """Each parameter's sharding by its logical axes on `mesh` (default: the parameters' own)."""
        mesh = mesh or self.mesh
        return {k: parallel.sharding(self.axes[k], v.shape, mesh) for k, v in self.params.items()}


def opt_state_shardings(opt_shapes, params: dict, param_shardings: dict, mesh):
    """Shardings for an optimizer state (a pytree of `ShapeDtypeStruct`s from `jax.eval_shape(tx.init)`).

    A leaf reached through a dict key that names a parameter, with that parameter's shape, mirrors it
    (Adam's `mu`/`nu`) and takes its sharding; every other leaf (step counts) is replicated.
    """
    rep = parallel.replicated(mesh)

    def pick(path, leaf):
        for entry in reversed(path):
            key = getattr(entry, "key", None)
            if isinstance(key, str) and key in params and tuple(params[key].shape) == tuple(leaf.shape):
                return param_shardings[key]
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def state_shardings(fn: Functional, tx: optax.GradientTransformation, mesh=None) -> dict | None:
    """Shardings of the whole train state on `mesh` (default: the parameters' mesh); None unsharded."""
    mesh = mesh or fn.mesh
    if mesh is None:
        return None
    ps = fn.param_shardings(mesh)
    opt_shapes = jax.eval_shape(tx.init, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in fn.params.items()})
    rep = parallel.replicated(mesh)
    return {"step": rep, "params": ps, "opt_state": opt_state_shardings(opt_shapes, fn.params, ps, mesh),
            "rng": rep, "bad_steps": rep}


def _split_micro(batch: dict, n: int) -> dict:
    """`[B, ...]` → `[n, B/n, ...]` with micro-batch j = rows j, j+n, ... (no rows change device)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def _constrain_batch(batch: dict) -> dict:
    return jax.tree.map(lambda x: parallel.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), batch)


def _second(frozen_model: Functional | None, arrays: dict) -> tuple:
    """The extra loss argument: the frozen second model rebuilt from its arrays, or nothing."""
    return () if frozen_model is None else (frozen_model.module({}, arrays),)


def make_train_step(fn: Functional, loss_fn: Callable, tx: optax.GradientTransformation,
                    lr: optax.Schedule, grad_accum: int = 1, frozen_model: Functional | None = None) -> Callable:
    def loss_and_grad(params, frozen, batch, key):
        frozen, held = frozen
        def f(p):
            with adapter_dropout(key):  # LoRA dropout (training only; evaluation passes no key)
                loss_sum, aux = loss_fn(fn.module(p, frozen), batch, key, *_second(frozen_model, held))
            return loss_sum, {k: v for k, v in aux.items() if k != "logits"}  # sums only, no per-example outputs
        return jax.value_and_grad(f, has_aux=True)(params)

    def train_step(state, batch, frozen):  # (the jitted program's name in compile logs and counts)
        with parallel.activate(fn.mesh):
            return _step(state, batch, frozen)

    def _step(state, batch, frozen):
        params = state["params"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if grad_accum == 1:
            (loss_sum, aux), grads = loss_and_grad(params, frozen, batch, key)
        else:
            def body(carry, xs):
                i, micro = xs
                (l, a), g = loss_and_grad(params, frozen, _constrain_batch(micro), jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            micros = _split_micro(batch, grad_accum)
            (l0, a0), g0 = jax.eval_shape(loss_and_grad, params, frozen, jax.tree.map(lambda x: x[0], micros), key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
            (loss_sum, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micros))
        weight = jnp.maximum(aux["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss, grad_norm = loss_sum / weight, optax.tree.norm(grads)

        def update(_):
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            # The state keeps its dtypes: with bfloat16 parameters (model.param_dtype) the float32 gradients
            # would otherwise turn Adam's moments to float32 after step 1 (a second compile, an inexact resume).
            opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state["opt_state"])
            return optax.apply_updates(params, updates), opt_state

        # A non-finite loss or gradient skips the update: params and optimizer state stay as they were
        # (the step counter and the data still advance), and the consecutive-bad-step count grows. A `cond`,
        # not a `where` per leaf: that re-read and re-wrote every parameter and moment each step (~7% of a
        # BERT step on CPU); the skipped branch runs only when it is taken.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_params, opt_state = jax.lax.cond(finite, update, lambda _: (params, state["opt_state"]), None)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": state["rng"],
                     "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1)}
        # Per-step loss and norms, plus the raw sums of the loss function (weight, correct, tokens, ...)
        # so that logging windows can be reduced exactly.
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "lr": lr(state["step"]),
                   "finite": finite.astype(jnp.float32), "bad_steps": new_state["bad_steps"]}
        return new_state, metrics

    shardings = state_shardings(fn, tx)
    # The train state is donated (updated in place); the frozen parameters are read, never donated.
    if shardings is None:
        jitted = jax.jit(train_step, donate_argnums=0, **jit_options())
    else:
        jitted = jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, None), **jit_options())
    return _with_frozen(jitted, fn, frozen_model)


def make_eval_step(fn: Functional, loss_fn: Callable, frozen_model: Functional | None = None) -> Callable:
    """`(params, batch) -> (loss_sum, aux)`, deterministic (no dropout)."""
    def eval_step(params, batch, frozen):
        frozen, held = frozen
        with parallel.activate(fn.mesh):
            return loss_fn(fn.module(params, frozen), batch, None, *_second(frozen_model, held))

    return _with_frozen(jax.jit(eval_step, **jit_options()), fn, frozen_model)


def _with_frozen(jitted: Callable, fn: Functional, frozen_model: Functional | None = None) -> Callable:
    """`f(a, batch)` calling `jitted(a, batch, (fn.frozen, frozen model's arrays))`; `.jitted` and `.lower`
    reach the jitted one."""
    def frozen():
        return fn.frozen, {} if frozen_model is None else frozen_model.frozen

    def call(a, batch):
        return jitted(a, batch, frozen())

    call.jitted = jitted
    call.lower = lambda a, batch: jitted.lower(a, batch, frozen())
    call.fn = fn   # the policy it runs: an online objective's evaluation samples from it
    return call


def init_state(fn: Functional, tx: optax.GradientTransformation, seed: int) -> dict:
    """The train state at step 0, every leaf created directly in its sharding (on every process)."""
    def fresh(params):
        return {"step": jnp.zeros((), jnp.int32), "opt_state": tx.init(params),
                "rng": jax.random.key_data(jax.random.key(seed)), "bad_steps": jnp.zeros((), jnp.int32)}

    shardings = state_shardings(fn, tx)
    out = {k: v for k, v in shardings.items() if k != "params"} if shardings else None
    return {"params": fn.params, **jax.jit(fresh, out_shardings=out)(fn.params)}
