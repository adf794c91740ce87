"""Knowledge distillation (`train.objective: distill`): a student learns from a frozen teacher's soft labels.

With T = `train.distill.temperature`, α = `train.distill.alpha`, `s` and `t` the student's and the teacher's
logits and p_T(x) = softmax(x / T), each example (classification) or each trained token (causal LM) costs

    loss = α · T² · KL(p_T(t) ‖ p_T(s)) + (1 − α) · CE(s, label),    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)

(Hinton et al. 2015; T² keeps the soft term's gradient scale independent of T). The task loss is the model
head's own: cross-entropy against the label, or against the next token. For a causal LM only the tokens the
supervised loss trains count (`loss_mask`, real tokens, within one packed document: as
`jaxft.train.losses.make_causal_lm_loss`), and the KL is over the next-token distribution at each of them.

The teacher is any model jaxft loads: a model folder, `package:PKG/SUBDIR`, a Hub id, or a jaxft run directory
(its best, else latest, checkpoint, with its own config: another size, another dtype, LoRA or not). It must
speak the student's language: the same tokenizer (vocabulary equal, token for token) and, for classification,
the same labels in the same order; a mismatch is refused naming both. It is the objective's frozen second model
(`frozen_model`): a `Functional` whose variables are all frozen, passed to the jitted steps beside the train
state, never donated, never differentiated and never in the optimizer state; its logits are computed inside the
same jitted step, under `stop_gradient`.

Both models' full logits are held (`[B, C]`, or `[B, T, V]` for a causal LM: no chunking of the head here).
Losses return sums over examples/tokens and their weight, as every jaxft loss, so accumulation and evaluation
stay exact; the sums `kl` and `task_loss` divided by the weight are the logged metrics.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.config import Config, ConfigError, DistillSection
from jaxft.data.batches import to_device
from jaxft.objectives.base import Objective
from jaxft.train.evaluate import macro_f1

log = logging.getLogger("jaxft")


def soft_kl(teacher_logits, student_logits, temperature: float):
    """`KL(softmax(t/T) ‖ softmax(s/T))` over the last axis, in float32: shape of the logits without it."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distill_sums(student_logits, teacher_logits, labels, w, d: DistillSection) -> tuple:
    """`(Σ w·loss, Σ w·KL, Σ w·CE)` for logits `[..., V]`, integer labels and weights `[...]` (0 = not trained)."""
    kl = soft_kl(jax.lax.stop_gradient(teacher_logits), student_logits, d.temperature)
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), labels)
    kl_sum, ce_sum = jnp.sum(kl * w), jnp.sum(ce * w)
    return d.alpha * d.temperature ** 2 * kl_sum + (1 - d.alpha) * ce_sum, kl_sum, ce_sum


