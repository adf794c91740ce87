"""Reading and writing Hugging Face weight files, tensor by tensor, without torch.

Reads `model.safetensors`, sharded `model.safetensors.index.json`, or (only when torch is installed)
`pytorch_model.bin`. Writes `model.safetensors`, or shards plus an index once the model is larger than
`max_shard_bytes`, with the `{"format": "pt"}` metadata `transformers` expects: from a dict of tensors
(`write_safetensors`), or streamed from a plan of names and shapes, one shard in memory at a time
(`write_safetensors_stream`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from math import prod
from typing import Callable, Mapping

import numpy as np

SAFE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
log = logging.getLogger("jaxft")


class WeightFile:
    """The tensors of a model folder: `names` plus `read(name) -> np.ndarray`, opened lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._handles: dict[str, object] = {}
        self._torch: dict[str, np.ndarray] | None = None
        if (self.folder / SAFE_INDEX).exists():
            index = json.loads((self.folder / SAFE_INDEX).read_text())
            self.where = dict(index["weight_map"])
            missing = sorted({f for f in self.where.values() if not (self.folder / f).exists()})
            if missing:
                raise FileNotFoundError(f"{self.folder / SAFE_INDEX} lists shard {missing[0]!r}, "
                                        f"which is not in {self.folder}")
        elif (self.folder / SAFE).exists():
            self.where = {n: SAFE for n in self._open(SAFE).keys()}
        elif (self.folder / TORCH_BIN).exists():
            self._torch = _read_torch_bin(self.folder / TORCH_BIN)
            self.where = {n: TORCH_BIN for n in self._torch}
        else:
            raise FileNotFoundError(f"model folder {self.folder} has no weights: expected {SAFE}, "
                                    f"{SAFE_INDEX} or {TORCH_BIN}")

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def _open(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            path = self.folder / file
            try:
                self._handles[file] = safe_open(str(path), framework="np")
            except Exception as e:  # truncated or corrupt files fail here with a terse message
                raise ValueError(f"cannot read safetensors file {path}: {e}") from e
        return self._handles[file]

    def read(self, name: str) -> np.ndarray:
        if self._torch is not None:
            return self._torch[name]
        file = self.where[name]
        try:
            return self._open(file).get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {self.folder / file}: {e}") from e

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`read(name)[index]`, reading only that slice from disk (safetensors `get_slice`)."""
        if self._torch is not None:
            return self._torch[name][index]
        file = self.where[name]
        try:
            return self._open(file).get_slice(name)[index]
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {self.folder / file}: {e}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the file header (nothing is read)."""
        if self._torch is not None:
            return tuple(self._torch[name].shape)
        try:
            return tuple(self._open(self.where[name]).get_slice(name).get_shape())
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {self.describe(name)}: {e}") from e

    def describe(self, name: str) -> str:
        return str(self.folder / self.where[name])


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch pickle; reading it needs torch (pip install 'jaxft[torch]'), "
                          f"or convert the folder to safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def write_safetensors(tensors: Mapping[str, np.ndarray], folder: str | os.PathLike,
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `tensors` as one file or as shards with an index; returns the files written."""
    plan = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    return write_safetensors_stream(plan, lambda names: {n: tensors[n] for n in names}, folder, max_shard_bytes)


def plan_bytes(plan: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, int]:
    """`{name: bytes}` of a plan `{name: (shape, dtype)}`."""
    return {name: prod(shape) * np.dtype(dtype).itemsize for name, (shape, dtype) in plan.items()}


def shard_names(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """The names of each shard, given `{name: bytes}`: names in sorted order, a new shard started when the
    next tensor would take the current one past `max_shard_bytes` (so a tensor larger than the limit
    gets a shard of its own). Always at least one (possibly empty) shard."""
    shards, shard, size = [], [], 0
    for name in sorted(sizes):
        if shard and size + sizes[name] > max_shard_bytes:
            shards.append(shard)
            shard, size = [], 0
        shard.append(name)
        size += sizes[name]
    return shards + [shard]


def shard_file(i: int, n: int) -> str:
    """File name of shard `i` (1-based) of `n`."""
    return SAFE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def write_safetensors_stream(plan: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                             produce: Callable[[list[str]], Mapping[str, np.ndarray]],
                             folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write a model shard by shard, holding one shard of tensors at a time.

    `plan` is `{name: (shape, dtype)}` of every tensor, known before any data exists; it fixes the shards
    (`shard_names`, the same split and the same files as `write_safetensors`). `produce(names)` is called
    once per shard, in order, with that shard's sorted names and returns those tensors; they must match
    the plan. Each shard is written and dropped before the next is produced; the index (when sharded) is
    written last. Logs one line per shard on the `jaxft` logger. Returns the files written.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = plan_bytes(plan)
    shards = shard_names(sizes, max_shard_bytes)
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        file = shard_file(i, len(shards))
        tensors = produce(names)
        if sorted(tensors) != names:
            raise ValueError(f"shard {file}: expected tensors {names}, got {sorted(tensors)}")
        for name in names:
            _check(name, tensors[name], *plan[name])
        save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
        del tensors
        log.info("export: wrote %s (%s, %d/%d)", file, _human(sum(sizes[n] for n in names)), i, len(shards))
        files.append(file)
        weight_map.update({n: file for n in names})
    if len(shards) == 1:
        return files
    (folder / SAFE_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2))
    return files + [SAFE_INDEX]


def _check(name: str, t: np.ndarray, shape: tuple[int, ...], dtype) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != np.dtype(dtype):
        raise ValueError(f"tensor {name!r} is {t.dtype}{list(t.shape)}, the export plan says "
                         f"{np.dtype(dtype)}{list(shape)}")


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
