"""Training runs on a device mesh, for the mesh and multi-host tests.

`run(spec)` loads a saved HF folder onto a mesh, trains a few steps on fixed random batches and
returns the per-step losses and gradient norms, the parameters' and optimizer state's shardings and per-device bytes.
Run as a script (`python tests/mesh_helpers.py SPEC.json`), it prints the results as one JSON line;
the tests start it in a subprocess so that `XLA_FLAGS=--xla_force_host_platform_device_count=8` (or
`jax.distributed`) is set before JAX starts.

spec: {"runs": [{"model": DIR, "task": "causal-lm" | "sequence-classification", "mesh": {...} | null,
                 "steps": N, "batch": B, "length": T, "grad_accum": 1, "dtype": "float32", "remat": "none",
                 "scan_layers": false, "count_reads": false, "checkpoint_at": K | null, "run_dir": DIR,
                 "save": DIR | null, "params_out": FILE.npz | null}],
       "distributed": {"distributed": "on", "coordinator": "127.0.0.1:PORT", "num_processes": 2, "process_id": i,
                       "init_timeout": 60}}   (the `mesh.*` settings of a config)
`mesh: null` runs on one device. With `checkpoint_at: K` the state is saved with Orbax after step K
into `run_dir/checkpoints`, restored into fresh arrays, and training goes on from the restored state.
`save` exports the trained model (`{pid}` in it becomes the process index, to show which process wrote).
`count_reads` reports, per checkpoint tensor, the bytes of each slice this process read while loading;
`all_gathers` lists the result shapes of the all-gathers in the compiled train step.
`params_out` writes the trained parameters (whole, float32, by their flat names) to an `.npz` file.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def batches(task: str, vocab: int, steps: int, batch: int, length: int, seed: int = 0) -> list[dict]:
    """`steps` global batches: padded rows, every token trained (causal) or random labels (classification)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(steps):
        ids = rng.randint(3, vocab, (batch, length)).astype(np.int32)
        mask = np.ones_like(ids)
        for r in range(0, batch, 3):
            mask[r, length - 1 - r % 5:] = 0
        ids[mask == 0] = 0
        b = {"input_ids": ids, "attention_mask": mask, "weights": np.ones(batch, np.float32)}
        if task == "causal-lm":
            b["loss_mask"] = mask.copy()
        else:
            b["token_type_ids"] = np.zeros_like(ids)
            b["labels"] = rng.randint(0, 3, batch).astype(np.int32)
        out.append(b)
    return out


def run_one(r: dict) -> dict:
    import jax

    import jaxft
    from jaxft import parallel
    from jaxft.config import OptimSection
    from jaxft.data.batches import to_device
    from jaxft.optim import make_optimizer
    from jaxft.train.losses import LOSSES
    from jaxft.train.step import Functional, init_state, make_train_step

    steps = r.get("steps", 10)
    mesh = parallel.make_mesh(r["mesh"]) if r.get("mesh") else parallel.make_mesh(
        {"data": 1}, devices=jax.devices()[:1])
    reads: dict[str, list[int]] = {}
    if r.get("count_reads"):
        from jaxft.hf.files import WeightFile

        original = WeightFile.read_slice

        def counting(self, name, index):
            out = original(self, name, index)
            reads.setdefault(name, []).append(int(out.nbytes))
            return out

        WeightFile.read_slice = counting
    model = jaxft.load_model(r["model"], task=r["task"], dtype=r.get("dtype", "float32"),
                             remat=r.get("remat", "none"), scan_layers=r.get("scan_layers", False), mesh=mesh)
    if r.get("count_reads"):
        WeightFile.read_slice = original
    fn = Functional(model)
    tx, lr = make_optimizer(OptimSection(lr=r.get("lr", 3e-3), weight_decay=0.01, warmup_steps=2), steps)
    state = init_state(fn, tx, seed=0)
    step = make_train_step(fn, LOSSES[r["task"]], tx, lr, r.get("grad_accum", 1))
    losses, grad_norms = [], []
    data = batches(r["task"], model.hf_config["vocab_size"], steps, r.get("batch", 16), r.get("length", 16))
    batch_spec, gathers = None, None
    if r.get("all_gathers"):
        import re

        hlo = step.lower(state, to_device(data[0], mesh)).compile().as_text()
        gathers = sorted({m for line in hlo.splitlines() if " all-gather" in line
                          for m in re.findall(r"= (\w+\[[\d,]*\])", line)})
    for i, b in enumerate(data):
        b = to_device(b, mesh)
        batch_spec = [list(e) if isinstance(e, tuple) else e for e in b["input_ids"].sharding.spec]
        state, m = step(state, b)
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
        if i + 1 == r.get("checkpoint_at"):
            state = save_and_restore(state, i + 1, r["run_dir"])

    def describe(x):
        shard = x.sharding.shard_shape(x.shape)
        return {"spec": [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec],
                "shape": list(x.shape), "shard_shape": list(shard), "dtype": str(x.dtype),
                "bytes": int(np.prod(x.shape)) * x.dtype.itemsize, "shard_bytes": int(np.prod(shard)) * x.dtype.itemsize}

    params = {k: describe(v) for k, v in state["params"].items()}
    opt = [describe(x) for x in jax.tree.leaves(state["opt_state"])]
    out = {"losses": losses, "grad_norms": grad_norms, "params": params, "opt_state": opt, "devices": int(mesh.size), "reads": reads,
           "batch_spec": batch_spec, "all_gathers": gathers}
    if r.get("params_out"):
        np.savez(r["params_out"], **{k: np.asarray(jax.device_get(v), np.float32)
                                     for k, v in state["params"].items()})
    if r.get("save"):
        trained = fn.module(state["params"])
        trained.hf_config, trained.source_dir = model.hf_config, model.source_dir
        jaxft.save_pretrained(trained, r["save"].format(pid=jax.process_index()))
    return out


def save_and_restore(state: dict, step: int, run_dir: str) -> dict:
    """Checkpoint `state` (every process takes part), then read it back into new arrays of the same shardings."""
    import jax

    from jaxft.train.checkpoint import Checkpoints

    ckpts = Checkpoints(run_dir, keep=1)
    ckpts.save(step, state, {"step": step})
    ckpts.wait()
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, meta = ckpts.restore(step, {"params": like["params"],
                                          "train": {k: v for k, v in like.items() if k != "params"}})
    ckpts.close()
    assert meta == {"step": step}
    return {"params": restored["params"], **restored["train"]}


def main(path: str) -> None:
    spec = json.loads(open(path).read())
    if spec.get("distributed"):
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from jaxft.config import MeshSection
        from jaxft.parallel import initialize_from_config

        initialize_from_config(MeshSection(**spec["distributed"]))
    results = [run_one(r) for r in spec["runs"]]
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
