"""`jaxft.save_pretrained`: an NNX module → a Hugging Face folder that `transformers` loads unchanged.

Weights go through the family's name table in reverse (transposes and reshapes only, so an untouched
model round-trips bit for bit), tensor by tensor to the host, and are written as safetensors; the
config is the source checkpoint's `config.json` updated with the task's architecture and labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxft.hf.files import write_safetensors
from jaxft.hf.load import flat_params
from jaxft.models import get_family


def to_host(x: jax.Array) -> np.ndarray:
    """Gather one (possibly sharded, possibly multi-host) array to this host's memory."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(model: nnx.Module, dtype: str | None = None) -> dict[str, np.ndarray]:
    """The model's parameters under the names `save_pretrained` of the HF task class writes."""
    family = get_family(model.hf_config["model_type"], model.task)
    table = family.name_table(model.config, model.task)
    out = {}
    for path, var in flat_params(model).items():
        for name, t in table.export({path: to_host(var.get_value())}).items():
            out[name] = t if dtype is None else t.astype(dtype)
    return out


def hf_config_dict(model: nnx.Module, id2label: dict[int, str] | None = None) -> dict:
    family = get_family(model.hf_config["model_type"], model.task)
    cfg = dict(model.hf_config)
    cfg["architectures"] = [family.architectures[model.task]]
    if model.task == "sequence-classification":
        n = model.config.num_labels
        if id2label is None:
            old = cfg.get("id2label") or {}
            id2label = {int(k): v for k, v in old.items()} if len(old) == n else {
                i: f"LABEL_{i}" for i in range(n)}
        if len(id2label) != n:
            raise ValueError(f"id2label has {len(id2label)} labels, the model has num_labels={n}")
        cfg["id2label"] = {str(i): str(id2label[i]) for i in sorted(id2label)}
        cfg["label2id"] = {str(v): int(k) for k, v in id2label.items()}
    return cfg


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, tokenizer=None,
                    id2label: dict[int, str] | None = None, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30, generation: dict | None = None) -> Path:
    """Write `config.json`, `model.safetensors` (sharded with an index when large) and the tokenizer;
    for causal LMs also `generation_config.json` (see `generation_config`; `generation` overrides it).

    Call it on every process of a multi-host run: arrays are gathered collectively, files are written
    by process 0 only.
    """
    out = Path(out_dir)
    tensors = hf_tensors(model, dtype)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out, max_shard_bytes)
    from transformers import AutoConfig

    cfg = hf_config_dict(model, id2label)
    hf = AutoConfig.for_model(**cfg)
    if dtype is not None:
        hf.dtype = dtype
    hf.save_pretrained(str(out))
    if model.task == "causal-lm":
        generation_config(model, hf, tokenizer, generation).save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def generation_config(model: nnx.Module, hf, tokenizer=None, overrides: dict | None = None):
    """The `GenerationConfig` a causal LM is exported with, so `transformers` and serving tools stop
    where the model learned to stop: the source folder's `generation_config.json` when it has one, else
    derived from `config.json` (as `transformers`' `save_pretrained` does); a missing eos taken from the
    tokenizer; `overrides` (e.g. a chat template's end-of-turn id as `eos_token_id`) applied; a missing
    `pad_token_id` set to the tokenizer's pad token, else the first eos id.
    """
    from transformers import GenerationConfig

    source = getattr(model, "source_dir", None)
    if source and (Path(source) / "generation_config.json").exists():
        gen = GenerationConfig.from_pretrained(source)
    else:
        gen = GenerationConfig.from_model_config(hf)
    if gen.eos_token_id is None and getattr(tokenizer, "eos_token_id", None) is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if overrides:
        gen.update(**overrides)
    if gen.pad_token_id is None:
        pad, eos = getattr(tokenizer, "pad_token_id", None), gen.eos_token_id
        gen.pad_token_id = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return gen
