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
import shutil
from contextlib import contextmanager
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
            self.where = read_index(self.folder / SAFE_INDEX)
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


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; errors name the file (`what` says what it is)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def read_index(path: Path) -> dict[str, str]:
    """The `weight_map` (tensor name → shard file) of a sharded checkpoint's index."""
    weight_map = read_json_object(path, "weight index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"weight index {path} has no \"weight_map\" object mapping tensor names to shard files")
    return dict(weight_map)


def check_model_folder(folder: str | os.PathLike) -> None:
    """Fail early, naming the file, on a model folder whose `config.json` or weight index is broken (before
    `transformers` reads them and fails with a bare traceback)."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    model_type = read_json_object(config, "model config").get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model config {config} has no \"model_type\" (e.g. \"bert\", \"llama\")")
    if (folder / SAFE_INDEX).exists():
        read_index(folder / SAFE_INDEX)


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch pickle; reading it needs torch (pip install 'jaxft[torch]'), "
                          f"or convert the folder to safetensors") from e
    try:  # weights_only: never run code from the file; its failure advice (weights_only=False) is not repeated
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read PyTorch weights {path}: not a state dict of tensors that torch.load "
                         f"reads safely ({type(e).__name__}); re-save the model with save_pretrained "
                         f"(safetensors)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"cannot read PyTorch weights {path}: it holds a {type(state).__name__}, not a state "
                         f"dict of tensors")
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


@contextmanager
def staged_folder(out: str | os.PathLike):
    """Write a folder all at once: yields a new sibling folder (`.NAME.jaxft-tmp-PID`) to write into; when
    the block completes it takes `out`'s place (an atomic exchange where the OS has one, else two renames)
    and the previous `out` is removed; when the block fails it is removed and `out` is left as it was.
    So a replaced folder never keeps a stale file of the old one, and a failed write never loses it.
    Temporary folders that a killed writer left beside `out` are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.jaxft-tmp-*"):
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.jaxft-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() and _exchange(tmp, out):
            shutil.rmtree(tmp)  # now the previous folder
        elif out.exists():
            old = out.parent / f".{out.name}.jaxft-old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return True  # not ours: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    try:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return False
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


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


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is a file (so `path` cannot be created), else None."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    return None if parent.is_dir() else parent
