"""Orbax checkpoints of a run: `RUN_DIR/checkpoints/<step>/{state,meta}`.

`params` holds the model parameters and `train` the rest of the train state (optimizer state, step,
RNG key), both written asynchronously and collectively by all processes (eval and export restore
`params` alone); `meta` is JSON (data-iterator position, the eval metrics at that step).
Retention: the latest `checkpoint.keep` checkpoints plus the best one by the early-stopping metric.
Orbax finalises a checkpoint atomically, so a half-written one is never listed or restored; a step
folder without Orbax's commit record (`_CHECKPOINT_METADATA`), e.g. an empty stray `checkpoints/5`,
is not listed either (with a warning), so it never hides the newest complete checkpoint. A checkpoint
that cannot be read (a cut or missing file) raises `CheckpointError` naming the step and the file.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger("jaxft")
COMMIT_RECORD = "_CHECKPOINT_METADATA"  # written by Orbax when a checkpoint is finalised


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the step and the file."""


def incomplete_steps(run_dir: str | Path) -> list[Path]:
    """Step folders of `RUN_DIR/checkpoints` that Orbax never committed (no `_CHECKPOINT_METADATA`)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.name.isdigit() and not (p / COMMIT_RECORD).is_file()),
                  key=lambda p: int(p.name))


class Checkpoints:
    def __init__(self, run_dir: str | Path, keep: int = 2, metric: str | None = None, mode: str = "max",
                 read_only: bool = False):
        self.metric, self.mode = metric, mode
        self.dir = Path(run_dir).absolute() / "checkpoints"
        for p in incomplete_steps(run_dir):
            log.warning("%s is not a complete checkpoint (no %s): ignored", p, COMMIT_RECORD)
        keepers = [policies.LatestN(n=keep)]
        if metric is not None:
            keepers.append(policies.BestN(get_metric_fn=lambda m: self._score(m), reverse=False, n=1,
                                          keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keepers), create=not read_only,
            read_only=read_only, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options,
                                             item_names=("params", "train", "meta"))

    def _score(self, metrics: dict) -> float:
        """Larger is better for the preservation policy; a missing/NaN metric ranks last."""
        v = metrics.get(self.metric) if metrics else None
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return -math.inf
        return v if self.mode == "max" else -v

    def save(self, step: int, state: dict, meta: dict, metrics: dict | None = None) -> None:
        rest = {k: v for k, v in state.items() if k != "params"}
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                                        train=ocp.args.StandardSave(rest),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return max(steps) if steps else None

    def steps(self) -> list[int]:
        """The committed steps (a step folder without Orbax's commit record is never listed)."""
        return sorted(s for s in self.manager.all_steps() if (self.dir / str(s) / COMMIT_RECORD).is_file())

    def meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise self._error(step, "meta", e) from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint step {step}: {self.dir / str(step) / 'meta'} holds no JSON object")
        return Meta(meta, step, self.dir / str(step) / "meta")

    def _error(self, step: int, item: str, e: Exception) -> CheckpointError:
        """`CheckpointError` naming the step, the file (or item folder) and the cause, without the storage
        spec Orbax and TensorStore dump; with the other steps left to use."""
        chain, seen = [], e
        while seen is not None and len(chain) < 10:
            chain.append(str(seen))
            seen = seen.__cause__ or seen.__context__
        text = "\n".join(chain)
        where = self.dir / str(step) / item
        m = re.search(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)"', text)
        if m:
            where = f"array {m.group(1).split('/')[0]!r} in {m.group(2).rstrip('/')}"
        causes = [c.split("See full TensorStore details")[0].strip() for c in chain]
        cause = next((c for c in reversed(causes) if c), type(e).__name__).splitlines()[0][:300]
        others = [s for s in self.steps() if s != step]
        advice = (f"; move {self.dir / str(step)} out of {self.dir} to use step {max(others)}" if others
                  else "; no other checkpoint is left")
        return CheckpointError(f"checkpoint step {step} cannot be read: {where}: {cause}{advice}")

    def best_step(self) -> int | None:
        """The kept step with the best eval metric, or None when no checkpoint has one."""
        scored = [(self._score(self.meta(s).get("metrics") or {}), s) for s in self.steps()]
        scored = [(v, s) for v, s in scored if v != -math.inf]
        return max(scored)[1] if scored else None

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """Restore the items of `target` (`params` and optionally `train`: arrays or ShapeDtypeStructs
        giving the shapes, dtypes and shardings to restore onto) plus `meta`."""
        args = {k: ocp.args.StandardRestore(_abstract(v)) for k, v in target.items()}
        meta = self.meta(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise self._error(step, "/".join(target), e) from None
        return {k: out[k] for k in target}, meta
    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


class Meta(dict):
    """A checkpoint's `meta`: a missing entry raises `CheckpointError` naming the step and the file, not a
    bare `KeyError`."""

    def __init__(self, data: dict, step: int, path: Path):
        super().__init__(data)
        self.step, self.path = step, path

    def __missing__(self, key):
        raise CheckpointError(f"checkpoint step {self.step}: {self.path} has no {key!r} entry (written by another "
                              f"jaxft version, or damaged)")
