"""Compile time and step time of a looped vs a scanned (`model.scan_layers`) decoder, by depth.

    python scripts/bench_compile.py                          # Llama-shaped, 4 / 16 / 32 layers, width 256
    python scripts/bench_compile.py --layers 8 32 --hidden 512 --runs 3

For each depth a random Llama is saved with `transformers` (no hub), loaded both ways, and its full train
step (forward, backward, clipped AdamW; `jaxft.train.step.make_train_step`) is lowered and compiled
`--runs` times with JAX's compilation cache off; the median compile seconds are reported with the
median step time of a few steps after it. A looped model compiles one copy of the block per layer, so
its compile time grows with depth; the scanned one compiles the block once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def save_llama(folder: Path, layers: int, hidden: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=max(1, hidden // 256), max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def measure(folder: Path, scan: bool, runs: int, batch: int, length: int) -> dict:
    import jax

    import jaxft
    from jaxft.config import OptimSection
    from jaxft.optim import make_optimizer
    from jaxft.train.losses import LOSSES
    from jaxft.train.step import Functional, init_state, make_train_step

    model = jaxft.load_model(folder, task="causal-lm", scan_layers=scan)
    fn = Functional(model)
    tx, lr = make_optimizer(OptimSection(lr=1e-4), 100)
    state = init_state(fn, tx, 0)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 1024, (batch, length)).astype(np.int32)
    data = jax.device_put({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
                           "weights": np.ones(batch, np.float32)})
    compile_s = []
    for _ in range(runs):
        step = make_train_step(fn, LOSSES["causal-lm"], tx, lr)
        t = time.perf_counter()
        compiled = step.lower(state, data).compile()
        compile_s.append(time.perf_counter() - t)
    state, m = compiled(state, data)
    jax.block_until_ready(m)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return {"compile_s": round(statistics.median(compile_s), 2), "compile_s_all": [round(c, 2) for c in compile_s],
            "step_ms": round(1e3 * statistics.median(times), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="compilations per setting (the median is reported)")
    args = p.parse_args()

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            folder = save_llama(Path(tmp) / f"llama{layers}", layers, args.hidden)
            row = {"layers": layers}
            for scan in (False, True):
                row["scan" if scan else "loop"] = measure(folder, scan, args.runs, args.batch, args.length)
            row["compile_speedup"] = round(row["loop"]["compile_s"] / row["scan"]["compile_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"backend": jax.default_backend(), "hidden": args.hidden, "batch": args.batch,
                      "length": args.length, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
