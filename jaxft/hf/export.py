"""`jaxft.save_pretrained`: an NNX module → a Hugging Face folder that `transformers` loads unchanged.

Weights go through the family's name table in reverse (transposes and reshapes only, so an untouched
model round-trips bit for bit), parameter by parameter to the host, and are written as safetensors shard
by shard, so the writing host never holds the whole model (see `save_pretrained` for the bound); the
config is the source checkpoint's `config.json` updated with the task's architecture and labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.hf.files import file_in_the_way, plan_bytes, shard_names, staged_folder, write_safetensors_stream
from jaxft.hf.load import flat_params
from jaxft.hf.table import NameTable
from jaxft.models import get_family


def to_host(x: jax.Array) -> np.ndarray:
    """Gather one (possibly sharded, possibly multi-host) array to this host's memory.

    Reads a device copy of a local array: `np.asarray(x)` would leave its host copy cached on `x`
    (jax does so for arrays copied off an accelerator or assembled from shards), and an export
    would end up holding every parameter on the host after all.
    """
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(jnp.copy(x)))
    return np.asarray(x)


@dataclass
class ExportPlan:
    """What an export writes, known from the model's shapes before anything is gathered."""

    tensors: dict[str, tuple[tuple[int, ...], np.dtype]]  # HF name → (shape, dtype), sorted by name
    source: dict[str, tuple[str, tuple[int, ...]]]         # HF name → (jaxft path, index on its stacked axes)


def export_plan(model: nnx.Module, dtype: str | None = None) -> tuple[NameTable, dict[str, nnx.Variable], ExportPlan]:
    """The family's name table, the parameters, and the plan of every HF tensor they export to.

    Names come from `NameTable.export` on a stand-in holding one number per stacked index (inner axes of
    size 1, so nothing the size of the model is allocated), shapes from the rule's `hf_shape`.
    """
    family = get_family(model.hf_config["model_type"], model.task)
    table = family.name_table(model.config, model.task)
    params = flat_params(model)
    tensors, source = {}, {}
    for path, var in params.items():
        value = var.get_value()
        shape = tuple(value.shape)
        out_dtype = np.dtype(value.dtype if dtype is None else dtype)
        rule, _ = table.rule_for_path(path)
        lead, inner = shape[:len(rule.stacked)], shape[len(rule.stacked):]
        hf_shape = tuple(rule.transform.hf_shape(inner))
        stand_in = np.arange(prod(lead)).reshape(lead + (1,) * len(inner))
        for name, t in table.export({path: stand_in}).items():
            tensors[name] = (hf_shape, out_dtype)
            source[name] = (path, tuple(int(i) for i in np.unravel_index(int(t.reshape(-1)[0]), lead)))
    names = sorted(tensors)
    return table, params, ExportPlan({n: tensors[n] for n in names}, {n: source[n] for n in names})


class _Producer:
    """`produce(names)` for `write_safetensors_stream`: for each parameter a shard's tensors come from,
    one at a time, gathers what the shard needs and splits it into those tensors (cast to `dtype`).

    An unstacked parameter is one HF tensor, gathered whole. Of a stacked parameter (`[E, ...]` experts,
    `[L, ...]` scanned layers) only the stacked indices the shard holds are gathered (`_take` picks them
    on the devices first, unless the shard holds all of them), so every tensor's data crosses to the
    host exactly once, in one gather per shard that holds some of the parameter's tensors, however the
    sorted HF names interleave parameters (a scanned layer's parameters all do). The gathers depend only
    on the plan and the names asked for, so every process runs the same ones in the same order; with
    `build=False` (processes that write nothing) it only runs the gathers.
    """

    def __init__(self, table: NameTable, params: dict[str, nnx.Variable], plan: ExportPlan,
                 dtype: str | None = None, build: bool = True):
        self.table, self.params, self.plan, self.dtype, self.build = table, params, plan, dtype, build

    def __call__(self, names: list[str]) -> dict[str, np.ndarray]:
        by_path: dict[str, list[str]] = {}
        for name in names:
            by_path.setdefault(self.plan.source[name][0], []).append(name)
        out = {}
        for path, group in by_path.items():
            x = self.params[path].get_value()
            index = [self.plan.source[name][1] for name in group]
            n_stack = len(index[0])
            if n_stack and len(index) < prod(x.shape[:n_stack]):
                raw = to_host(_take(x, np.asarray(index, np.int32)))  # [len(group), *inner]
                rows = [raw[j:j + 1].reshape((1,) * n_stack + raw.shape[1:]) for j in range(len(group))]
            else:
                raw = to_host(x)
                rows = [raw[tuple(slice(i, i + 1) for i in ix)] if ix else raw for ix in index]
            if self.build:  # each row: a view of `raw`, its stacked axes of size 1
                for name, row in zip(group, rows):
                    (t,) = self.table.export({path: row}).values()
                    out[name] = t if self.dtype is None else t.astype(self.dtype)
            del raw, rows
        return {n: out[n] for n in names} if self.build else {}


@jax.jit
def _take(x: jax.Array, index: np.ndarray) -> jax.Array:
    """`x[index[j]]` for each row `j` of `index` (`[k, n_stacked]`): the rows of a stacked parameter one
    shard needs, picked on the devices (one compilation per parameter shape and row count)."""
    return x[tuple(index[:, d] for d in range(index.shape[1]))]


