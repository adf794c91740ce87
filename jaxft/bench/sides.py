"""One side of one benchmark, in this process: `python -m jaxft.bench.sides WORKLOAD SIDE 'JSON params'`.

Both sides inherit the environment of `jaxft bench`, which starts as the `jaxft` command does
(`jaxft.hostmem`: huge-page malloc where it applies), so the two run with the same allocator setting; a
jaxft side started by hand restarts itself with it. Prints one JSON line: the timed windows (seconds per step), the first step (compilation included), the
examples and real (unpadded) tokens per window, the model FLOPs per window, this process's peak resident
memory, and the best float32 (or bfloat16) matmul rate this framework reaches here (the MFU denominator). The
persistent compilation cache is not used, so the first step is a cold one.
Each side runs in its own process so that its peak memory is its own and the two never share threads.

Model FLOPs are counted the same way on both sides, from the rows' real lengths (padding is not useful
work): a forward pass is 2 FLOPs per matmul weight per token plus 4·L·t²·H·Dh for the attention scores
and their product with the values; a full training step is 3 forward passes, a LoRA step 2 (the frozen
weights get no weight gradient).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np

LM_SHAPES = {  # HF LlamaConfig fields of the named random causal LMs
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                         rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


# ---------------------------------------------------------------- shared: data, FLOPs, memory, peaks

def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_flops_per_token(cfg) -> float:
    """2 × the matmul weights a token passes through (HF config of a BERT classifier or a Llama LM)."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    if cfg.model_type == "bert":
        per_layer = 4 * d * d + 2 * d * cfg.intermediate_size
        return 2 * (L * per_layer)  # pooler and classifier act on one token per row: negligible
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or d // heads
    per_layer = d * heads * dh * 2 + d * kv * dh * 2 + 3 * d * cfg.intermediate_size
    return 2 * (L * per_layer + d * cfg.vocab_size)  # + the LM head


def forward_flops(cfg, lengths) -> float:
    heads = cfg.num_attention_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    lengths = np.asarray(lengths, np.float64)
    return float(matmul_flops_per_token(cfg) * lengths.sum()
                 + 4 * cfg.num_hidden_layers * heads * dh * (lengths ** 2).sum())


def sst2_batches(folder: str, data_dir: str, rows: int, batch: int, max_length: int, group: int = 0,
                 seed: int = 0) -> list:
    """The SST-2 recipe's training rows as the batches of one shuffled epoch: `[(ids rows, labels)]`, unpadded
    (each side pads its own way: jaxft to the recipe's `data.pad_to_multiple_of`, PyTorch to the longest row).
    `group`: the recipe's `data.group_by_length` (windows of that many batches sorted by length; 0: off),
    applied with the data pipeline's own `group_by_length` (its shuffle seeded here, not per epoch)."""
    import csv

    from transformers import AutoTokenizer

    from jaxft.data.batches import group_by_length

    with open(f"{data_dir}/sst2/train.tsv", encoding="utf-8") as f:
        table = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok([r["sentence"] for r in table], truncation=True, max_length=max_length)["input_ids"]
    labels = np.array([int(r["label"]) for r in table], np.int32)
    order = np.random.default_rng(seed).permutation(len(ids))
    if group:
        order = group_by_length(order, np.array([len(r) for r in ids]), batch, group, np.random.default_rng(seed + 1))
    return [([ids[i] for i in order[s:s + batch]], labels[order[s:s + batch]])
            for s in range(0, len(ids) - batch + 1, batch)]


