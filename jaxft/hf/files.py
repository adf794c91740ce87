"""Reading and writing Hugging Face weight files, tensor by tensor, without torch.

Reads `model.safetensors`, sharded `model.safetensors.index.json`, or (only when torch is installed)
`pytorch_model.bin`. Writes `model.safetensors`, or shards plus an index once the model is larger than
`max_shard_bytes`, with the `{"format": "pt"}` metadata `transformers` expects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

SAFE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


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
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = list(_shards(tensors, max_shard_bytes))
    if len(shards) == 1:
        save_file(dict(shards[0]), str(folder / SAFE), metadata={"format": "pt"})
        return [SAFE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(int(t.nbytes) for t in tensors.values())
    (folder / SAFE_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return files + [SAFE_INDEX]


def _shards(tensors: Mapping[str, np.ndarray], limit: int) -> Iterator[dict[str, np.ndarray]]:
    shard, size = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        if shard and size + t.nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += t.nbytes
    yield shard



