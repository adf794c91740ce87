"""Supervised objectives: the loss of the model's own head. `ClassificationTask` (sequence classification,
cross-entropy against the label) and `CausalLMTask` (next-token cross-entropy on the trained tokens), picked by
`model.task`; several classification/regression tasks on one encoder when the config lists `tasks:`
(`jaxft.objectives.multitask`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from jaxft.config import Config
from jaxft.data import SPLITS, build_classification_data, build_sft_data
from jaxft.data.batches import Batches, to_device
from jaxft.data.report import write_report_md
from jaxft.train.evaluate import evaluate_classification
from jaxft.models.moe import RouterStats, router_metrics
from jaxft.train.losses import classification_loss, make_causal_lm_loss, make_classification_loss
from jaxft.objectives.base import Objective
from jaxft.objectives.multitask import MultiTaskObjective
from jaxft.train.run import read_labels, write_json

log = logging.getLogger("jaxft")


class ClassificationTask(Objective):
    loss = staticmethod(classification_loss)
    eval_loss = staticmethod(classification_loss)  # plain CE, whatever train.label_smoothing is

    def __init__(self, cfg: Config, tokenizer, run_dir: Path, resuming: bool, splits=SPLITS):
        data = build_classification_data(cfg, tokenizer, read_labels(run_dir) if resuming else None, splits)
        self.label_map, self.splits = data.label_map, data.splits
        if "train" in splits:  # a training run records its label map and data report
            write_report_md(run_dir / "data_report.md", data.reports)  # data.clean counts as a table
            write_json(run_dir / "labels.json", data.label_map.to_json())
            augment = [vars(data.augment)] if data.augment else []  # data.augment's row counts
            write_json(run_dir / "data_report.json", [vars(r) | {"rows_out": r.rows_out} for r in data.reports] + augment)
        self.model_kwargs = {"num_labels": len(self.label_map)}
        self.export_kwargs = {"id2label": self.label_map.id2label}
        if cfg.train.label_smoothing:
            self.loss = make_classification_loss(cfg.train.label_smoothing)

    @staticmethod
    def train_metrics(s: dict, n_steps: int) -> dict:
        return {"loss": s["loss"] / n_steps, "accuracy": s["correct"] / s["weight"],
                "grad_norm": s["grad_norm"] / n_steps}

    def evaluate(self, eval_step, params, split: str, mesh) -> dict:
        return evaluate_classification(eval_step, params, self.splits[split], mesh, len(self.label_map))


class CausalLMTask(Objective):
    model_kwargs: dict = {}

    def __init__(self, cfg: Config, tokenizer, run_dir: Path, resuming: bool, splits=SPLITS):
        self.loss = self.eval_loss = make_causal_lm_loss(cfg.model.moe.aux_loss_coef, cfg.train.loss_chunk_tokens)
        if cfg.train.label_smoothing:
            self.loss = make_causal_lm_loss(cfg.model.moe.aux_loss_coef, cfg.train.loss_chunk_tokens,
                                            cfg.train.label_smoothing)
        self.splits, reports, template = build_sft_data(cfg, tokenizer, splits)
        if "train" in splits:
            write_json(run_dir / "data_report.json", [vars(r) | {"rows_out": r.rows_out} for r in reports])
        self.export_kwargs = {"chat_template": template} if template else {}

    @staticmethod
    def train_metrics(s: dict, n_steps: int) -> dict:
        out = {"loss": s["loss"] / n_steps, "grad_norm": s["grad_norm"] / n_steps,
               "trained_tokens_per_step": s["weight"] / n_steps, "padding_fraction": 1 - s["tokens"] / s["slots"]}
        if "moe_counts" in s:  # expert load over the logging window
            stats = RouterStats(np.asarray(s["moe_counts"]), np.asarray([s["moe_balance_loss"] / n_steps]))
            out.update({k: float(v) for k, v in router_metrics(stats).items()})
        return out

    def evaluate(self, eval_step, params, split: str, mesh) -> dict:
        return evaluate_causal_lm(eval_step, params, self.splits[split], mesh)


def evaluate_causal_lm(eval_step, params, batches: Batches, mesh) -> dict:
    """Token-mean next-token loss over the split, and its perplexity exp(loss)."""
    loss, tokens = 0.0, 0.0
    for batch in batches.epoch():
        loss_sum, aux = eval_step(params, to_device(batch, mesh))
        loss += float(loss_sum)
        tokens += float(aux["weight"])
    mean = loss / max(tokens, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": int(tokens)}


TASKS = {"sequence-classification": ClassificationTask, "causal-lm": CausalLMTask}


def supervised(cfg: Config, *args):
    """The model head's own loss: the task of `model.task`, or of several tasks on one encoder (`tasks:`)."""
    return MultiTaskObjective(cfg, *args) if cfg.tasks else TASKS[cfg.model.task](cfg, *args)
