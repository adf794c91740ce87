"""The accelerator benchmark behind `scripts/bench_gpu.sh`: jaxft alone, bfloat16 compute (float32 parameters
and optimizer state), sequence 2048, MFU against the chip's published dense bfloat16 peak.

    python -m jaxft.bench.gpu              # SmolLM2-135M and Llama-3.2-1B shapes, full fine-tuning and LoRA
    python -m jaxft.bench.gpu --reduced    # a tiny Llama at 64 tokens: checks the harness on any backend

Models are random (no network), written once by `transformers` into a temporary folder. With `--reduced`
on a backend that is not in `PEAK_BF16`, MFU is against the bfloat16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from jaxft.bench import run_side
from jaxft.bench.sides import lm_folder

# published dense bfloat16 peaks (FLOP/s) by `jax.devices()[0].device_kind` prefix
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
             "TPU v6 lite": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v4": 275e12}

RUNS = (  # (model shape, batch, LoRA rank)
    ("smollm2-135m", 8, None),
    ("llama-3.2-1b", 4, None),
    ("llama-3.2-1b", 4, 16),
)


def published_peak(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if device_kind.startswith(k)), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    runs = (("tiny", 2, None), ("tiny", 2, 4)) if args.reduced else RUNS
    length = 64 if args.reduced else args.length
    print("| model | batch × length | LoRA | step | tokens/s | MFU | first step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results = []
    with tempfile.TemporaryDirectory() as models:
        for shape, batch, rank in runs:
            folder = lm_folder(models, shape)
            from transformers import AutoConfig

            params = dict(task="causal-lm", folder=folder, vocab=AutoConfig.from_pretrained(folder).vocab_size,
                          batch=batch, length=length, lr=1e-4, warmup=1, steps=1 if args.reduced else args.steps,
                          repeats=1 if args.reduced else args.repeats, dtype="bfloat16", lora_rank=rank)
            t = time.perf_counter()
            r = run_side(shape, "jaxft", params)
            peak = published_peak(r["device"]) or r["matmul_peak_flops"]
            mfu = statistics.median(r["model_flops_per_s"]) / peak
            print(f"| {shape} | {batch} × {length} | {rank or '–'} | {statistics.median(r['step_s']):.3f} s | "
                  f"{statistics.median(r['tokens_per_s']):.0f} | {mfu:.3f} | {r['first_step_s']:.1f} s |", flush=True)
            results.append(dict(r, shape=shape, lora_rank=rank, mfu=mfu, peak_flops=peak,
                                wall_s=time.perf_counter() - t))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
