"""`jaxft plan CONFIG.yaml`: the per-device memory of a training run, worked out before anything is allocated.

The model is built abstractly (`nnx.eval_shape`: shapes and dtypes only) from its `config.json`, so a
folder holding nothing else will do, and no data is read (`data.max_length` and `train.batch_size`
give the batch shape). Then, per device of the mesh `mesh.{data, fsdp, tensor, expert}`:

- parameters, gradients, optimizer state: exact, from each array's shape, dtype and the sharding the
  rules table gives it (`jaxft.parallel`, `jaxft.train.step.state_shardings`);
- a second, frozen model that the objective holds beside the train state (`train.objective`): the
  distillation teacher, or the reference copy of dpo/ipo with full fine-tuning (none with LoRA, whose
  reference is the base with its adapters off, nor for simpo/orpo); exact like the parameters;
- activations: the residuals the backward pass keeps under `model.remat`, counted exactly by tracing
  the loss (`jax.vjp` under `jax.eval_shape`) at one data-parallel device's micro-batch, minus the
  parameters they include; dimensions the `tensor` axis splits (heads, MLP width, vocabulary) are
  divided by it. An estimate: XLA's workspace and fusion choices are not in it;
- peak: when the mesh fits the devices of this machine, the real train step is compiled for it and
  XLA's memory analysis gives arguments + outputs − donated + temporaries; for a described mesh (more
  devices than present, e.g. a pod planned on a laptop) the peak is the sum of the four above.
  XLA:CPU does not schedule rematerialised blocks to save memory (its compiled peak barely moves with
  `model.remat`), so on CPU the effect of remat shows in the activations line; the TPU and GPU
  compilers do schedule for it.

The report says which method gave the peak, and which chips of `CHIPS` it fits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from jaxft import parallel
from jaxft.config import Config
from jaxft.optim import make_optimizer
from jaxft.models.options import RunOptions
from jaxft.train.losses import classification_loss, make_causal_lm_loss
from jaxft.train.model import with_adapters
from jaxft.objectives.preference import REFERENCE_COLUMNS
from jaxft.train.step import Functional, init_state, make_train_step, state_shardings

log = logging.getLogger("jaxft")

GiB = 2**30
# Memory per chip (HBM), GiB, as the vendors state it.
CHIPS: dict[str, float] = {"TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32, "H100": 80, "H200": 141}
TENSOR_AXES = ("heads", "kv_heads", "mlp", "vocab")
PREFERENCE = ("dpo", "ipo", "simpo", "orpo")


@dataclasses.dataclass
class MemoryPlan:
    model: str
    param_count: int
    trainable_count: int           # parameters with gradients and optimizer state (all but a frozen base)
    mesh: dict[str, int]
    devices: int
    local_devices: int
    method: str                    # "compiled" (XLA memory analysis) or "analytic"
    backend: str                   # the JAX backend that compiled it (cpu, gpu, tpu)
    batch: dict[str, int]          # global, grad_accum, per_device (rows per micro-batch), length, length_per_device
    per_device: dict[str, int]     # bytes: params, opt_state, gradients, activations, peak; compiled: xla_arguments,
                                   # xla_temp; with a teacher or reference: second_model
    settings: dict[str, str]       # dtype, param_dtype, remat, objective (and second_model: what it is)

    def fits(self) -> dict[str, bool]:
        return {chip: self.per_device["peak"] <= gib * GiB for chip, gib in CHIPS.items()}

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fits": self.fits()}

    def report(self) -> str:
        mesh = ", ".join(f"{a}={s}" for a, s in self.mesh.items() if s > 1) or "one device"
        where = (f"compiled for this machine's {self.devices} device(s); peak from XLA:{self.backend}'s memory "
                 f"analysis"
                 if self.method == "compiled" else
                 f"described mesh of {self.devices} devices (this machine has {self.local_devices}): analytic "
                 f"estimate, not compiled")
        b, d = self.batch, self.per_device
        lines = [
            f"model        {self.model}: {self.param_count:,} parameters ({_count(self.param_count)})"
            + (f", {self.trainable_count:,} trainable ({self.trainable_count / self.param_count:.2%})"
               if self.trainable_count != self.param_count else ""),
            f"precision    compute {self.settings['dtype']}, parameters {self.settings['param_dtype']}, "
            f"remat {self.settings['remat']}"
            + (f", base quantised {self.settings['quantize']} "
               f"({self.settings['base_bytes_per_param']} bytes per base parameter)"
               if self.settings.get("quantize", "none") != "none" else ""),
            f"mesh         {mesh} ({self.devices} devices) — {where}",
            f"batch        {b['global']} sequences × {b['length']} tokens, grad_accum {b['grad_accum']}: "
            f"{b['per_device']} per data-parallel device per micro-batch"
            + (f", {b['length_per_device']} tokens of each per device (sequence-parallel)"
               if b["length_per_device"] != b["length"] else ""),
            "per device",
            f"  parameters        {_gib(d['params'])}",
            f"  optimizer state   {_gib(d['opt_state'])}",
            f"  gradients         {_gib(d['gradients'])}",
        ]
        if "second_model" in d:
            lines.append(f"  {self.settings['second_model']:<17} {_gib(d['second_model'])}   (frozen, beside the state; "
                         f"train.objective={self.settings['objective']})")
        lines += [
            f"  activations       {_gib(d['activations'])}   (kept for the backward pass; estimate)",
        ]
        if self.method == "compiled":
            lines.append(f"  XLA temporaries   {_gib(d['xla_temp'])}   (activations, gradients, workspace)")
        if "rollout_kv_cache" in d:
            lines.append(f"  rollout KV cache  {_gib(d['rollout_kv_cache'])}   (GRPO sampling, between steps: beside "
                         f"parameters and optimizer state, not the step's temporaries)")
        lines.append(f"  peak              {_gib(d['peak'])}   ({'XLA' if self.method == 'compiled' else 'sum above'})")
        fits = self.fits()
        lines.append("fits         " + ", ".join(
            f"{chip} ({gib:g} GiB): {'yes' if fits[chip] else 'no'} ({d['peak'] / (gib * GiB):.0%})"
            for chip, gib in CHIPS.items()))
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:9.3f} GiB" if n >= GiB else f"{n / 2**20:9.3f} MiB"


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def abstract_model(cfg: Config) -> tuple[nnx.Module, str]:
    """The model of `cfg` with shapes and dtypes but no memory, and a label naming it."""
    from jaxft.hf.load import abstract_module, model_config, resolve

    folder = resolve(cfg.model.name_or_path)
    m = cfg.model
    options = RunOptions(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
                         attention=m.attention, attention_block=m.attention_block, hidden_dropout=m.hidden_dropout,
                         attention_dropout=m.attention_dropout)
    hf, family, mcfg = model_config(folder, m.task, options, m.num_labels)
    model = abstract_module(family.modules[cfg.model.task], mcfg)
    model.hf_config = hf.to_dict()
    return model, f"{hf.model_type} ({folder})"


def batch_shapes(task: str, batch: int, length: int, packing: bool = False,
                 objective: str = "supervised", reference_logps: bool = False,
                 old_logps: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of one batch of `task` under `objective` (what `jaxft.data` produces), as shapes;
    `reference_logps`: the pairs carry precomputed reference log-probs (`train.dpo.precompute_reference`)."""
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    if objective in PREFERENCE:  # preference pairs (jaxft.data.preference)
        per_pair = ("weights",) + (REFERENCE_COLUMNS if reference_logps else ())
        return {f"{side}_{k}": tokens for side in ("chosen", "rejected")
                for k in ("input_ids", "attention_mask", "loss_mask")} | \
            {k: jax.ShapeDtypeStruct((batch,), jnp.float32) for k in per_pair}
    out = {"input_ids": tokens, "attention_mask": tokens, "weights": jax.ShapeDtypeStruct((batch,), jnp.float32)}
    if objective == "grpo":   # prompt + completion rows (jaxft.objectives.grpo)
        out["advantages"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
        if old_logps:
            out["old_logps"] = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    if task == "causal-lm":
        out["loss_mask"] = tokens
        if packing:
            out["segment_ids"] = tokens
    else:
        out["token_type_ids"] = tokens
        out["labels"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return out


def _bytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def sharded_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a pytree of shapes under matching `NamedSharding`s."""
    return sum(_bytes(x) // parallel.shard_factor(s.spec, s.mesh)
               for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def activation_bytes(fn: Functional, loss_fn, batch: dict, tensor: int, frozen_model: Functional | None = None) -> int:
    """Bytes of the residuals the backward pass keeps, for `batch` (one device's micro-batch).

    `jax.vjp` returns its residuals inside the backward function; under `jax.eval_shape` they are shapes
    only. Residuals that are the parameters themselves are not activations and are left out (one per
    parameter of the same shape and dtype). A residual dimension whose size is that of a dimension the
    `tensor` axis splits (heads, MLP width, vocabulary) is counted as split.
    """
    def residuals(params, frozen, held, b):
        second = () if frozen_model is None else (frozen_model.module({}, held),)  # a teacher or reference
        return jax.vjp(lambda p: loss_fn(fn.module(p, frozen), b, None, *second)[0], params)[1]

    shapes = lambda tree: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tree.items()}
    held = {} if frozen_model is None else shapes(frozen_model.frozen)
    leaves = [x for x in jax.tree.leaves(jax.eval_shape(residuals, fn.params, shapes(fn.frozen), held, batch))
              if hasattr(x, "shape")]
    params = Counter((tuple(p.shape), str(p.dtype)) for p in {**fn.params, **fn.frozen}.values())
    split = {size for k, p in {**fn.params, **fn.frozen}.items() for name, size in zip(fn.axes[k] or (), p.shape)
             if name in TENSOR_AXES and size % tensor == 0} if tensor > 1 else set()
    total = 0
    for x in leaves:
        key = (tuple(x.shape), str(x.dtype))
        if params[key] > 0:
            params[key] -= 1
            continue
        total += _bytes(x) // (tensor if split & set(x.shape) else 1)
    return total


def objective_loss(cfg: Config):
    """The train loss of `cfg`'s objective (what `jaxft.objectives` would build), without reading data."""
    objective, causal = cfg.train.objective, cfg.model.task == "causal-lm"
    if objective == "distill":
        from jaxft.objectives.distill import make_causal_lm_distill_loss, make_classification_distill_loss

        return (make_causal_lm_distill_loss if causal else make_classification_distill_loss)(cfg.train.distill)
    if objective in PREFERENCE:
        from jaxft.objectives.preference import make_preference_loss

        return make_preference_loss(objective, cfg.train.dpo)
    if objective == "grpo":
        from jaxft.objectives.grpo_loss import make_grpo_loss

        return make_grpo_loss(cfg.train.grpo, cfg.train.loss_chunk_tokens)
    return make_causal_lm_loss(cfg.model.moe.aux_loss_coef, cfg.train.loss_chunk_tokens) if causal else \
        classification_loss


def second_model(cfg: Config, fn: Functional) -> tuple[Functional | None, str]:
    """`(frozen second model as shapes, what it is)` for `cfg`'s objective, or `(None, "")`.

    The distillation teacher is built abstractly from its folder (a run directory's base model: its LoRA
    adapters, a few MiB at most, are not counted), in the student's compute and parameter dtypes, as
    `Teacher.load` loads it; the dpo/ipo reference of full fine-tuning is a copy of the policy.
    """
    objective = cfg.train.objective
    if objective == "distill":
        from jaxft.hf.load import abstract_module, model_config
        from jaxft.objectives.distill import Teacher

        m = cfg.model
        teacher = Teacher(cfg.train.distill.teacher, m.task)
        options = RunOptions(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention,
                             attention_block=m.attention_block)
        num_labels = teacher.num_labels if m.task == "sequence-classification" else None
        _, family, mcfg = model_config(teacher.folder, m.task, options, num_labels)
        return Functional(abstract_module(family.modules[m.task], mcfg), trainable=lambda path, v: False), "teacher"
    full_reference = (objective in ("dpo", "ipo") and not cfg.train.dpo.precompute_reference) or (
        objective == "grpo" and cfg.train.grpo.beta > 0)
    if full_reference and cfg.model.lora.rank is None:
        return Functional(fn.module(fn.params, fn.frozen), trainable=lambda path, v: False), "reference"
    return None, ""


def train_length(cfg: Config) -> int:
    """The token length of a training row: `data.max_length`, or for GRPO the prompt bucket (the longest prompt,
    `train.grpo.max_prompt_length` or `data.max_length`, rounded up to `data.pad_to_multiple_of`) plus the
    completion."""
    if cfg.train.objective != "grpo":
        return cfg.data.max_length
    g, m = cfg.train.grpo, cfg.data.pad_to_multiple_of
    return -(-(g.max_prompt_length or cfg.data.max_length) // m) * m + g.max_completion_length


def rollout_cache_bytes(model, cfg: Config, mesh) -> int:
    """Per device: the KV cache of a GRPO rollout, `batch_size` rows of `train_length` positions (every layer's
    keys and values in the compute dtype), its rows split over the data-parallel devices and its heads over
    `tensor` where they divide."""
    dp, tensor = parallel.data_parallel_size(mesh), int(mesh.shape["tensor"])
    rows, length = -(-cfg.train.batch_size // dp), train_length(cfg)
    itemsize = jnp.dtype(cfg.model.dtype).itemsize
    total = 0
    for shapes in model.kv_shapes():
        for heads, dim in shapes:
            total += rows * length * (heads // tensor if heads % tensor == 0 else heads) * dim * itemsize
    return total


def resolve_mesh(sizes: dict[str, int], local: int, devices: int | None):
    """`(mesh, described)`: a real `Mesh` when the sizes fit this machine's devices, else an `AbstractMesh`.

    With `devices` given, `-1` takes the rest of that many devices; otherwise of this machine's when the
    fixed axes fit them, and 1 (the mesh is exactly the fixed axes) when they do not.
    """
    sizes = {a: int(sizes.get(a, 1)) for a in parallel.MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    n = devices or (local if fixed <= local and local % fixed == 0 else fixed)
    shape = parallel.mesh_shape(sizes, n)
    if n == local:
        return parallel.make_mesh(shape), False
    return AbstractMesh(tuple(shape[a] for a in parallel.MESH_AXES), parallel.MESH_AXES), True


def plan(cfg: Config, devices: int | None = None, compile: bool = True) -> MemoryPlan:
    """Work out the per-device memory of training `cfg` (see the module docstring)."""
    model, label = abstract_model(cfg)
    base_count = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if cfg.model.quantize:
        from jaxft.lora import quantizable, quantize_layer

        for layer in quantizable(model).values():
            quantize_layer(layer, cfg.model.quantize)
    run_model = with_adapters(model, cfg)
    fn = Functional(run_model.model, run_model.trainable)
    local = jax.device_count()
    mesh, described = resolve_mesh(cfg.mesh.model_dump(), local, devices)
    dp = parallel.data_parallel_size(mesh)
    B, accum, T = cfg.train.batch_size, cfg.train.grad_accum, train_length(cfg)
    if B % (dp * accum):
        raise ValueError(f"train.batch_size={B} must be divisible by the data-parallel devices ({dp}) × "
                         f"train.grad_accum ({accum}) = {dp * accum}")
    tx, lr = make_optimizer(cfg.optim, cfg.train.steps or 1000, run_model.layers, run_model.slice_masks(fn.params))
    fn.mesh = mesh
    shard = state_shardings(fn, tx, mesh)
    frozen_shard = {k: parallel.sharding(fn.axes[k], v.shape, mesh) for k, v in fn.frozen.items()}
    opt_shapes = jax.eval_shape(tx.init, fn.params)
    loss = objective_loss(cfg)
    second, second_label = second_model(cfg, fn)
    sp = parallel.sequence_parallel_size(mesh)
    if T % sp:
        raise ValueError(f"data.max_length={T} must be divisible by mesh.sequence={sp}")
    # one device's share of a micro-batch: its rows and, under a `sequence` axis, its slice of their tokens
    micro = batch_shapes(cfg.model.task, B // (dp * accum), T // sp, cfg.data.packing, cfg.train.objective,
                         cfg.train.dpo.precompute_reference,
                         cfg.train.grpo.num_iterations > 1)
    adapter_count = sum(math.prod(v.shape) for k, v in fn.params.items() if ".lora." in k)
    trained = sharded_bytes(fn.params, shard["params"])
    # bytes of the base (frozen) weights per base parameter: 4 float32, 2 bfloat16, ~1 int8, ~0.5 nf4
    frozen_total = sum(math.prod(v.shape) * jnp.dtype(v.dtype).itemsize for v in fn.frozen.values())
    frozen_count = base_count - sum(math.prod(v.shape) for k, v in fn.params.items() if ".lora." not in k)
    d = {"params": trained + sharded_bytes(fn.frozen, frozen_shard),
         "opt_state": sharded_bytes(opt_shapes, shard["opt_state"])}
    # gradients of the trainable parameters only (a frozen base has none): accumulated + one micro-batch's
    # when accumulating
    d["gradients"] = trained * (2 if accum > 1 else 1)
    d["activations"] = activation_bytes(fn, loss, micro, mesh.shape["tensor"], second)
    d["peak"] = d["params"] + d["opt_state"] + d["gradients"] + d["activations"]
    if cfg.train.objective == "grpo":   # sampling runs between steps: its cache is not live during the update
        d["rollout_kv_cache"] = rollout_cache_bytes(model, cfg, mesh)
    if second is not None:
        second_shard = {k: parallel.sharding(second.axes[k], v.shape, mesh) for k, v in second.frozen.items()}
        d["second_model"] = sharded_bytes(second.frozen, second_shard)
        d["peak"] += d["second_model"]
        second.mesh = mesh
        second.frozen = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=second_shard[k])
                         for k, v in second.frozen.items()}
    method = "analytic"
    if not described and compile:
        fn.frozen = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=frozen_shard[k]) for k, v in fn.frozen.items()}
        full_batch = batch_shapes(cfg.model.task, B, T, cfg.data.packing, cfg.train.objective,
                                  cfg.train.dpo.precompute_reference,
                         cfg.train.grpo.num_iterations > 1)
        stats = compiled_memory(fn, tx, lr, loss, mesh, shard, full_batch, accum, second)
        d["xla_arguments"], d["xla_temp"] = int(stats.argument_size_in_bytes), int(stats.temp_size_in_bytes)
        d["peak"] = int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                        + stats.temp_size_in_bytes)
        method = "compiled"
    return MemoryPlan(
        model=label, param_count=base_count + (adapter_count if run_model.adapters else 0),
        trainable_count=sum(math.prod(p.shape) for p in fn.params.values()),
        mesh={a: int(mesh.shape[a]) for a in parallel.MESH_AXES}, devices=int(math.prod(mesh.shape.values())),
        local_devices=local, method=method, backend=jax.default_backend(),
        batch={"global": B, "grad_accum": accum, "per_device": B // (dp * accum), "length": T,
               "length_per_device": T // sp},
        per_device=d, settings={"dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
                                "remat": cfg.model.remat, "quantize": cfg.model.quantize or "none",
                                "objective": cfg.train.objective, "second_model": second_label,
                                "base_bytes_per_param": f"{frozen_total / max(frozen_count, 1):.3f}"})


def compiled_memory(fn: Functional, tx, lr, loss, mesh, shard: dict, batch: dict, accum: int,
                    second: Functional | None = None):
    """XLA's memory analysis (per device) of the real train step compiled for `mesh`, from shapes alone.

    The state's shapes come from `init_state` itself (traced, not run), so they are the loop's; `fn`'s
    parameters are left as sharded shapes.
    """
    def fresh(params):
        fn.params = params
        return init_state(fn, tx, 0)

    shapes = jax.eval_shape(fresh, {k: jax.ShapeDtypeStruct(p.shape, p.dtype) for k, p in fn.params.items()})
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shard)
    fn.params = state["params"]
    batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.batch_sharding(mesh, len(x.shape)))
             for k, x in batch.items()}
    return make_train_step(fn, loss, tx, lr, accum, second).lower(state, batch).compile().memory_analysis()