def hf_tensors(model: nnx.Module, dtype: str | None = None) -> dict[str, np.ndarray]:
    """The model's parameters under the names `save_pretrained` of the HF task class writes, all in
    memory at once (sorted by name; `save_pretrained` streams them instead)."""
    table, params, plan = export_plan(model, dtype)
    return _Producer(table, params, plan, dtype)(list(plan.tensors))


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

    The files are written into a new folder beside `out_dir` that replaces `out_dir` as a whole at the end
    (`staged_folder`): no file of an earlier export survives, and a failed export leaves the earlier one
    as it was. `out_dir` must not be a file, a symbolic link or a folder holding links
    (`check_export_target`).

    Call it on every process of a multi-host run: arrays are gathered collectively (every process runs
    the same gathers in the same order), files are written by process 0 only.

    Weights are streamed shard by shard (`write_safetensors_stream`; same shards, files and index as
    `write_safetensors` on all the tensors), gathering for each shard only the tensors it holds: an
    unstacked parameter whole, a stacked one (experts, scanned layers) only the stacked indices in the
    shard, so every tensor is gathered exactly once. Process 0 holds at most one shard of HF tensors
    (`max_shard_bytes`, or one tensor alone when it is larger) plus one gathered block: an unstacked
    parameter or one shard's part of a stacked one, in the model's dtype (plus, when casting to `dtype`,
    one tensor in transit). That is at most `max_shard_bytes` + the largest parameter; other processes
    hold one gathered block. Logs a line per shard. Process 0 writes between gathers, so if its writing
    fails the other processes wait in their next gather until the distributed runtime notices process 0
    is gone.
    """
    out = Path(out_dir)
    table, params, plan = export_plan(model, dtype)
    if jax.process_index() != 0:
        produce = _Producer(table, params, plan, dtype, build=False)
        for names in shard_names(plan_bytes(plan.tensors), max_shard_bytes):
            produce(names)
        return out
    check_export_target(out, overwrite=True)
    with staged_folder(out) as tmp:  # replaces `out` as a whole once every file is written
        write_safetensors_stream(plan.tensors, _Producer(table, params, plan, dtype), tmp, max_shard_bytes)
        from transformers import AutoConfig

        cfg = hf_config_dict(model, id2label)
        hf = AutoConfig.for_model(**cfg)
        if dtype is not None:
            hf.dtype = dtype
        hf.save_pretrained(str(tmp))
        if model.task == "causal-lm":
            generation_config(model, hf, tokenizer, generation).save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def is_run_dir(path: Path) -> bool:
    """A folder holding a jaxft run: its `config.yaml` and `checkpoints/`."""
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def check_export_target(out: str | os.PathLike, overwrite: bool, keep: tuple = ()) -> None:
    """Refuse, naming the path, an export target that cannot be (re)placed safely: a file, a symbolic link
    or a folder holding links (a Hugging Face cache snapshot links into shared blobs), a non-empty folder
    without `overwrite`, a folder that is or holds one of `keep` (the run being exported, its base model),
    and a folder that is, lies inside or holds a jaxft run directory (`is_run_dir`: `RUN/checkpoints` would
    be replaced by the export), except the run's own export folder `RUN/export` (and folders under it), where
    the run-directory layout puts exports. An accepted target is replaced as a whole
    (`jaxft.hf.files.staged_folder`), never written into."""
    out = Path(out)
    if out.is_symlink():
        raise ValueError(f"export target {out} is a symbolic link (to {os.readlink(out)}); jaxft never writes "
                         f"through links: give a real folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export target {out} is a file, not a folder")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise NotADirectoryError(f"export target {out}: {blocker} is a file, not a folder")
    for path in keep:
        if path is not None and Path(path).exists() and (
                out.resolve() == Path(path).resolve() or out.resolve() in Path(path).resolve().parents):
            raise ValueError(f"export target {out} would replace {path}, which the export reads; choose another "
                             f"folder (e.g. {_sibling(path)})")
    spelled, real = Path(os.path.abspath(out)), out.resolve()  # as given (`..` folded), and through links
    run = next((d for t in (spelled, real) for d in (t, *t.parents) if is_run_dir(d)), None)
    if run is not None and any(t.is_relative_to(run / EXPORT_FOLDER) for t in (spelled, real)):
        run = None   # RUN/export: the run directory's own place for exports
    if run is not None:
        where = "is the jaxft run directory" if run in (spelled, real) else "lies inside the jaxft run directory"
        raise ValueError(f"export target {out} {where} {run} (it holds config.yaml and checkpoints/): the export "
                         f"replaces its target as a whole and would destroy the run's files; export to "
                         f"{run / EXPORT_FOLDER} or to a folder outside the run (e.g. {_sibling(run)})")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it (the folder is replaced as "
                              f"a whole once the new export is complete)")
    link = next((p for p in out.rglob("*") if p.is_symlink()), None)
    if link is not None:
        raise ValueError(f"export target {out} holds symbolic links ({link} → {os.readlink(link)}), as a Hugging "
                         f"Face cache snapshot does: its files are shared blobs, so jaxft will not replace it; "
                         f"export to another folder")
    held = next((p.parent for p in out.rglob("config.yaml") if is_run_dir(p.parent)), None)
    if held is not None:
        raise ValueError(f"export target {out} holds the jaxft run directory {held} (config.yaml and checkpoints/): "
                         f"replacing {out} would delete that run; export to another folder")


EXPORT_FOLDER = "export"   # RUN/export: where a run directory holds its exports (DESIGN: the run directory)


def _sibling(path) -> Path:
    """`PATH-export` beside `path`: the folder an export refused at `path` is pointed to."""
    path = Path(os.path.abspath(path))
    return path.with_name(path.name + "-export")


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
