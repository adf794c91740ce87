"""Multi-task learning (`tasks:`): several classification tasks on one shared encoder.

The mechanism is one head, not one head per task: the model is the family's own sequence-classification
model loaded with `num_labels = Σ_i C_i`, and task `i` owns the classifier columns `[o_i, o_i + C_i)`. A
row of task `i` carries its task id and its label shifted by `o_i`; the loss masks every other task's
columns out of the row's logits (to −1e9, an exact zero after softmax), so its cross-entropy is exactly
the one of a separate `C_i`-way head with those weights, and the gradient never reaches another task's
columns. A column block of a linear map *is* a separate linear head, so nothing is lost, and every task's
batch runs the same compiled program; checkpoints, LoRA (`train_modules` keeps the classifier trained in
full), sharding and resume are those of a single-task run.

The loss is `Σ_rows loss_weight[task] · CE` over `Σ_rows 1`: a task's `loss_weight` scales its gradient.
Which task each batch comes from is `jaxft.data.multitask` (sampling strategies, exact resume).

Metrics: every task's `NAME/loss`, `NAME/accuracy` (+ `NAME/macro_f1`, `NAME/examples` on eval), and their
means weighted by `loss_weight` under the plain names (`accuracy`, `loss`, `macro_f1`), so early stopping
watches the mean by default and any `NAME/metric` when `train.early_stopping.metric` names it.

Export (`export_tasks`): one Hugging Face folder per task, the shared encoder and pooler plus that task's
columns of the classifier as a `C_i`-way head, with the task's own labels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxft.config import Config, TaskSpec
from jaxft.data import SPLITS, build_classification_data
from jaxft.data.batches import to_device
from jaxft.data.clean import LabelMap
from jaxft.data.multitask import MultiTaskBatches, task_probabilities
from jaxft.train.evaluate import macro_f1
from jaxft.train.run import write_json

log = logging.getLogger("jaxft")
TASKS_FILE = "tasks.json"  # per task: its label map and its classifier columns (RUN_DIR/tasks.json)


def task_config(cfg: Config, spec: TaskSpec) -> Config:
    """The single-task config of one task: its data fields and label count, everything else shared."""
    data = cfg.data.model_copy(update={
        "train": spec.train, "validation": spec.validation, "test": spec.test, "text_field": spec.text_field,
        "text_pair_field": spec.text_pair_field, "label_field": spec.label_field,
        "max_train_rows": spec.max_train_rows or cfg.data.max_train_rows})
    return cfg.model_copy(update={"data": data, "model": cfg.model.model_copy(update={"num_labels": spec.num_labels}),
                                  "tasks": None})


def read_tasks(run_dir: Path) -> dict[str, dict]:
    """`{name: {"offset": o, "labels": LabelMap}}` as a run recorded them at its start."""
    path = Path(run_dir) / TASKS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a multi-task run directory")
    return {k: {"offset": int(v["offset"]), "labels": LabelMap.from_json(v["labels"])}
            for k, v in json.loads(path.read_text()).items()}


def make_multitask_loss(sizes: list[int], loss_weights: list[float]):
    """The loss over the shared head (see the module docstring); per-task sums ride in `aux` as `[K]` arrays."""
    col_task = jnp.asarray(np.repeat(np.arange(len(sizes)), sizes), jnp.int32)  # [C]: the task of each column
    lw = jnp.asarray(loss_weights, jnp.float32)
    K = len(sizes)

    def multitask_loss(model, batch, dropout_rng):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], dropout_rng=dropout_rng)
        t, w, y = batch["task"], batch["weights"], batch["labels"]
        own = col_task[None, :] == t[:, None]                      # [B, C]
        logits = jnp.where(own, logits, -1e9)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        rows = (t[:, None] == jnp.arange(K)[None, :]).astype(jnp.float32) * w[:, None]  # [B, K]
        aux = {"weight": jnp.sum(w), "correct": jnp.sum(correct * w), "task_weight": rows.sum(0),
               "task_correct": (rows * correct[:, None]).sum(0), "task_loss": (rows * ce[:, None]).sum(0),
               "logits": logits}
        return jnp.sum(lw[t] * ce * w), aux

    return multitask_loss


class MultiTaskObjective:
    """The objective of a run with `tasks:` (picked by `jaxft.train.tasks.make_task`)."""

    def __init__(self, cfg: Config, tokenizer, run_dir: Path, resuming: bool, splits=SPLITS):
        specs = cfg.tasks
        saved = read_tasks(run_dir) if resuming and (Path(run_dir) / TASKS_FILE).exists() else {}
        self.names = [s.name for s in specs]
        self.loss_weights = [s.loss_weight for s in specs]
        self.labels, self.offsets, offset = {}, {}, 0
        by_split: dict[str, dict] = {s: {} for s in splits}
        reports = []
        for i, spec in enumerate(specs):
            given = saved[spec.name]["labels"] if spec.name in saved else None
            if given is None and "train" not in splits:
                raise FileNotFoundError(f"{run_dir}/{TASKS_FILE} has no label map of task {spec.name!r}")
            data = build_classification_data(task_config(cfg, spec), tokenizer, given, splits)
            self.labels[spec.name], self.offsets[spec.name] = data.label_map, offset
            for split, b in data.splits.items():  # global column labels and the task id of every row
                b.per_example["labels"] = b.per_example["labels"] + offset
                b.per_example["task"] = np.full(len(b.enc), i, np.int32)
                by_split[split][spec.name] = b
            reports += [vars(r) | {"rows_out": r.rows_out, "task": spec.name} for r in data.reports]
            offset += len(data.label_map)
        self.sizes = [len(self.labels[n]) for n in self.names]
        self.loss = make_multitask_loss(self.sizes, self.loss_weights)
        self.splits = {s: b for s, b in by_split.items() if b and s != "train"}
        # the model's head is every task's columns; restore_run reads its width from labels.json
        combined = LabelMap(tuple(f"{n}/{x}" for n in self.names for x in self.labels[n].names),
                            tuple(f"{n}/{x}" for n in self.names for x in self.labels[n].names))
        self.model_kwargs = {"num_labels": len(combined)}
        self.export_kwargs = {"id2label": combined.id2label}
        if by_split.get("train"):
            sizes = [len(by_split["train"][n].enc) for n in self.names]
            sp = cfg.sampling
            probs = task_probabilities(sizes, sp.strategy, sp.temperature, [s.weight for s in specs])
            self.splits["train"] = MultiTaskBatches(by_split["train"], probs, cfg.train.seed)
            log.info("multi-task sampling (%s): %s", sp.strategy,
                     ", ".join(f"{n} {p:.3f} of batches ({k} examples)" for n, p, k in zip(self.names, probs, sizes)))
            write_json(run_dir / "labels.json", combined.to_json())
            write_json(run_dir / TASKS_FILE, {n: {"offset": self.offsets[n], "labels": self.labels[n].to_json(),
                                                  "train_examples": k, "probability": float(p)}
                                              for n, k, p in zip(self.names, sizes, probs)})
            write_json(run_dir / "data_report.json", reports)

    @staticmethod
    def frozen_model(start):
        return None

    def train_metrics(self, s: dict, n_steps: int) -> dict:
        out = {"loss": s["loss"] / n_steps, "accuracy": s["correct"] / s["weight"],
               "grad_norm": s["grad_norm"] / n_steps}
        for i, name in enumerate(self.names):
            n = float(s["task_weight"][i])
            if n > 0:  # a task the window drew no batch of has no train metrics in it
                out.update({f"{name}/loss": float(s["task_loss"][i]) / n,
                            f"{name}/accuracy": float(s["task_correct"][i]) / n, f"{name}/examples": n})
        return out

    def evaluate(self, eval_step, params, split: str, mesh) -> dict:
        """Each task's loss, accuracy, macro-F1 over its split, and their `loss_weight`-weighted means."""
        per, out = {}, {}
        for i, name in enumerate(self.names):
            batches = self.splits[split].get(name)
            if batches is None:
                continue
            off, loss, preds, golds = self.offsets[name], 0.0, [], []
            for batch in batches.epoch():
                _, aux = eval_step(params, to_device(batch, mesh))
                keep = batch["weights"] > 0
                loss += float(np.asarray(aux["task_loss"])[i])  # on the host: no program per index
                preds.append(np.asarray(aux["logits"]).argmax(-1)[keep] - off)
                golds.append(batch["labels"][keep] - off)
            pred, gold = np.concatenate(preds), np.concatenate(golds)
            per[name] = {"loss": loss / len(gold), "accuracy": float(np.mean(pred == gold)),
                         "macro_f1": macro_f1(pred, gold, len(self.labels[name])), "examples": int(len(gold))}
        lw = {n: w for n, w in zip(self.names, self.loss_weights) if n in per}
        for k in ("loss", "accuracy", "macro_f1"):
            out[k] = sum(lw[n] * per[n][k] for n in per) / sum(lw.values())
        for name, m in per.items():
            out.update({f"{name}/{k}": v for k, v in m.items()})
        return out


