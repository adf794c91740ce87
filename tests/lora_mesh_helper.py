"""Run in a subprocess with 8 simulated CPU devices (tests/test_lora.py::test_lora_on_a_mesh_equals_one_device).

argv: a JSON list of cases `{"folder", "mesh", "quantize", "dropout"}` and the output JSON path. For each case, trains
LoRA (QLoRA with `quantize`) 3 steps unsharded and on the mesh; writes the losses, the adapters' sharding
specs next to their base kernels', and the max parameter difference.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxft
from jaxft import parallel
from jaxft.config import OptimSection
from jaxft.data.batches import to_device
from jaxft.lora import LoraSpec, apply_lora
from jaxft.optim import make_optimizer
from jaxft.train.losses import causal_lm_loss
from jaxft.train.step import Functional, init_state, make_train_step


def train(folder: str, mesh, quantize=None, dropout=0.0):
    model = jaxft.load_model(folder, task="causal-lm", mesh=mesh, quantize=quantize)
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0, dropout=dropout), mesh=mesh)
    fn = Functional(model, adapters.trainable)
    # B random too, so that every adapter contributes from the first step
    fn.params = {k: parallel.place(np.asarray(0.05 * jax.random.normal(jax.random.key(i), v.shape)), fn.axes[k], mesh)
                 if k.endswith("lora.b") else v for i, (k, v) in enumerate(sorted(fn.params.items()))}
    tx, lr = make_optimizer(OptimSection(lr=1e-2, weight_decay=0.01, warmup_steps=1), 3)
    state = init_state(fn, tx, 0)
    step = make_train_step(fn, causal_lm_loss, tx, lr)
    rng = np.random.RandomState(0)
    losses = []
    for _ in range(3):
        ids = rng.randint(3, 96, (8, 16)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
                 "weights": np.ones((8,), np.float32)}
        state, m = step(state, to_device(batch, mesh) if mesh is not None else jax.tree.map(jnp.asarray, batch))
        losses.append(float(m["loss"]))
    specs = {}
    for t in adapters.targets:
        base = fn.frozen.get(t.path + ".kernel", fn.frozen.get(t.path + ".quant.codes"))
        specs[t.path] = {k: str(getattr(v.sharding, "spec", None)) for k, v in
                         (("a", state["params"][t.path + ".lora.a"]), ("b", state["params"][t.path + ".lora.b"]),
                          ("kernel", base))}
    return losses, {k: np.asarray(jax.device_get(v)) for k, v in state["params"].items()}, specs


def main(cases: str, out: str) -> None:
    results = []
    for case in json.loads(cases):
        kw = dict(quantize=case.get("quantize"), dropout=case.get("dropout", 0.0))
        one, p1, _ = train(case["folder"], None, **kw)
        many, p8, specs = train(case["folder"], parallel.make_mesh(case["mesh"]), **kw)
        diff = max(float(np.abs(p1[k] - p8[k]).max()) for k in p1)
        results.append({"one": one, "many": many, "param_diff": diff, "specs": specs})
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
