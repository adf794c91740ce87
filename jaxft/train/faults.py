"""Faults a long run must survive: preemption, non-finite steps, loss spikes, changed configs on resume.

Exit codes of `jaxft train` (besides 0 and 2 = bad input):

    75  preempted (SIGTERM/SIGINT): a checkpoint was written at a step boundary; re-run the same command
    3   too many non-finite steps in a row: stopped with a checkpoint of the last good state
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
from collections import deque

import jax

log = logging.getLogger("jaxft")

PREEMPTED_EXIT_CODE = 75
DIVERGED_EXIT_CODE = 3


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the CLI exits with `PREEMPTED_EXIT_CODE`."""


class Diverged(Exception):
    """Raised after `train.max_bad_steps` non-finite steps in a row; exits with `DIVERGED_EXIT_CODE`."""


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into "checkpoint at the next step boundary, then exit".

    One process: a signal handler sets a flag. Several processes: JAX's coordination service (started
    by `jax.distributed.initialize`) already listens for SIGTERM — and, on TPU VMs, for maintenance
    events — and `reached_preemption_sync_point` makes every process agree on the same step; it does
    not listen for SIGINT, so a first Ctrl-C is forwarded to it as a SIGTERM to this process.
    """

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        self._previous = {}
        for sig in (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: will checkpoint at the next step boundary and exit",
                    signal.Signals(signum).name)
        if self.multi:  # JAX's preemption notifier (a C++ SIGTERM handler) tells every process
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SpikeDetector:
    """Flags a logged loss above `factor` × the median of the last `window` logged losses."""

    def __init__(self, factor: float | None, window: int = 20):
        self.factor, self.history = factor, deque(maxlen=window)

    def check(self, step: int, loss: float) -> bool:
        spike = (self.factor is not None and len(self.history) >= 3
                 and loss > self.factor * statistics.median(self.history))
        if spike:
            log.warning("loss spike at step %d: %.4g > %.1f × running median %.4g", step, loss, self.factor,
                        statistics.median(self.history))
        self.history.append(loss)
        return spike


# Settings whose change on resume does not change the math of the steps already taken or to come
# (cadence, bookkeeping, how long to train).
SAFE_TO_CHANGE = {
    "train.steps", "train.epochs", "train.eval_every", "train.log_every", "train.eval_batch_size",
    "train.early_stopping.patience", "train.max_bad_steps", "train.spike_factor", "train.stop_at_step",
    "train.log_batches", "checkpoint.every", "checkpoint.keep", "checkpoint.resume",
    "checkpoint.allow_changes", "checkpoint.overwrite", "output_dir", "data.cache_dir", "data.validation", "data.test",
    # how processes find each other (each process has its own id) and how long they wait
    "mesh.distributed", "mesh.coordinator", "mesh.num_processes", "mesh.process_id", "mesh.init_timeout",
    # recomputing activations changes memory, not the math
    "model.remat",
}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key: old → new` for every math-changing difference between two resolved configs."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in SAFE_TO_CHANGE]
