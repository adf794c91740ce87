"""Run in a subprocess with 8 simulated CPU devices (tests/test_objectives_mesh.py).

argv: the causal LM folder, the BERT student folder, the BERT teacher folder, the output JSON path. Trains
each objective 3 steps unsharded and on a mesh, through the same pieces the loop uses (the objective's
loss, its frozen second model held beside the state, `make_train_step`), and writes the losses and the
largest parameter difference after training.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxft
from jaxft import parallel
from jaxft.config import DistillSection, OptimSection, PreferenceSection
from jaxft.data.batches import to_device
from jaxft.optim import make_optimizer
from jaxft.objectives.distill import make_classification_distill_loss
from jaxft.objectives.preference import make_preference_loss, reference_copy
from jaxft.train.step import Functional, init_state, make_train_step

B, T = 8, 16
# Adam divides by sqrt(v) + eps: with the default 1e-8 a gradient that is float noise (~1e-9, e.g. of an
# embedding row no token uses) becomes a full ±lr step whose sign the device count decides; 1e-4 keeps
# the comparison about the objective
EPS = 1e-4


def pair_batch(rng) -> dict:
    """Preference pairs: a 4-token prompt (not scored), then a response; rejected rows end early (padding)."""
    out = {"weights": np.ones(B, np.float32)}
    for side, length in (("chosen", T), ("rejected", T - 3)):
        ids = rng.randint(3, 96, (B, T)).astype(np.int32)
        attention = (np.arange(T) < length).astype(np.int32)[None].repeat(B, 0)
        out[f"{side}_input_ids"] = ids * attention
        out[f"{side}_attention_mask"] = attention
        out[f"{side}_loss_mask"] = attention * (np.arange(T) >= 4)
    return out


def class_batch(rng) -> dict:
    ids = rng.randint(1000, 30000, (B, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, T - 5:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": rng.randint(0, 2, B).astype(np.int32), "weights": np.ones(B, np.float32)}


def train(kind: str, folders: dict, mesh) -> tuple[list[float], dict]:
    if kind == "dpo":  # full fine-tuning: a frozen copy of the starting point is the reference
        fn = Functional(jaxft.load_model(folders["causal"], task="causal-lm", mesh=mesh))
        second, loss, make = reference_copy(fn), make_preference_loss("dpo", PreferenceSection(beta=0.5)), pair_batch
    else:  # distillation from a wider teacher, sharded by the same rules
        fn = Functional(jaxft.load_model(folders["student"], task="sequence-classification", num_labels=2, mesh=mesh))
        teacher = jaxft.load_model(folders["teacher"], task="sequence-classification", num_labels=2, mesh=mesh)
        second = Functional(teacher, trainable=lambda path, v: False)
        loss, make = make_classification_distill_loss(DistillSection(teacher="t", temperature=2.0, alpha=0.7)), class_batch
    tx, lr = make_optimizer(OptimSection(lr=1e-2, weight_decay=0.01, warmup_steps=0, eps=EPS), 3)
    state = init_state(fn, tx, 0)
    step = make_train_step(fn, loss, tx, lr, 1, second)
    rng, losses = np.random.RandomState(0), []
    for _ in range(3):
        batch = make(rng)
        state, m = step(state, to_device(batch, mesh) if mesh is not None else jax.tree.map(jnp.asarray, batch))
        losses.append(float(m["loss"]))
    return losses, {k: np.asarray(jax.device_get(v)) for k, v in state["params"].items()}


def main(causal: str, student: str, teacher: str, out: str) -> None:
    folders = {"causal": causal, "student": student, "teacher": teacher}
    results = {}
    for kind, axes in (("dpo", {"fsdp": 4, "tensor": 2}), ("distill", {"data": 2, "fsdp": 2, "tensor": 2})):
        one, p1 = train(kind, folders, None)
        many, p8 = train(kind, folders, parallel.make_mesh(axes))
        worst = max(p1, key=lambda k: float(np.abs(p1[k] - p8[k]).max()))
        results[kind] = {"one": one, "many": many, "param_diff": float(np.abs(p1[worst] - p8[worst]).max()),
                         "worst": worst}
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
