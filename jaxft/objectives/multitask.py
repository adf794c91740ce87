"""Multi-task learning (`tasks:`): classification and regression tasks on one shared encoder.

The mechanism is one head, not one head per task: the model is the family's own sequence-classification
model loaded with `num_labels = Σ_i C_i`, and task `i` owns the classifier columns `[o_i, o_i + C_i)`
(`C_i = 1` for a regression task). A row of task `i` carries its task id and its label shifted by `o_i`
(a regression row: `o_i` itself, and its number in `targets`). A classification row's loss masks every
other task's columns out of its logits (to −1e9, an exact zero after softmax), so its cross-entropy is
exactly the one of a separate `C_i`-way head with those weights; a regression row's loss is the squared
error `(z[o_i] − target)²` of its one column, as Hugging Face's `problem_type="regression"` head computes
it. Either way the gradient never reaches another task's columns. A column block of a linear map *is* a
separate linear head, so nothing is lost, and every task's batch runs the same compiled program;
checkpoints, LoRA (`train_modules` keeps the classifier trained in full), sharding and resume are those of
a single-task run. A run with one regression task is single-task regression.

The loss is `Σ_rows loss_weight[task] · ℓ_row` over `Σ_rows 1`: a task's `loss_weight` scales its gradient.
Which task each batch comes from is `jaxft.data.multitask` (sampling strategies, exact resume).

Metrics: every task's `NAME/loss`, and `NAME/accuracy` (+ `NAME/macro_f1` on eval) for classification or
`NAME/mse` (+ `NAME/pearson`, `NAME/spearman` on eval) for regression, `NAME/examples`; and the means of
each metric over the tasks that have it, weighted by `loss_weight`, under the plain names (`loss`,
`accuracy`, `macro_f1`, `mse`, ...), so early stopping watches a mean by default and any `NAME/metric`
when `train.early_stopping.metric` names it.

Export (`export_tasks`): one Hugging Face folder per task, the shared encoder and pooler plus that task's
columns of the classifier as a `C_i`-way head with the task's own labels (regression: a 1-output head with
`problem_type="regression"`).
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
from jaxft.objectives.base import Objective
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
    """`{name: {"offset": o, "labels": LabelMap, "kind": k}}` as a run recorded them at its start."""
    path = Path(run_dir) / TASKS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a multi-task run directory")
    return {k: {"offset": int(v["offset"]), "labels": LabelMap.from_json(v["labels"]),
                "kind": v.get("kind", "classification")}
            for k, v in json.loads(path.read_text()).items()}


def make_multitask_loss(sizes: list[int], loss_weights: list[float], regression: list[bool] | None = None):
    """The loss over the shared head (see the module docstring); per-task sums ride in `aux` as `[K]` arrays.
    `regression[i]`: task `i` is a regression task (its rows' numbers in `batch["targets"]`)."""
    col_task = jnp.asarray(np.repeat(np.arange(len(sizes)), sizes), jnp.int32)  # [C]: the task of each column
    lw = jnp.asarray(loss_weights, jnp.float32)
    K = len(sizes)
    is_reg = jnp.asarray(regression or [False] * K, bool)

    def multitask_loss(model, batch, dropout_rng):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], dropout_rng=dropout_rng)
        t, w, y = batch["task"], batch["weights"], batch["labels"]
        own = col_task[None, :] == t[:, None]                      # [B, C]
        logits = jnp.where(own, logits, -1e9)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        if regression and any(regression):  # a regression row: squared error of its one column (y = o_i)
            reg = is_reg[t]
            z = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0].astype(jnp.float32)
            loss = jnp.where(reg, jnp.square(z - batch["targets"]), loss)
            correct = jnp.where(reg, 0.0, correct)
        rows = (t[:, None] == jnp.arange(K)[None, :]).astype(jnp.float32) * w[:, None]  # [B, K]
        aux = {"weight": jnp.sum(w), "correct": jnp.sum(correct * w), "task_weight": rows.sum(0),
               "task_correct": (rows * correct[:, None]).sum(0), "task_loss": (rows * loss[:, None]).sum(0),
               "logits": logits}
        return jnp.sum(lw[t] * loss * w), aux

    return multitask_loss


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r (0 when either side is constant)."""
    x, y = x - x.mean(), y - y.mean()
    d = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / d if d > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's r of the ranks, ties given their mean rank."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v), np.float64)
        r[order] = np.arange(len(v), dtype=np.float64)
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(inv, r) / counts)[inv]  # the mean rank of each tie group
    return pearson(ranks(x), ranks(y))


class MultiTaskObjective(Objective):
    """The objective of a run with `tasks:` (picked by `jaxft.objectives.make_task`)."""

    def __init__(self, cfg: Config, tokenizer, run_dir: Path, resuming: bool, splits=SPLITS):
        specs = cfg.tasks
        saved = read_tasks(run_dir) if resuming and (Path(run_dir) / TASKS_FILE).exists() else {}
        self.names = [s.name for s in specs]
        self.loss_weights = [s.loss_weight for s in specs]
        self.kinds = {s.name: s.kind for s in specs}
        regression = [s.kind == "regression" for s in specs]
        if saved and [n for n in sorted(saved, key=lambda n: saved[n]["offset"]) if n in self.names] != \
                [n for n in self.names if n in saved]:
            run_order = ", ".join(sorted(saved, key=lambda n: saved[n]["offset"]))
            raise ValueError(f"tasks: are listed as {', '.join(self.names)} but {run_dir} trained them as "
                             f"{run_order} ({TASKS_FILE}): the shared head's columns follow that order; list the "
                             f"tasks in it")
        for spec in specs:
            if spec.name in saved and saved[spec.name]["kind"] != spec.kind:
                raise ValueError(f"task {spec.name!r} is kind={spec.kind} in the config but was trained as "
                                 f"kind={saved[spec.name]['kind']} ({run_dir}/{TASKS_FILE})")
        self.labels, self.offsets, offset = {}, {}, 0
        by_split: dict[str, dict] = {s: {} for s in splits}
        reports = []
        for i, spec in enumerate(specs):
            given = saved[spec.name]["labels"] if spec.name in saved else None
            if given is None and "train" not in splits:
                raise FileNotFoundError(f"{run_dir}/{TASKS_FILE} has no label map of task {spec.name!r}")
            data = build_classification_data(task_config(cfg, spec), tokenizer, given, splits, regression[i])
            self.labels[spec.name], self.offsets[spec.name] = data.label_map, offset
            for split, b in data.splits.items():  # global column labels and the task id of every row
                b.per_example["labels"] = b.per_example["labels"] + offset
                b.per_example["task"] = np.full(len(b.enc), i, np.int32)
                if any(regression):  # every task's batches carry targets: one program for all of them
                    b.per_example.setdefault("targets", np.zeros(len(b.enc), np.float32))
                by_split[split][spec.name] = b
            reports += [vars(r) | {"rows_out": r.rows_out, "task": spec.name} for r in data.reports]
            offset += len(data.label_map)
        self.sizes = [len(self.labels[n]) for n in self.names]
        self.loss = make_multitask_loss(self.sizes, self.loss_weights, regression)
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
                                                  "kind": self.kinds[n], "train_examples": k, "probability": float(p)}
                                              for n, k, p in zip(self.names, sizes, probs)})
            write_json(run_dir / "data_report.json", reports)

    @staticmethod
    def frozen_model(start):
        return None

    def train_metrics(self, s: dict, n_steps: int) -> dict:
        out = {"loss": s["loss"] / n_steps, "grad_norm": s["grad_norm"] / n_steps}
        classified = sum(float(s["task_weight"][i]) for i, n in enumerate(self.names)
                         if self.kinds[n] == "classification")
        if classified > 0:  # accuracy over the classification rows only
            out["accuracy"] = s["correct"] / classified
        for i, name in enumerate(self.names):
            n = float(s["task_weight"][i])
            if n > 0:  # a task the window drew no batch of has no train metrics in it
                score = "mse" if self.kinds[name] == "regression" else "accuracy"
                value = s["task_loss"][i] if score == "mse" else s["task_correct"][i]
                out.update({f"{name}/loss": float(s["task_loss"][i]) / n, f"{name}/{score}": float(value) / n,
                            f"{name}/examples": n})
        return out

    def evaluate(self, eval_step, params, split: str, mesh) -> dict:
        """Each task's metrics over its split (loss; accuracy and macro-F1, or MSE, Pearson and Spearman),
        and the `loss_weight`-weighted mean of each metric over the tasks that have it."""
        per, out = {}, {}
        for i, name in enumerate(self.names):
            batches = self.splits[split].get(name)
            if batches is None:
                continue
            off, loss, preds, golds = self.offsets[name], 0.0, [], []
            regression = self.kinds[name] == "regression"
            for batch in batches.epoch():
                _, aux = eval_step(params, to_device(batch, mesh))
                keep = batch["weights"] > 0
                loss += float(np.asarray(aux["task_loss"])[i])  # on the host: no program per index
                logits = np.asarray(aux["logits"], np.float64)[keep]
                preds.append(logits[:, off] if regression else logits.argmax(-1) - off)
                golds.append(batch["targets"][keep] if regression else batch["labels"][keep] - off)
            pred, gold = np.concatenate(preds), np.concatenate(golds)
            m = {"loss": loss / len(gold)}
            if regression:
                m |= {"mse": float(np.mean((pred - gold) ** 2)), "pearson": pearson(pred, gold),
                      "spearman": spearman(pred, gold)}
            else:
                m |= {"accuracy": float(np.mean(pred == gold)), "macro_f1": macro_f1(pred, gold, len(self.labels[name]))}
            per[name] = m | {"examples": int(len(gold))}
        lw = dict(zip(self.names, self.loss_weights))
        for k in ("loss", "accuracy", "macro_f1", "mse", "pearson", "spearman"):
            having = [n for n in per if k in per[n]]
            if having:
                out[k] = sum(lw[n] * per[n][k] for n in having) / sum(lw[n] for n in having)
        for name, m in per.items():
            out.update({f"{name}/{k}": v for k, v in m.items()})
        return out


def task_model(model: nnx.Module, offset: int, n: int, id2label: dict[int, str],
               kind: str = "classification") -> nnx.Module:
    """A sequence-classification model of one task: `model`'s encoder and pooler (the same arrays) with
    classifier columns `[offset, offset + n)` as an `n`-way head (`kind=regression`: problem_type set so
    that transformers fits and scores it as regression)."""
    graphdef, state = nnx.split(model)
    # new Variable objects holding the same arrays: setting the head's classifier leaves `model` as it is
    head = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    head.classifier.kernel.set_value(model.classifier.kernel.get_value()[..., offset:offset + n])
    head.classifier.bias.set_value(model.classifier.bias.get_value()[offset:offset + n])
    head.config = dataclasses.replace(model.config, num_labels=n)
    head.hf_config = dict(model.hf_config) | {"id2label": {str(k): v for k, v in id2label.items()},
                                              "label2id": {v: k for k, v in id2label.items()}}
    head.hf_config.pop("problem_type", None)  # transformers infers classification from the labels
    if kind == "regression":
        head.hf_config["problem_type"] = "regression"
    return head


def export_tasks(model: nnx.Module, run_dir: Path, out: Path, tokenizer=None) -> list[Path]:
    """`OUT/NAME/` for every task of a multi-task run: a folder `transformers` loads as that task's
    `AutoModelForSequenceClassification`."""
    from jaxft.hf.export import save_pretrained

    written = []
    out.mkdir(parents=True, exist_ok=True)
    for name, t in read_tasks(run_dir).items():
        labels = t["labels"]
        head = task_model(model, t["offset"], len(labels), labels.id2label, t["kind"])
        written.append(save_pretrained(head, out / name, tokenizer=tokenizer, id2label=labels.id2label))
    return written
