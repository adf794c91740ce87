"""LoRA on a loaded model: which layers get adapters, what trains, merging, and `peft` adapter export.

    model = jaxft.load_model(...)                    # the frozen base, already placed (and sharded)
    adapters = apply_lora(model, LoraSpec(rank=8, alpha=16), mesh=mesh)
    fn = Functional(model, adapters.trainable)       # gradients and optimizer state for adapters (+ head)

Targets are chosen by Hugging Face module name, so a regex written for `peft` means the same here:
`targets` matches the end of a module name at a dot boundary (`q_proj|v_proj` hits
`model.layers.3.self_attn.q_proj`), and `all-linear` means every linear layer of the model except the
output head (`lm_head`, `classifier`), as peft's `all-linear`. A module's HF name comes from the family's
name table (the rule of its kernel), which also gives the layout peft stores its adapter in.

DeepSeek's routed experts are linear modules by their checkpoint names (`mlp.experts.E.gate_proj`, one per
expert; `transformers` 5 fuses them in memory), so a regex naming them (`experts\\..*`) or `all-linear`
adapts them: one adapter per expert, stacked along the kernel's `expert` axis (`jaxft.models.moe.Stacked`).
jaxft's `all-linear` adapts every linear module by name (attention, dense MLP, shared and routed experts)
and never the router, whose output is a discrete choice. peft (0.21, 0.22) with transformers 5 loads the
routed experts' adapters onto the fused expert tensors; 0.21 also sends the dense MLP's and the shared
experts' adapters there (and so drops them), 0.22 keeps them (see `_check_peft_moe`).

`train_modules` (peft's `modules_to_save`) names modules trained in full next to the adapters: by default
the classification head of a sequence-classification model, since a new head must learn.

The adapter layer itself lives in `jaxft.models.lora`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import parallel
from jaxft.hf.table import Conv1D, _fill
from jaxft.models import get_family
from jaxft.models.layers import Dense
from jaxft.models.lora import LoRA, LoRAParam
from jaxft.models.quant import QuantKernel

log = logging.getLogger("jaxft")

HEADS = ("lm_head", "classifier", "score")        # output layers `all-linear` leaves alone, as peft does
DEFAULT_TRAIN_MODULES = {"sequence-classification": "classifier", "causal-lm": None}
PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
# model types whose MLP projection names peft (0.21) maps onto fused expert parameters when loading
PEFT_MOE_REMAPPED = ("deepseek_v2", "deepseek_v3")
ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"
    rslora: bool = False
    train_modules: str | None = "default"   # regex over HF module names trained in full; "default": per task


@dataclass
class Target:
    """One adapted `Dense`: its jaxft module path and the HF module name of each of its (stacked) slices."""

    path: str
    hf_names: list[str]
    conv1d: bool


@dataclass
class Adapters:
    spec: LoraSpec
    task: str
    targets: list[Target]
    train_paths: set[str] = field(default_factory=set)   # parameters of `train_modules` (trained in full)
    train_modules: list[str] = field(default_factory=list)

    def trainable(self, path, variable) -> bool:
        """NNX filter: the adapters, and the parameters of the modules trained in full."""
        if isinstance(variable, LoRAParam):
            return True
        return isinstance(variable, nnx.Param) and ".".join(map(str, path)) in self.train_paths


def _matches(pattern: re.Pattern | None, name: str) -> bool:
    if pattern is None:
        return name.rsplit(".", 1)[-1] not in HEADS
    return pattern.search(name) is not None


def _suffix_regex(expr: str, key: str) -> re.Pattern:
    try:
        return re.compile(rf"(?:^|\.)(?:{expr})$")
    except re.error as e:
        raise ValueError(f"{key}={expr!r} is not a valid regular expression: {e}") from None


def _hf_names(rule, idx: dict, shape: tuple[int, ...]) -> list[str]:
    """The HF module names of a kernel's slices: one, or one per index of its stacked axes (a scanned
    stack's layers, the routed experts, or both), in the order of the kernel's leading axes."""
    module = _fill(rule.hf, idx)
    if not module.endswith(".weight"):
        return []
    names = [module[: -len(".weight")]]
    for axis, n in zip(rule.stacked, shape):
        names = [_fill(m, {axis: str(j + rule.offset(axis))}) for m in names for j in range(n)]
    return names


def linear_layers(model: nnx.Module, table) -> list[tuple[str, Dense, object, list[str]]]:
    """Every `Dense` of `model` that is a Hugging Face linear module: `(jaxft path, layer, the name-table
    rule of its kernel, the HF module name of each of its stacked slices)`."""
    out = []
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, Dense):
            continue
        dotted = ".".join(map(str, path))
        rule, idx = table.rule_for_path(dotted + ".kernel")
        names = _hf_names(rule, idx, module.kernel_spec()[0])
        if names:
            out.append((dotted, module, rule, names))
    return out


def _abstract(module: Dense) -> bool:
    """True for a layer of a model built for its shapes only (`nnx.eval_shape`, the planner)."""
    var = module.quant.codes if module.quant is not None else module.kernel
    return isinstance(var.get_value(), jax.ShapeDtypeStruct)


def quantize_layer(module: Dense, kind: str, mesh=None) -> None:
    """Store `module`'s kernel quantised (`jaxft.models.quant`), placed with the kernel's axes, and drop
    the float kernel."""
    shape, axes, dtype = module.kernel_spec()
    lhs, rhs = module.einsum.split("->")[0].split(",")
    input_dims = tuple(d - len(rhs) for d, c in enumerate(rhs) if c in lhs)
    if _abstract(module):
        module.quant = nnx.eval_shape(lambda: QuantKernel(jnp.zeros(shape, dtype), kind, axes, input_dims))
    else:
        # computed on the devices from the (sharded) kernel, then laid out by the codes' and scales' own
        # axes: nothing passes through the host
        quant = QuantKernel(module.kernel.get_value(), kind, axes, input_dims)
        if mesh is not None:
            for var in (quant.codes, quant.scale):
                value = var.get_value()
                var.set_value(jax.device_put(value, parallel.sharding(var.get_metadata()["logical_axes"],
                                                                      value.shape, mesh)))
        module.quant = quant
    module.kernel = None


def quantizable(model: nnx.Module) -> dict[str, Dense]:
    """`{kernel path: layer}` of the layers QLoRA stores quantised: every linear module but the head."""
    family = get_family(model.hf_config["model_type"], model.task)
    table = family.name_table(model.config, model.task)
    return {f"{p}.kernel": m for p, m, _, names in linear_layers(model, table)
            if names[0].rsplit(".", 1)[-1] not in HEADS}


def apply_lora(model: nnx.Module, spec: LoraSpec, *, mesh=None, seed: int = 0) -> Adapters:
    """Attach LoRA adapters to the targeted `Dense` layers of `model` (in place) and say what trains.

    Raises naming the setting when `targets` matches nothing, or only some layers of a scanned stack.
    """
    if spec.rank < 1:
        raise ValueError(f"model.lora.rank={spec.rank} must be at least 1")
    if not 0.0 <= spec.dropout < 1.0:
        raise ValueError(f"model.lora.dropout={spec.dropout} must be in [0, 1)")
    family = get_family(model.hf_config["model_type"], model.task)
    table = family.name_table(model.config, model.task)
    pattern = None if spec.targets == "all-linear" else _suffix_regex(spec.targets, "model.lora.targets")
    train = spec.train_modules
    if train == "default":
        train = DEFAULT_TRAIN_MODULES[model.task]
    train_rx = _suffix_regex(train, "model.lora.train_modules") if train else None

    key = jax.random.key(seed)
    targets, train_paths, train_modules = [], set(), set()
    for dotted, module, rule, names in linear_layers(model, table):
        shape, axes, dtype = module.kernel_spec()
        if train_rx is not None and all(train_rx.search(n) for n in names):
            train_paths.update(f"{dotted}.{p}" for p in ("kernel", "bias") if getattr(module, p) is not None)
            train_modules.update(names)
            continue
        hits = [_matches(pattern, n) for n in names]
        if not any(hits):
            continue
        if not all(hits):
            raise ValueError(f"model.lora.targets={spec.targets!r} matches only some slices of the stacked "
                             f"kernel {dotted} ({sum(hits)} of {len(hits)} modules, e.g. {names[hits.index(True)]}): "
                             f"target all the routed experts of a projection, and whole layer stacks or set "
                             f"model.scan_layers=false")
        n = len(rule.stacked)  # leading stacked axes: a scanned stack's `layers`, the routed experts' `expert`
        adapter_id = zlib.crc32(rule.hf.encode())
        # adapters train in float32 over a quantised (QLoRA) base
        param_dtype = jnp.float32 if module.quant is not None else dtype
        build = lambda: LoRA(module.einsum, tuple(shape[n:]), axes[n:], spec.rank, spec.alpha,  # noqa: E731
                             rslora=spec.rslora, dropout=spec.dropout, adapter_id=adapter_id,
                             lead=tuple(shape[:n]), lead_axes=tuple(axes[:n]),
                             dtype=module.dtype, param_dtype=param_dtype,
                             key=jax.random.fold_in(key, zlib.crc32(dotted.encode())))
        if _abstract(module):
            lora = nnx.eval_shape(build)  # an abstract model (the planner): shapes only
        else:
            lora = build()
            for var in (lora.a, lora.b):
                var.set_value(parallel.place(np.asarray(var.get_value()), var.get_metadata()["logical_axes"],
                                             mesh))
        module.lora = lora
        targets.append(Target(dotted, names, isinstance(rule.transform, Conv1D)))
    if not targets:
        raise ValueError(f"model.lora.targets={spec.targets!r} matches no linear layer of this "
                         f"{model.hf_config['model_type']} model")
    if train_rx is not None and not train_paths:
        raise ValueError(f"model.lora.train_modules={train!r} matches no linear layer of this model")
    log.info("LoRA rank %d on %d linear layer(s) (%d module(s)); trained in full: %s", spec.rank, len(targets),
             sum(len(t.hf_names) for t in targets), ", ".join(sorted(train_modules)) or "nothing")
    return Adapters(spec, model.task, targets, train_paths, sorted(train_modules))


def _module_at(model: nnx.Module, path: str) -> nnx.Module:
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def merge(model: nnx.Module, adapters: Adapters) -> nnx.Module:
    """Fold every adapter into its base kernel (`W + scale·A·B`, computed in float32, stored in the
    kernel's dtype) and detach it, in place; a quantised base is dequantised. The model is then a plain
    model of its family, which `jaxft.save_pretrained` exports as a full Hugging Face checkpoint."""
    for t in adapters.targets:
        dense = _module_at(model, t.path)
        if dense.quant is None:
            dense.kernel.set_value(dense.effective_kernel())
        else:
            dense.kernel = nnx.Param(dense.effective_kernel(), logical_axes=dense.kernel_spec()[1])
            dense.quant = None
        dense.lora = None
    quantised = [m for _, m in nnx.iter_modules(model) if isinstance(m, Dense) and m.quant is not None]
    for module in quantised:  # quantised layers without adapters: dequantised
        module.kernel = nnx.Param(module.effective_kernel(), logical_axes=module.quant.axes)
        module.quant = None
    return model


def adapter_tensors(model: nnx.Module, adapters: Adapters) -> dict[str, np.ndarray]:
    """The adapter as `peft` stores it: `base_model.model.<module>.lora_A.weight [r, in]` and
    `.lora_B.weight [out, r]` per targeted module (a Conv1D module too: peft keeps Linear-shaped adapters
    and sets `fan_in_fan_out`), plus the `train_modules` weights under their HF names."""
    from jaxft.hf.export import to_host
    from jaxft.hf.load import flat_params

    family = get_family(model.hf_config["model_type"], model.task)
    table = family.name_table(model.config, model.task)
    out = {}
    for t in adapters.targets:
        lora = _module_at(model, t.path).lora
        a, b = to_host(lora.a.get_value()), to_host(lora.b.get_value())
        lead = a.ndim - len(lora.delta_einsum.split(",")[0])  # stacked axes (layers, experts): one module each
        a, b = a.reshape((-1,) + a.shape[lead:]), b.reshape((-1,) + b.shape[lead:])
        r = a.shape[-1]
        for j, name in enumerate(t.hf_names):
            out[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a[j].reshape(-1, r).T)
            out[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b[j].reshape(r, -1).T)
    params = flat_params(model)
    for path in sorted(adapters.train_paths):
        for name, tensor in table.export({path: to_host(params[path].get_value())}).items():
            out[f"base_model.model.{name}"] = tensor
    return out


def save_adapter(model: nnx.Module, adapters: Adapters, out_dir: str | os.PathLike,
                 base_model_name_or_path: str, tokenizer=None) -> Path:
    """Write a `peft` adapter folder (`adapter_config.json` + `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the base model."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    spec = adapters.spec
    dropout = _check_peft_moe(model.hf_config["model_type"], adapters)
    tensors = adapter_tensors(model, adapters)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    targets = peft_target_modules(model.hf_config["model_type"], adapters)
    config = {
        "peft_type": "LORA", "task_type": PEFT_TASK_TYPES[adapters.task], "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": dropout, "use_rslora": spec.rslora,
        "target_modules": targets, "modules_to_save": adapters.train_modules or None,
        "fan_in_fan_out": any(t.conv1d for t in adapters.targets), "bias": "none",
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "init_lora_weights": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def peft_target_modules(model_type: str, adapters: Adapters) -> list[str]:
    """`target_modules` for adapter_config.json: every adapted module by its HF name, except that the routed
    experts of a model peft remaps onto transformers 5's fused experts are named by their container
    (`model.layers.1.mlp.experts.gate_proj` for all `model.layers.1.mlp.experts.E.gate_proj`).

    peft turns such a target into a target parameter by replacing the projection's name with the fused one:
    0.21 keeps only the new leaf name (`gate_up_proj`, every layer's), 0.22 the whole name
    (`model.layers.1.mlp.experts.gate_up_proj`). A per-expert name would become
    `...experts.E.gate_up_proj` there, which names no parameter, and peft 0.22 would drop the adapter."""
    names = sorted({n for t in adapters.targets for n in t.hf_names})
    if model_type not in PEFT_MOE_REMAPPED:
        return names
    return sorted({ROUTED_EXPERT.sub(r".mlp.experts.\1", n) for n in names})


def installed_peft() -> tuple[int, int] | None:
    """(major, minor) of the `peft` installed beside jaxft, or None where there is none (jaxft never imports it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(x) for x in re.findall(r"\d+", version("peft"))[:2])
    except PackageNotFoundError:
        return None


# the first peft whose transformers-5 MoE loader keeps adapters on dense MLP / shared-expert linear layers
PEFT_KEEPS_DENSE_MLP = (0, 22)


def _check_peft_moe(model_type: str, adapters: Adapters) -> float:
    """Refuse a DeepSeek adapter that peft (with transformers 5) would load wrongly; return the `lora_dropout`
    to record.

    peft loads per-expert adapters (`mlp.experts.E.gate_proj.lora_A.weight`, ...) by converting them onto the
    fused expert tensors of transformers 5: `down_proj` per expert, `gate_proj` + `up_proj` fused into
    `gate_up_proj` with rank 2r and alpha 2·alpha (checked with peft 0.21 and 0.22: logits within 1e-4 of the
    merged model). peft 0.21's conversion also claims every other `gate_proj`/`up_proj`/`down_proj` name, so
    adapters on the dense MLP or the shared experts would be dropped; 0.22 keeps them on their linear layers.
    So such an adapter is written where the installed peft is 0.22 or newer (or none is installed: the log
    says which peft it needs) and refused under 0.21. With either, 2·alpha/√(2r) ≠ alpha/√r, so rslora
    would scale the fused pair by √2, and gate without up cannot be fused. The fused-expert layer also
    refuses `lora_dropout` ≠ 0: dropout does not act at inference, so such an adapter records 0.0.
    """
    dropout = adapters.spec.dropout
    if model_type not in PEFT_MOE_REMAPPED:
        return dropout
    names = [n for t in adapters.targets for n in t.hf_names]
    mlp = sorted(n for n in names if n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj"))
    routed = {m.group(1) for m in map(ROUTED_EXPERT.search, mlp) if m}
    dense = [n for n in mlp if not ROUTED_EXPERT.search(n)]
    merged = "export the merged model instead (jaxft export RUN OUT, without --adapter)"
    peft = installed_peft()
    if dense and peft is not None and peft < PEFT_KEEPS_DENSE_MLP:
        raise ValueError(
            f"cannot write a peft adapter for {len(dense)} dense-MLP / shared-expert module(s) of this "
            f"{model_type} model (e.g. {dense[0]}) for the installed peft {peft[0]}.{peft[1]}: its loader for "
            f"transformers-5 MoE models re-targets every gate_proj / up_proj / down_proj name at the fused routed "
            f"experts, so these adapters would be silently dropped. Upgrade to peft>=0.22 (which keeps them), "
            f"{merged}, or train with model.lora.targets limited to attention and routed experts "
            f"(e.g. 'self_attn\\..*|experts\\..*')")
    if dense and peft is None:
        log.info("the adapter holds dense-MLP / shared-expert modules of %s (e.g. %s): load it with peft>=0.22 "
                 "(0.21 drops them)", model_type, dense[0])
    if len(routed & {"gate_proj", "up_proj"}) == 1:
        raise ValueError(
            f"cannot write a peft adapter with routed-expert {sorted(routed)} but not both gate_proj and up_proj: "
            f"peft fuses the two into transformers 5's gate_up_proj and refuses one alone; {merged}")
    if routed & {"gate_proj", "up_proj"} and adapters.spec.rslora:
        raise ValueError(
            f"cannot write a peft adapter of {model_type}'s routed experts with model.lora.rslora=true: peft "
            f"fuses gate_proj and up_proj with rank 2r and alpha 2·alpha, which scales them by 2·alpha/√(2r) = "
            f"√2·alpha/√r instead of alpha/√r; {merged}")
    if routed and dropout:
        log.warning("adapter_config.json records lora_dropout 0.0 (trained with %s): peft's fused-expert LoRA "
                    "layer refuses dropout, which does not act at inference", dropout)
        return 0.0
    return dropout


def base_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over the weight files of a model folder (names and contents), to recognise the base a LoRA
    run was trained on. Cached per (file, size, mtime) under jaxft's cache directory."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    cache_path = Path(os.environ.get("JAXFT_CACHE", Path.home() / ".cache" / "jaxft")) / "fingerprints.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    fh.update(chunk)
            cache[key] = fh.hexdigest()
        h.update(p.name.encode() + b"\0" + cache[key].encode() + b"\0")
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_path)
    except OSError:
        pass
    return h.hexdigest()

