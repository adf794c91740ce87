"""Orbax checkpoints of a run: `RUN_DIR/checkpoints/<step>/{state,meta}`.

`params` holds the model parameters and `train` the rest of the train state (optimizer state, step,
RNG key), both written asynchronously and collectively by all processes (eval and export restore
`params` alone); `meta` is JSON (data-iterator position, the eval metrics at that step).
Retention: the latest `checkpoint.keep` checkpoints plus the best one by the early-stopping metric.
Orbax finalises a checkpoint atomically, so a half-written one is never listed or restored.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class Checkpoints:
    def __init__(self, run_dir: str | Path, keep: int = 2, metric: str | None = None, mode: str = "max",
                 read_only: bool = False):
        self.metric, self.mode = metric, mode
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
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def best_step(self) -> int | None:
        """The kept step with the best eval metric, or None when no checkpoint has one."""
        scored = [(self._score(self.meta(s).get("metrics") or {}), s) for s in self.steps()]
        scored = [(v, s) for v, s in scored if v != -math.inf]
        return max(scored)[1] if scored else None

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """Restore the items of `target` (`params` and optionally `train`: arrays or ShapeDtypeStructs
        giving the shapes, dtypes and shardings to restore onto) plus `meta`."""
        args = {k: ocp.args.StandardRestore(_abstract(v)) for k, v in target.items()}
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        return {k: out[k] for k in target}, out["meta"]

    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