def preflight(cfg: Config, fn: Functional, state: dict, mesh, loss, device=None, margin: float = 0.9,
              frozen_model: Functional | None = None) -> int | None:
    """Before training: log the estimated peak per device and warn when it exceeds `margin` of the memory
    `device` (default: the first local device) reports. Returns the estimate, or None where devices do
    not report their memory (CPU), in which case nothing is traced.

    Parameters and optimizer state are measured on the live `state`; gradients and activations are
    estimated as in `plan`.
    """
    device = device or jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if not limit:
        return None
    local = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)
                             if hasattr(x, "addressable_shards"))
    second = frozen_model.frozen if frozen_model is not None else {}  # a reference model beside the state
    held, grads = local(state) + local(fn.frozen) + local(second), local(state["params"])
    dp, accum = parallel.data_parallel_size(mesh), cfg.train.grad_accum
    sp = parallel.sequence_parallel_size(mesh)
    micro = batch_shapes(cfg.model.task, cfg.train.batch_size // (dp * accum), train_length(cfg) // sp,
                         cfg.data.packing, cfg.train.objective, cfg.train.dpo.precompute_reference,
                         cfg.train.grpo.num_iterations > 1)
    acts = activation_bytes(fn, loss, micro, mesh.shape["tensor"], frozen_model)
    peak = held + grads * (2 if accum > 1 else 1) + acts
    log.info("memory per device (estimate): state %.2f GiB + gradients %.2f GiB + activations %.2f GiB = %.2f GiB "
             "of %.2f GiB", held / GiB, grads / GiB, acts / GiB, peak / GiB, limit / GiB)
    if peak > margin * limit:
        log.warning("the estimated peak of %.2f GiB per device is above %.0f%% of the device's %.2f GiB: this run "
                    "may run out of memory. Try model.remat=full, a smaller train.batch_size with a larger "
                    "train.grad_accum, or a larger mesh.fsdp (jaxft plan shows the effect).",
                    peak / GiB, margin * 100, limit / GiB)
    return peak
