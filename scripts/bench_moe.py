"""Time one DeepSeekMoE layer, forward + backward, for 8 vs 64 routed experts at the same top-k and tokens.

    python scripts/bench_moe.py                          # the default grid on this machine's backend
    python scripts/bench_moe.py --tokens 8192 --top-k 2 4 8 --experts 8 64 --impl auto dense

With the sort/gather dispatch (`impl auto`: grouped `ragged_dot` on TPU, padded blocks elsewhere) the
time should follow top-k (the rows N·k each token sends) and barely move with the number of experts;
the dense every-expert reference (`impl dense`) grows with the number of experts instead. Each entry is
the median of `--runs` timed calls after one compile-and-warm-up call. `bench_moe(...)` returns the rows
for other scripts (e.g. a `scripts/bench.py` suite).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import moe, rope
from jaxft.models.deepseek import DeepseekConfig
from jaxft.models.options import RunOptions


def layer_config(experts: int, top_k: int, hidden: int, width: int, dtype: str) -> DeepseekConfig:
    """A DeepSeek-V3-style MoE layer (sigmoid + noaux_tc routing, one group, one shared expert)."""
    return DeepseekConfig(
        model_type="deepseek_v3", vocab_size=8, hidden_size=hidden, intermediate_size=width, num_hidden_layers=1,
        num_attention_heads=1, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, rope=rope.Rope(dim=8), softmax_scale=0.25, rope_interleave=True, first_k_dense_replace=0,
        n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=top_k, moe_intermediate_size=width,
        topk_method="noaux_tc", scoring_func="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, options=RunOptions(dtype=dtype, param_dtype=dtype))


def time_layer(experts: int, top_k: int, tokens: int, hidden: int, width: int, impl: str, runs: int,
               dtype: str = "float32") -> float:
    """Median seconds of one jitted forward + backward (gradients of every parameter and of the input)."""
    m = moe.MoE(layer_config(experts, top_k, hidden, width, dtype), nnx.Rngs(0))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (tokens // 512, 512, hidden), jnp.dtype(dtype))

    @jax.jit
    def step(params, x):
        def loss(p, x):
            y, _, aux = nnx.merge(graphdef, p, rest)(x, impl=impl)
            return jnp.mean(y.astype(jnp.float32) ** 2) + aux
        return jax.grad(loss, argnums=(0, 1))(params, x)

    jax.block_until_ready(step(params, x))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_moe(tokens: int = 4096, hidden: int = 256, width: int = 128, top_ks=(2, 4, 8), experts=(8, 64),
              impls=("auto", "dense"), runs: int = 5, dtype: str = "float32") -> list[dict]:
    """`[{impl, top_k, experts, ms}]` over the grid."""
    rows = []
    for impl in impls:
        for k in top_ks:
            for e in experts:
                ms = 1e3 * time_layer(e, k, tokens, hidden, width, impl, runs, dtype)
                rows.append(dict(impl=impl, top_k=k, experts=e, ms=ms))
                print(f"{impl:>6}  top-k {k:>2}  experts {e:>3}  {ms:9.1f} ms", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per call (a multiple of 512)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--width", type=int, default=128, help="moe_intermediate_size")
    p.add_argument("--top-k", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--impl", nargs="+", default=["auto", "dense"], choices=moe.IMPLS)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    print(f"backend {jax.default_backend()}, {a.tokens} tokens, hidden {a.hidden}, expert width {a.width}, "
          f"median of {a.runs}")
    rows = bench_moe(a.tokens, a.hidden, a.width, a.top_k, a.experts, a.impl, a.runs, a.dtype)
    lo, hi = min(a.experts), max(a.experts)
    for impl in a.impl:
        for k in a.top_k:
            t = {r["experts"]: r["ms"] for r in rows if r["impl"] == impl and r["top_k"] == k}
            print(f"{impl:>6}  top-k {k:>2}: {hi} experts / {lo} experts = {t[hi] / t[lo]:.2f}×")


if __name__ == "__main__":
    main()
