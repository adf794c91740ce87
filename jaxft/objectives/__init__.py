"""Training objectives: what a step's batch is, its loss and metrics, and any frozen second model. One file
per method, registered here by the name `train.objective` takes; the loop (`jaxft.train.loop`) talks to each
through the interface of `jaxft.objectives.base.Objective` and never branches on which one it runs.

    supervised   the model head's own loss (`supervised.py`; several tasks on one encoder: `multitask.py`)
    distill      a frozen teacher's soft labels beside the task loss (`distill.py`)
    dpo, ipo, simpo, orpo   preference pairs (`preference.py`)
    grpo         online RL with verifiable rewards: completions sampled from the current policy (`grpo.py`)
"""

from __future__ import annotations

from pathlib import Path

from jaxft.config import Config
from jaxft.data import SPLITS
from jaxft.objectives.base import Objective
from jaxft.objectives.distill import DistillObjective
from jaxft.objectives.grpo import GRPOObjective
from jaxft.objectives.preference import PreferenceObjective
from jaxft.objectives.supervised import TASKS, CausalLMTask, ClassificationTask, supervised

OBJECTIVES = {"supervised": supervised, "distill": DistillObjective, "grpo": GRPOObjective,
              **{kind: PreferenceObjective for kind in ("dpo", "ipo", "simpo", "orpo")}}

__all__ = ["OBJECTIVES", "TASKS", "CausalLMTask", "ClassificationTask", "Objective", "make_task"]


def make_task(cfg: Config, tokenizer, run_dir: Path, resuming: bool, splits=SPLITS):
    """The objective of `cfg.train.objective` (for `supervised`, the task of `cfg.model.task`) with its data
    built; `splits` limits which splits are read."""
    return OBJECTIVES[cfg.train.objective](cfg, tokenizer, run_dir, resuming, splits)
