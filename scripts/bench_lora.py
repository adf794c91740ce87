"""LoRA vs full fine-tuning: step time and XLA's accounting of the compiled train step, side by side.

    python scripts/bench_lora.py                  # SmolLM2-135M-shaped random Llama, batch 8 × 256
    python scripts/bench_lora.py --steps 3 --repeats 3 --layers 30

Each side (full, LoRA rank 8 on all-linear) runs in its own process (so its peak memory is its own): one
warm-up step (compilation), then `--repeats` timed windows of `--steps` steps; medians are reported with
the compiled step's FLOPs and memory (XLA's cost and memory analyses) and the LoRA/full ratios. The
machines are shared and noisy: read medians, run it more than once.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def smollm_folder(folder: Path, layers: int) -> Path:
    """A random Llama with SmolLM2-135M's shapes (hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied)."""
    import torch
    import transformers

    if (folder / "config.json").exists():
        return folder
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def run_side(folder: str, side: str, batch: int, length: int, steps: int, repeats: int, rank: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxft
    from jaxft.config import OptimSection
    from jaxft.lora import LoraSpec, apply_lora
    from jaxft.optim import make_optimizer
    from jaxft.train.losses import causal_lm_loss
    from jaxft.train.step import Functional, init_state, make_train_step

    model = jaxft.load_model(folder, task="causal-lm")
    fn = Functional(model, apply_lora(model, LoraSpec(rank=rank, alpha=2 * rank)).trainable) if side == "lora" \
        else Functional(model)
    tx, lr = make_optimizer(OptimSection(lr=1e-4, weight_decay=0.01, warmup_steps=2), 1000)
    state = init_state(fn, tx, 0)
    step = make_train_step(fn, causal_lm_loss, tx, lr)
    ids = np.random.RandomState(0).randint(0, 49152, (batch, length)).astype(np.int32)
    b = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids),
         "weights": jnp.ones((batch,), jnp.float32)}
    t = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m["loss"])
    first_s = time.perf_counter() - t
    windows = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, b)
        jax.block_until_ready(m["loss"])
        windows.append((time.perf_counter() - t) / steps)
    trainable = sum(int(np.prod(v.shape)) for v in fn.params.values())
    return {"side": side, "step_s": statistics.median(windows), "windows_s": windows, "compile_s": compile_s,
            "first_step_s": first_s, "flops": float(cost["flops"]), "xla_temp_bytes": int(mem.temp_size_in_bytes),
            "xla_argument_bytes": int(mem.argument_size_in_bytes), "trainable_params": trainable,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_s": batch * length / statistics.median(windows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--folder", help="reuse this model folder (created if absent)")
    p.add_argument("--side", choices=["full", "lora"], help=argparse.SUPPRESS)  # one side, in this process
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args.folder, args.side, args.batch, args.length, args.steps, args.repeats,
                                  args.rank)))
        return
    folder = smollm_folder(Path(args.folder or tempfile.mkdtemp()) , args.layers)
    results = {}
    for side in ("full", "lora"):
        cmd = [sys.executable, __file__, "--side", side, "--folder", str(folder)] + [
            f"--{k}={getattr(args, k)}" for k in ("batch", "length", "steps", "repeats", "rank")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    f, lo = results["full"], results["lora"]
    print(f"SmolLM2-135M-shaped Llama ({args.layers} layers), batch {args.batch} × {args.length}, "
          f"LoRA rank {args.rank} all-linear ({lo['trainable_params']:,} trainable of {f['trainable_params']:,})")
    print("| | full | LoRA | LoRA / full |\n| --- | --- | --- | --- |")
    for key, unit, scale in (("step_s", "s", 1), ("tokens_per_s", "tok/s", 1), ("compile_s", "s", 1),
                             ("flops", "GFLOP", 1e-9), ("xla_temp_bytes", "GiB", 2**-30),
                             ("xla_argument_bytes", "GiB", 2**-30), ("peak_rss_bytes", "GiB", 2**-30)):
        print(f"| {key} | {f[key] * scale:.3g} {unit} | {lo[key] * scale:.3g} {unit} | {lo[key] / f[key]:.2f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