def task_model(model: nnx.Module, offset: int, n: int, id2label: dict[int, str]) -> nnx.Module:
    """A sequence-classification model of one task: `model`'s encoder and pooler (the same arrays) with
    classifier columns `[offset, offset + n)` as an `n`-way head."""
    graphdef, state = nnx.split(model)
    # new Variable objects holding the same arrays: setting the head's classifier leaves `model` as it is
    head = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    head.classifier.kernel.set_value(model.classifier.kernel.get_value()[..., offset:offset + n])
    head.classifier.bias.set_value(model.classifier.bias.get_value()[offset:offset + n])
    head.config = dataclasses.replace(model.config, num_labels=n)
    head.hf_config = dict(model.hf_config) | {"id2label": {str(k): v for k, v in id2label.items()},
                                              "label2id": {v: k for k, v in id2label.items()}}
    return head


def export_tasks(model: nnx.Module, run_dir: Path, out: Path, tokenizer=None) -> list[Path]:
    """`OUT/NAME/` for every task of a multi-task run: a folder `transformers` loads as that task's
    `AutoModelForSequenceClassification`."""
    from jaxft.hf.export import save_pretrained

    written = []
    out.mkdir(parents=True, exist_ok=True)
    for name, t in read_tasks(run_dir).items():
        labels = t["labels"]
        head = task_model(model, t["offset"], len(labels), labels.id2label)
        written.append(save_pretrained(head, out / name, tokenizer=tokenizer, id2label=labels.id2label))
    return written