def make_classification_distill_loss(d: DistillSection):
    """`(student, batch, dropout_rng, teacher) -> (Σ loss, sums)` for sequence classification: one KL per example."""

    def distill_classification_loss(model, batch, dropout_rng, teacher):
        inputs = dict(attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
        logits_BC = model(batch["input_ids"], dropout_rng=dropout_rng, **inputs)
        teacher_BC = teacher(batch["input_ids"], **inputs)
        w = batch["weights"]
        loss_sum, kl_sum, ce_sum = distill_sums(logits_BC, teacher_BC, batch["labels"], w, d)
        correct = (jnp.argmax(logits_BC, -1) == batch["labels"]).astype(jnp.float32)
        return loss_sum, {"weight": jnp.sum(w), "correct": jnp.sum(correct * w), "kl": kl_sum, "task_loss": ce_sum,
                          "logits": logits_BC}

    return distill_classification_loss


def make_causal_lm_distill_loss(d: DistillSection):
    """`(student, batch, dropout_rng, teacher) -> (Σ loss, sums)` for a causal LM: one KL per trained token.

    Position t predicts token t+1; the target counts when it is trained (`loss_mask`), real and in the same
    packed document as its input (`segment_ids`, else the attention mask as the single segment)."""

    def distill_causal_lm_loss(model, batch, dropout_rng, teacher):
        ids, seg = batch["input_ids"], batch.get("segment_ids", batch["attention_mask"])
        logits_BTV = model(ids, attention_mask=batch["attention_mask"], segment_ids=seg, dropout_rng=dropout_rng)
        teacher_BTV = teacher(ids, attention_mask=batch["attention_mask"], segment_ids=seg)
        target_ok = (batch["loss_mask"][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        w_BT = target_ok.astype(jnp.float32) * batch["weights"][:, None]
        loss_sum, kl_sum, ce_sum = distill_sums(logits_BTV[:, :-1], teacher_BTV[:, :-1], ids[:, 1:], w_BT, d)
        return loss_sum, {"weight": jnp.sum(w_BT), "kl": kl_sum, "task_loss": ce_sum,
                          "tokens": jnp.sum(batch["attention_mask"] * batch["weights"][:, None]),
                          "slots": jnp.asarray(ids.size, jnp.float32)}

    return distill_causal_lm_loss


def is_run_dir(path: str | Path) -> bool:
    """A jaxft run directory (its config.yaml and checkpoints), as opposed to a model folder (config.json)."""
    p = Path(path)
    return (p / "config.yaml").is_file() and not (p / "config.json").is_file()


class Teacher:
    """What the student checks before training: where the teacher's weights come from, its tokenizer, its
    vocabulary size and (classification) its labels, by index. The model itself is loaded by `load`."""

    def __init__(self, spec: str, task: str):
        from transformers import AutoTokenizer

        from jaxft.hf.load import read_hf_config, resolve
        from jaxft.train.run import read_labels, run_config, run_tokenizer

        self.spec, self.run = spec, is_run_dir(spec)
        if self.run:
            self.cfg = run_config(spec)
            if self.cfg.model.task != task:
                raise ConfigError(f"train.distill.teacher={spec} is a {self.cfg.model.task} run; the student is "
                                  f"model.task={task}")
            self.folder = resolve(self.cfg.model.name_or_path)
            self.tokenizer = run_tokenizer(spec, self.cfg)
            labels = read_labels(Path(spec))
            self.labels = list(labels.names) if labels else None
        else:
            self.cfg, self.folder = None, resolve(spec)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
            self.labels = None
        hf = read_hf_config(self.folder)
        self.vocab_size = getattr(hf, "vocab_size", None)
        self.num_labels = len(self.labels) if self.labels else getattr(hf, "num_labels", None)
        if self.labels is None and task == "sequence-classification":
            names = [hf.id2label[i] for i in range(len(hf.id2label))]
            # transformers names unnamed classes LABEL_0, LABEL_1, ...: those say nothing about the label set
            self.labels = None if names == [f"LABEL_{i}" for i in range(len(names))] else names

    def load(self, cfg: Config, mesh):
        """The teacher's model, every variable frozen, placed on `mesh`."""
        from jaxft.hf.load import load_model
        from jaxft.train.run import restore_run
        from jaxft.train.step import Functional

        if self.run:
            model = restore_run(self.spec, self.cfg, mesh).model
        else:
            m = cfg.model
            num_labels = self.num_labels if m.task == "sequence-classification" else None
            model = load_model(self.folder, m.task, num_labels=num_labels, dtype=m.dtype,
                               param_dtype=m.param_dtype, mesh=mesh, seed=cfg.train.seed, remat=m.remat,
                               attention=m.attention, attention_block=m.attention_block)
        return Functional(model, trainable=lambda path, v: False)


def check_same_tokenizer(teacher: Teacher, student_tokenizer, student_name: str, student_vocab: int | None) -> None:
    """Refuse a teacher whose token ids mean other tokens than the student's, naming both."""
    if student_vocab is not None and teacher.vocab_size is not None and teacher.vocab_size != student_vocab:
        raise ConfigError(f"train.distill.teacher={teacher.spec} has vocab_size {teacher.vocab_size} but the student "
                          f"{student_name} has {student_vocab}: distillation needs the same tokenizer")
    t, s = teacher.tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t != s:
        differ = sorted(set(t.items()) ^ set(s.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(f"train.distill.teacher={teacher.spec} has another tokenizer than the student "
                          f"{student_name} ({len(t)} vs {len(s)} tokens; e.g. {differ} differ): distillation needs "
                          f"the same tokenizer")


def check_same_labels(teacher: Teacher, student_labels: list[str], student_name: str) -> None:
    """Refuse a classification teacher whose classes are not the student's, index for index, naming both."""
    if teacher.num_labels != len(student_labels) or (teacher.labels is not None and teacher.labels != student_labels):
        shown = teacher.labels if teacher.labels is not None else f"{teacher.num_labels} unnamed classes"
        raise ConfigError(f"train.distill.teacher={teacher.spec} has labels {shown} but the student {student_name} "
                          f"trains on {student_labels}: distillation needs the same label set in the same order")


class DistillObjective(Objective):
    """`train.objective: distill`: the task of `model.task` (its data, export settings) with the distillation loss
    and a teacher as the frozen second model (the task interface of `jaxft.objectives`)."""

    def __init__(self, cfg: Config, tokenizer, run_dir: Path, resuming: bool, splits):
        from jaxft.hf.load import read_hf_config, resolve
        from jaxft.objectives.supervised import TASKS   # (supervised imports multitask, which is fine)

        self.cfg, d = cfg, cfg.train.distill
        self.task = TASKS[cfg.model.task](cfg, tokenizer, run_dir, resuming, splits)
        self.splits, self.model_kwargs = self.task.splits, self.task.model_kwargs
        self.export_kwargs = self.task.export_kwargs
        self.teacher = Teacher(d.teacher, cfg.model.task)
        student = cfg.model.name_or_path
        check_same_tokenizer(self.teacher, tokenizer, student,
                             getattr(read_hf_config(resolve(student)), "vocab_size", None))
        self.classification = cfg.model.task == "sequence-classification"
        if self.classification:
            check_same_labels(self.teacher, list(self.task.label_map.names), student)
            self.loss = make_classification_distill_loss(d)
        else:
            self.loss = make_causal_lm_distill_loss(d)

    def frozen_model(self, start):
        """The teacher, on the student's mesh (`start()` is the student's starting point)."""
        teacher = self.teacher.load(self.cfg, start().mesh)
        log.info("distilling from %s (%d frozen parameters)", self.teacher.spec,
                 sum(int(np.prod(v.shape)) for v in teacher.frozen.values()))
        return teacher

    def train_metrics(self, s: dict, n_steps: int) -> dict:
        weight = max(float(s["weight"]), 1.0)
        return {**self.task.train_metrics(s, n_steps), "kl": s["kl"] / weight, "task_loss": s["task_loss"] / weight}

    def evaluate(self, eval_step, params, split: str, mesh) -> dict:
        """Weight-mean loss, KL and task loss over the split; accuracy and macro-F1 (classification) or
        perplexity exp(task loss) (causal LM)."""
        sums = {"loss": 0.0, "kl": 0.0, "task_loss": 0.0, "weight": 0.0}
        preds, golds = [], []
        for batch in self.splits[split].epoch():
            loss_sum, aux = eval_step(params, to_device(batch, mesh))
            for k, v in {"loss": loss_sum, **aux}.items():
                if k in sums:
                    sums[k] += float(v)
            if self.classification:
                keep = batch["weights"] > 0
                preds.append(np.asarray(aux["logits"]).argmax(-1)[keep])
                golds.append(batch["labels"][keep])
        weight = max(sums["weight"], 1.0)
        out = {k: sums[k] / weight for k in ("loss", "kl", "task_loss")}
        if self.classification:
            pred, gold = np.concatenate(preds), np.concatenate(golds)
            return {**out, "accuracy": float(np.mean(pred == gold)),
                    "macro_f1": macro_f1(pred, gold, len(self.task.label_map.names)), "examples": int(len(gold))}
        return {**out, "perplexity": math.exp(min(out["task_loss"], 50.0)), "tokens": int(sums["weight"])}