def pad(rows: list, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    n = max(len(r) for r in rows)
    n = -(-n // multiple) * multiple
    ids = np.zeros((len(rows), n), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def lm_folder(root: str, shape: str) -> str:
    """A random Llama of a named shape, saved once under `root` (by PyTorch, as both sides load it)."""
    from pathlib import Path

    folder = Path(root) / shape
    if not (folder / "config.json").exists():
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(max_position_embeddings=4096, **LM_SHAPES[shape])
        transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def timed_windows(step, batches: list, warmup: int, steps: int, repeats: int, sync, shape=None) -> tuple[float, list]:
    """Run `step` over `batches` (cycling): one first step, one untimed step per other batch shape
    (`shape(batch)`; every compilation happens before the windows), `warmup` more, then `repeats` timed
    windows of `steps` steps. → `(first step seconds, [(seconds per step, [batch index of each step]) per
    window])`."""
    t = time.perf_counter()
    sync(step(batches[0]))
    first = time.perf_counter() - t
    if shape is not None:
        seen = {shape(batches[0])}
        for b in batches:
            if shape(b) not in seen:
                seen.add(shape(b))
                sync(step(b))
    i = 1
    for _ in range(warmup):
        sync(step(batches[i % len(batches)]))
        i += 1
    windows = []
    for _ in range(repeats):
        used = [(i + k) % len(batches) for k in range(steps)]
        t = time.perf_counter()
        out = None
        for j in used:
            out = step(batches[j])
        sync(out)
        windows.append(((time.perf_counter() - t) / steps, used))
        i += steps
    return first, windows


def window_report(p: dict, first: float, windows: list, lengths: list) -> dict:
    """Per window: seconds per step, examples/s, real tokens/s and model FLOP/s (`lengths[b]`: the real
    lengths of the rows of batch b)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(p["folder"])
    passes = 2 if p.get("lora_rank") else 3
    out = {"first_step_s": first, "step_s": [], "examples_per_s": [], "tokens_per_s": [], "model_flops_per_s": []}
    for seconds, used in windows:
        total = seconds * len(used)
        out["step_s"].append(seconds)
        out["examples_per_s"].append(sum(len(lengths[b]) for b in used) / total)
        out["tokens_per_s"].append(sum(int(np.sum(lengths[b])) for b in used) / total)
        out["model_flops_per_s"].append(sum(passes * forward_flops(cfg, lengths[b]) for b in used) / total)
    return out


# ------------------------------------------------------------------------------------- the jaxft side

def jax_matmul_peak(dtype: str = "float32") -> float:
    """Best FLOP/s of a jitted square matmul over a few sizes (median of 10 calls each)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in (512, 1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192):
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            f(a).block_until_ready()
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def jax_side(p: dict) -> dict:
    import jax

    import jaxft
    from jaxft.config import OptimSection
    from jaxft.optim import make_optimizer
    from jaxft.train.losses import causal_lm_loss, classification_loss
    from jaxft.train.step import Functional, init_state, make_train_step

    dtype = p.get("dtype", "float32")
    options = dict(dtype=dtype, remat=p.get("remat", "none"))
    if p["task"] == "sequence-classification":
        model = jaxft.load_model(p["folder"], task=p["task"], num_labels=2, **options)
        loss = classification_loss
    else:
        model = jaxft.load_model(p["folder"], task=p["task"], **options)
        loss = causal_lm_loss
    trainable = None
    if p.get("lora_rank"):
        from jaxft.lora import LoraSpec, apply_lora

        trainable = apply_lora(model, LoraSpec(rank=p["lora_rank"], alpha=2 * p["lora_rank"])).trainable
    fn = Functional(model, trainable) if trainable is not None else Functional(model)
    tx, lr = make_optimizer(OptimSection(lr=p["lr"], weight_decay=0.01, warmup_ratio=0.1), 1000)
    state = init_state(fn, tx, 0)
    train_step = make_train_step(fn, loss, tx, lr)
    batches = [jax.device_put(b) for b in jax_batches(p)]
    box = {"state": state}

    def step(batch):
        box["state"], m = train_step(box["state"], batch)
        return m["loss"]

    lengths = [np.asarray(b["attention_mask"]).sum(1) for b in batches]
    first, windows = timed_windows(step, batches, p["warmup"], p["steps"], p["repeats"], jax.block_until_ready,
                                   shape=lambda b: b["input_ids"].shape)
    compiled = {}
    if p.get("profile_steps"):
        from jaxft.bench.profile import xla_profile

        compiled["profile"] = xla_profile(lambda: step(batches[0]), jax.block_until_ready, p["profile_steps"])
    if p["task"] == "causal-lm":   # one fixed shape: XLA's memory analysis of the program that was timed
        ma = train_step.lower(box["state"], batches[0]).compile().memory_analysis()
        compiled["xla_bytes"] = {"temporaries": ma.temp_size_in_bytes, "arguments": ma.argument_size_in_bytes,
                                 "outputs": ma.output_size_in_bytes}
    return window_report(p, first, windows, lengths) | compiled | {
            "peak_rss_bytes": peak_rss_bytes(),
            "matmul_peak_flops": jax_matmul_peak(dtype), "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "trainable_params": sum(int(np.prod(v.shape))
                                                                           for v in fn.params.values())}


def jax_batches(p: dict) -> list[dict]:
    if p["task"] == "sequence-classification":
        out = []
        for rows, labels in sst2_batches(p["folder"], p["data_dir"], p["rows"], p["batch"], p["length"], p["group"]):
            ids, mask = pad(rows, p["multiple"])
            out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                        "labels": labels, "weights": np.ones(len(rows), np.float32)})
        return out
    ids = np.random.RandomState(0).randint(0, p["vocab"], (p["batch"], p["length"])).astype(np.int32)
    return [{"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
             "weights": np.ones(p["batch"], np.float32)}]


