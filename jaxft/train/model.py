"""The model a run trains: the base loaded from `model.name_or_path`, LoRA adapters when asked, and the
filter that says which of its variables train (everything else is frozen: no gradient, no optimizer state).

Training, evaluation, export and generation from a run directory all build it here, so they agree on
what the checkpoint's `params` are: every parameter for full fine-tuning, the adapters (and a head
trained in full) for LoRA. A LoRA checkpoint holds no base weights; it records which base it was trained
on (`base_record`), and a changed base is refused naming both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxft.config import Config, ConfigError
from jaxft.layerwise import LayerMap
from jaxft.lora import Adapters, LoraSpec, apply_lora, base_fingerprint
from jaxft.models.moe import is_router_param

log = logging.getLogger("jaxft")


@dataclass
class RunModel:
    model: nnx.Module
    trainable: Any                     # an NNX filter
    adapters: Adapters | None = None
    layers: LayerMap | None = None     # the model's blocks (`optim.layer_decay`, `model.freeze_*`)
    freeze: tuple[bool, int] = (False, 0)  # (model.freeze_embeddings, model.freeze_layers)

    def slice_masks(self, params: dict) -> dict[str, np.ndarray]:
        """For each trainable stacked parameter of which `model.freeze_layers` holds some slices fixed: its
        per-slice mask (True = frozen) for the optimizer (`jaxft.optim.hold_slices`); a filter cannot split
        an array."""
        if self.layers is None or not any(self.freeze):
            return {}
        out = {}
        for path, value in params.items():
            mask = self.layers.frozen(path, tuple(value.shape), *self.freeze)
            if isinstance(mask, np.ndarray) and mask.any():
                out[path] = mask
        return out


def lora_spec(cfg: Config) -> LoraSpec | None:
    lo = cfg.model.lora
    if lo.rank is None:
        return None
    return LoraSpec(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets, rslora=lo.rslora,
                    train_modules=lo.train_modules)


def trainable_filter(cfg: Config, adapters: Adapters | None, layers: LayerMap | None = None):
    """What trains: LoRA's adapters (+ `train_modules`), else every `nnx.Param`; but not a frozen router
    (`model.moe.freeze_router`), nor frozen embeddings or looped blocks (`model.freeze_embeddings`,
    `model.freeze_layers`; a stack of scanned blocks is left out only when all its slices are frozen, else
    `RunModel.slice_masks` holds the frozen slices)."""
    base = adapters.trainable if adapters is not None else nnx.Param
    m = cfg.model
    freeze = (m.freeze_embeddings, m.freeze_layers)
    if not m.moe.freeze_router and not any(freeze):
        return base
    test = nnx.filterlib.to_predicate(base)

    def trainable(path, v) -> bool:
        if not test(path, v):
            return False
        name = _dotted(path)
        if m.moe.freeze_router and is_router_param(name):
            return False
        return not (any(freeze) and np.all(layers.frozen(name, tuple(v.get_value().shape), *freeze)))

    return trainable


def _dotted(path) -> str:
    return ".".join(map(str, path))


def with_adapters(model: nnx.Module, cfg: Config, mesh=None) -> RunModel:
    """`model` (loaded or abstract) with the run's adapters attached, and its trainable filter."""
    spec = lora_spec(cfg)
    adapters = None
    if spec is not None:
        try:
            adapters = apply_lora(model, spec, mesh=mesh, seed=cfg.train.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    m, layers = cfg.model, None
    if m.freeze_embeddings or m.freeze_layers or cfg.optim.layer_decay is not None:
        layers = LayerMap.of({_dotted(p): tuple(v.get_value().shape)
                              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})
    if layers is not None and cfg.model.freeze_layers > layers.num_layers:
        raise ConfigError(f"model.freeze_layers={cfg.model.freeze_layers}: the model has {layers.num_layers} "
                          f"layers")
    return RunModel(model, trainable_filter(cfg, adapters, layers), adapters, layers,
                    (cfg.model.freeze_embeddings, cfg.model.freeze_layers))


def load_run_model(cfg: Config, model_dir: str | Path, mesh=None, num_labels: int | None = None) -> RunModel:
    from jaxft.hf.load import load_model

    m = cfg.model
    model = load_model(model_dir, m.task, num_labels=num_labels, dtype=m.dtype, param_dtype=m.param_dtype,
                       mesh=mesh, seed=cfg.train.seed, remat=m.remat, scan_layers=m.scan_layers,
                       quantize=m.quantize, attention=m.attention, attention_block=m.attention_block,
                       hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout)
    return with_adapters(model, cfg, mesh)


def base_record(cfg: Config, model_dir: str | Path) -> dict:
    """What a checkpoint records of its base: the name it was given, the folder it resolved to and the sha256
    of its weight files. A LoRA run's weights are the base's (plus adapters); a full fine-tuning run still
    takes its config.json and generation settings from the base folder on export."""
    return {"name_or_path": cfg.model.name_or_path, "folder": str(model_dir),
            "sha256": base_fingerprint(model_dir)}


def check_base(saved: dict | None, cfg: Config, model_dir: str | Path) -> None:
    """Refuse a checkpoint whose base weights differ from `model_dir`'s, naming both (checkpoints written
    before bases were recorded have none and pass)."""
    if not saved:
        return
    now = base_record(cfg, model_dir)
    if now["sha256"] != saved.get("sha256"):
        kind = "LoRA run" if cfg.model.lora.rank is not None else "run"
        raise ConfigError(
            f"this {kind} was trained on the base {saved.get('name_or_path')} ({saved.get('folder')}, weights "
            f"sha256 {str(saved.get('sha256'))[:12]}…), but model.name_or_path={cfg.model.name_or_path} now "
            f"resolves to {model_dir} with different weights (sha256 {now['sha256'][:12]}…); restore that base "
            f"or point model.name_or_path at it")