# ----------------------------------------------------------------------------------- the PyTorch side

def torch_matmul_peak() -> float:
    import torch

    best = 0.0
    for n in (512, 1024, 2048):
        a = torch.ones(n, n)
        a @ a
        times = []
        for _ in range(10):
            t = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def torch_side(p: dict) -> dict:
    """The plain PyTorch loop: AdamW (no decay on biases and norms), linear warmup, clipping at 1.0."""
    import torch
    import transformers

    torch.manual_seed(0)
    if p["task"] == "sequence-classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(p["folder"], num_labels=2)
        batches = []
        group = p["group"] if p.get("torch_same_batches") else 0   # the plain loop: random batches
        for rows, labels in sst2_batches(p["folder"], p["data_dir"], p["rows"], p["batch"], p["length"], group):
            ids, mask = pad(rows, p["multiple"] if p.get("torch_same_batches") else 1)
            batches.append({"input_ids": torch.tensor(ids).long(), "attention_mask": torch.tensor(mask).long(),
                            "labels": torch.tensor(labels).long()})
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(p["folder"])
        ids = torch.tensor(np.random.RandomState(0).randint(0, p["vocab"], (p["batch"], p["length"]))).long()
        batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    if p.get("lora_rank"):
        import peft

        r = p["lora_rank"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    model.train()
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    no_decay = lambda n: n.endswith("bias") or "norm" in n.lower()
    opt = torch.optim.AdamW([{"params": [q for n, q in named if not no_decay(n)], "weight_decay": 0.01},
                             {"params": [q for n, q in named if no_decay(n)], "weight_decay": 0.0}], lr=p["lr"])
    sched = transformers.get_linear_schedule_with_warmup(opt, 100, 1000)
    params = [q for _, q in named]

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        return loss

    lengths = [b["attention_mask"].sum(1).numpy() for b in batches]
    first, windows = timed_windows(step, batches, p["warmup"], p["steps"], p["repeats"], lambda x: x.item())
    extra = {}
    if p.get("profile_steps"):
        from jaxft.bench.profile import torch_profile

        extra["profile"] = torch_profile(lambda: step(batches[0]), lambda x: x.item(), p["profile_steps"])
    return window_report(p, first, windows, lengths) | extra | {
            "peak_rss_bytes": peak_rss_bytes(),
            "matmul_peak_flops": torch_matmul_peak(), "backend": "cpu", "device": "cpu",
            "torch_threads": torch.get_num_threads(), "trainable_params": sum(q.numel() for q in params)}


# ------------------------------------------------------------------------------------ the MoE layer

def moe_side(p: dict) -> dict:
    """One DeepSeekMoE layer (DeepSeek-V3 routing, one shared expert), forward + backward of the mean square
    of its output, for each expert count: `{experts: median seconds}`."""
    out = {}
    for e in p["experts"]:
        out[str(e)] = (_moe_jax if p["side"] == "jaxft" else _moe_torch)(e, p)
    return {"layer_s": out, "peak_rss_bytes": peak_rss_bytes()}


def _moe_jax(experts: int, p: dict) -> list[float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxft.models import moe, rope
    from jaxft.models.deepseek import DeepseekConfig
    from jaxft.models.options import RunOptions

    cfg = DeepseekConfig(
        model_type="deepseek_v3", vocab_size=8, hidden_size=p["hidden"], intermediate_size=p["width"],
        num_hidden_layers=1, num_attention_heads=1, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, rope=rope.Rope(dim=8), softmax_scale=0.25, rope_interleave=True,
        first_k_dense_replace=0, n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=p["top_k"],
        moe_intermediate_size=p["width"], topk_method="noaux_tc", scoring_func="sigmoid", n_group=1,
        topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, options=RunOptions())
    graphdef, params, rest = nnx.split(moe.MoE(cfg, nnx.Rngs(0)), nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (1, p["tokens"], p["hidden"]), jnp.float32)

    @jax.jit
    def grads(params, x):
        def loss(q, x):
            y, _, aux = nnx.merge(graphdef, q, rest)(x)
            return jnp.mean(y ** 2) + aux
        return jax.grad(loss, argnums=(0, 1))(params, x)

    _, windows = timed_windows(lambda x: grads(params, x), [x], 1, 1, p["repeats"], jax.block_until_ready)
    return [seconds for seconds, _ in windows]


def _moe_torch(experts: int, p: dict) -> list[float]:
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    cfg = DeepseekV3Config(hidden_size=p["hidden"], moe_intermediate_size=p["width"], n_routed_experts=experts,
                           num_experts_per_tok=p["top_k"], n_shared_experts=1, n_group=1, topk_group=1,
                           norm_topk_prob=True, routed_scaling_factor=2.5)
    layer = DeepseekV3MoE(cfg)
    for q in layer.parameters():  # transformers leaves the fused expert weights uninitialised
        torch.nn.init.normal_(q, std=0.02)
    x = torch.randn(1, p["tokens"], p["hidden"], requires_grad=True)

    def step(x):
        layer.zero_grad()
        loss = (layer(x) ** 2).mean()
        loss.backward()
        return loss

    _, windows = timed_windows(step, [x], 1, 1, p["repeats"], lambda v: v.item())
    return [seconds for seconds, _ in windows]


def rollout_side(p: dict) -> dict:
    """GRPO-style sampling: `prompts` × `generations` rows of `prompt_length` random tokens, `new_tokens` sampled
    after each at temperature 1 (no end-of-sequence stop, so both sides make every token); the median seconds
    of `repeats` timed calls after one warm-up (which compiles) and the first call's seconds. jaxft: its
    rollout program (`jaxft.generate.rollout_program`, the GRPO objective's sampler); PyTorch: `transformers`
    `generate` with its static KV cache."""
    rows, n = p["prompts"] * p["generations"], p["new_tokens"]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, p["vocab"], (rows, p["prompt_length"])).astype(np.int32)
    times = []
    if p["side"] == "jaxft":
        import jax

        import jaxft
        from jaxft.generate import rollout_program
        from jaxft.train.step import Functional

        fn = Functional(jaxft.load_model(p["folder"], task="causal-lm"))
        run = rollout_program(fn, n, temperature=1.0)
        mask = np.ones(ids.shape, bool)
        for i in range(p["repeats"] + 1):
            t = time.perf_counter()
            out = jax.block_until_ready(run(fn.params, ids, mask, jax.random.key(i), [], 0))
            times.append(time.perf_counter() - t)
        assert out.shape == (rows, n)
    else:
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(p["folder"], dtype=torch.float32).eval()
        x = torch.tensor(ids, dtype=torch.long)
        for i in range(p["repeats"] + 1):
            torch.manual_seed(i)
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=n, min_new_tokens=n, cache_implementation="static",
                                     eos_token_id=None, pad_token_id=0)
            times.append(time.perf_counter() - t)
        assert out.shape == (rows, p["prompt_length"] + n)
    return {"call_s": times[1:], "first_call_s": times[0], "new_tokens": rows * n, "peak_rss_bytes": peak_rss_bytes()}


SIDES = {"jaxft": jax_side, "torch": torch_side}


def main() -> None:
    workload, side, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if side == "jaxft":
        from jaxft.hostmem import restart_with_huge_pages

        restart_with_huge_pages()   # the process as the `jaxft` command starts it
    if params["task"] == "moe":
        result = moe_side(dict(params, side=side))
    elif params["task"] == "rollout":
        result = rollout_side(dict(params, side=side))
    else:
        result = SIDES[side](params)
    print(json.dumps(dict(result, workload=workload, side=side)))


if __name__ == "__main__":
    main()
