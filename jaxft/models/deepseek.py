"""DeepSeek-V2 / V2-Lite / V3 / R1 (`model_type` `deepseek_v2`, `deepseek_v3`; `*ForCausalLM` in `transformers`).

A pre-norm decoder whose attention is MLA (`jaxft.models.mla`) and whose MLP is dense in the first
`first_k_dense_replace` layers and DeepSeekMoE (`jaxft.models.moe`) after:

    h = x + MLA(RMSNorm(x))
    y = h + (GatedMLP if layer < first_k_dense_replace else MoE)(RMSNorm(h))
    logits = RMSNorm(y_L) · Wᵀ   (W = lm_head, or the input embedding when tied)

What the two model types differ in, as `transformers` 5.x computes them:

| | deepseek_v2 | deepseek_v3 |
| --- | --- | --- |
| router scores | softmax | sigmoid |
| expert choice (`topk_method`) | greedy or group_limited_greedy | noaux_tc (with `e_score_correction_bias`) |
| `norm_topk_prob` | must be false (transformers ignores it) | honoured |
| RoPE pairs | interleaved, always | interleaved iff `rope_interleave` |
| `mlp_bias` | dense MLP and shared experts | — |

Both read `q_lora_rank` (null = a plain `q_proj`, as in V2-Lite), `kv_lora_rank`, `qk_nope_head_dim`,
`qk_rope_head_dim`, `v_head_dim`, `n_group`/`topk_group`, `routed_scaling_factor`, `n_shared_experts`,
`n_routed_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `attention_bias`, `tie_word_embeddings`
and every RoPE scaling of `jaxft.models.rope` (yarn with `mscale`/`mscale_all_dim` included). Values
`transformers` would compute differently from DeepSeek's own code, or not at all, raise naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from jaxft.hf.table import IDENTITY, Linear, NameTable, Rule
from jaxft.models import causal, moe, rope as rope_lib
from jaxft.models.options import RunOptions
from jaxft.models.layers import Embed, Keys, RMSNorm, activation, make_layers, num_layers, residual, run_layers
from jaxft.models.mla import MLA

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class DeepseekConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: rope_lib.Rope
    softmax_scale: float
    rope_interleave: bool
    first_k_dense_replace: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    topk_method: str
    scoring_func: str
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    aux_loss_alpha: float = 0.0       # the checkpoint's balance-loss coefficient, a default for training
    num_mtp_layers: int = 0           # V3 multi-token-prediction layers stored after the last layer
    moe_impl: str = "auto"            # `jaxft.models.moe.IMPLS`
    options: RunOptions = RunOptions()  # dtype, param_dtype, remat, scan_layers (`jaxft.models.options`)

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @classmethod
    def from_hf(cls, hf, options: RunOptions = RunOptions(), *, num_labels: int | None = None) -> "DeepseekConfig":
        """Read a `transformers` DeepseekV2Config / DeepseekV3Config; raise naming any field jaxft cannot honour."""
        mt = hf.model_type
        if mt not in MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not served by jaxft.models.deepseek ({MODEL_TYPES})")
        activation(hf.hidden_act)
        if getattr(hf, "quantization_config", None):
            raise ValueError("unsupported quantization_config: jaxft loads float checkpoints only (dequantise "
                             "DeepSeek-V3's FP8 weights to bfloat16 first)")
        N = hf.num_attention_heads
        if (hf.num_key_value_heads or N) != N:
            raise ValueError(f"unsupported num_key_value_heads={hf.num_key_value_heads}: MLA expands its latent "
                             f"into one key/value per query head, so it must equal num_attention_heads={N}")
        if (getattr(hf, "moe_layer_freq", 1) or 1) != 1:
            raise ValueError(f"unsupported moe_layer_freq={hf.moe_layer_freq}: transformers makes every layer "
                             f"from first_k_dense_replace on an MoE layer (moe_layer_freq 1)")
        E, k = hf.n_routed_experts, hf.num_experts_per_tok
        if not E or not k or k > E:
            raise ValueError(f"unsupported n_routed_experts={E}, num_experts_per_tok={k}: jaxft needs "
                             f"1 ≤ num_experts_per_tok ≤ n_routed_experts")
        if not hf.n_shared_experts or hf.n_shared_experts < 1:
            raise ValueError(f"unsupported n_shared_experts={hf.n_shared_experts}: jaxft needs at least one "
                             f"shared expert, as every DeepSeek V2/V3 checkpoint has")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not getattr(hf, name, None):
                raise ValueError(f"unsupported {name}={getattr(hf, name, None)!r}: it must be a positive integer")
        if mt == "deepseek_v2":
            method, scoring, default_scoring = hf.topk_method, "softmax", "softmax"
            methods = ("greedy", "group_limited_greedy")
            if hf.norm_topk_prob:
                raise ValueError("unsupported norm_topk_prob=True for deepseek_v2: transformers' DeepseekV2 "
                                 "router ignores it while DeepSeek's own code renormalises; jaxft refuses to guess")
            interleave = True
        else:
            method, scoring, default_scoring = getattr(hf, "topk_method", None) or "noaux_tc", "sigmoid", "sigmoid"
            methods = ("noaux_tc",)
            interleave = bool(hf.rope_interleave)
        if method not in methods:
            raise ValueError(f"unsupported topk_method={method!r} for {mt}: transformers implements {methods}")
        given = getattr(hf, "scoring_func", None) or default_scoring
        if given != scoring:
            raise ValueError(f"unsupported scoring_func={given!r} for {mt}: transformers uses {scoring!r}")
        n_group = topk_group = None
        if method != "greedy":
            n_group, topk_group = hf.n_group, hf.topk_group
            if not n_group or not topk_group or E % n_group or topk_group > n_group:
                raise ValueError(f"unsupported n_group={n_group}, topk_group={topk_group} for topk_method="
                                 f"{method!r}: n_group must divide n_routed_experts={E} and 1 ≤ topk_group ≤ n_group")
            if method == "noaux_tc" and E // n_group < 2:
                raise ValueError(f"unsupported n_group={n_group}: noaux_tc scores a group by its two best experts, "
                                 f"so each group needs ≥ 2 of the n_routed_experts={E}")
            if k > topk_group * (E // n_group):
                raise ValueError(f"unsupported num_experts_per_tok={k}: the topk_group={topk_group} kept groups "
                                 f"hold only {topk_group * (E // n_group)} experts")
        P, O = hf.qk_nope_head_dim, hf.qk_rope_head_dim
        rope = rope_lib.rope_from_hf(hf, O)
        if rope.dim != O:
            raise ValueError(f"rope_parameters.partial_rotary_factor must be 1.0 for {mt} "
                             f"(rotary width {rope.dim} ≠ qk_rope_head_dim {O})")
        L = hf.num_hidden_layers
        return cls(
            model_type=mt, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_hidden_layers=L, num_attention_heads=N,
            q_lora_rank=hf.q_lora_rank or None, kv_lora_rank=hf.kv_lora_rank, qk_nope_head_dim=P,
            qk_rope_head_dim=O, v_head_dim=hf.v_head_dim, rope=rope,
            softmax_scale=(P + O) ** -0.5 * rope_lib.mla_softmax_mscale(hf, rope), rope_interleave=interleave,
            first_k_dense_replace=int(hf.first_k_dense_replace or 0), n_routed_experts=E,
            n_shared_experts=hf.n_shared_experts, num_experts_per_tok=k,
            moe_intermediate_size=hf.moe_intermediate_size, topk_method=method, scoring_func=scoring,
            n_group=n_group, topk_group=topk_group, norm_topk_prob=bool(hf.norm_topk_prob),
            routed_scaling_factor=float(hf.routed_scaling_factor), hidden_act=hf.hidden_act,
            rms_norm_eps=hf.rms_norm_eps, attention_bias=bool(hf.attention_bias),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)), attention_dropout=float(hf.attention_dropout or 0.0),
            tie_word_embeddings=bool(hf.tie_word_embeddings), initializer_range=hf.initializer_range,
            aux_loss_alpha=float(getattr(hf, "aux_loss_alpha", 0.0) or 0.0),
            num_mtp_layers=int(getattr(hf, "num_nextn_predict_layers", 0) or 0) if mt == "deepseek_v3" else 0,
            options=options)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DeepseekConfig, layer: int, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **cfg.options.kw())
        self.self_attn = MLA(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **cfg.options.kw())
        self.is_moe = cfg.is_moe(layer)
        self.mlp = moe.MoE(cfg, rngs) if self.is_moe else moe.GatedMLP(cfg, cfg.intermediate_size, rngs)

    def __call__(self, x, cos, sin, mask, token_mask, keys: Keys, kv=None, index=None):
        """→ `(x, (c, k_rot), (counts [E], balance_loss []) or None for a dense layer)`."""
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, keys, kv, index)
        x = x + a
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), kv, None
        y, counts, loss = self.mlp(h, token_mask)
        return x + y, kv, (counts, loss)


class DeepseekModel(nnx.Module):
    """Embeddings, the blocks and the final norm → `(h [B, T, D], (c's, k_rot's), RouterStats)`.

    The blocks are `layers` (an `nnx.List`, or with `scan_layers` the stacked MoE layers) and, when
    scanned, `dense_layers` (the stacked first `first_k_dense_replace` layers, whose MLP differs)."""

    def __init__(self, cfg: DeepseekConfig, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range, rngs=rngs, **cfg.options.kw())
        k, L = cfg.first_k_dense_replace, cfg.num_hidden_layers
        if cfg.options.scan_layers:
            self.dense_layers = make_layers(lambda i: DecoderLayer(cfg, i, rngs), k, True) if k else None
            self.layers = make_layers(lambda i: DecoderLayer(cfg, k + i, rngs), L - k, True) if L > k else None
        else:
            self.layers = make_layers(lambda i: DecoderLayer(cfg, i, rngs), L, False)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **cfg.options.kw())
        self.rope, self.experts, self.remat, self.k = cfg.rope, cfg.n_routed_experts, cfg.options.remat, k

    def _groups(self) -> list[tuple[nnx.Module, int]]:
        """`(blocks, index of the first)` in order."""
        if isinstance(self.layers, nnx.List):
            return [(self.layers, 0)]
        return [(g, first) for g, first in ((self.dense_layers, 0), (self.layers, self.k)) if g is not None]

    def __call__(self, input_ids, positions, mask, token_mask, keys: Keys, cache: causal.KVCache | None = None):
        x = residual(self.embed_tokens(input_ids))
        cos, sin = rope_lib.cos_sin(self.rope, positions)
        index = None if cache is None else cache.index
        latents, rots, counts, losses = [], [], [], []
        for group, first in self._groups():
            def call(layer, h, i, kv, first=first):
                h, kv, stats = layer(h, cos, sin, mask, token_mask, keys.layer(first + i), kv, index)
                return residual(h), (kv if cache is not None else None, stats)

            n = num_layers(group)
            xs = None if cache is None else list(zip(cache.keys[first:first + n], cache.values[first:first + n]))
            x, outs = run_layers(group, self.remat, x, call, xs)
            for kv, stats in outs:
                if kv is not None:
                    latents.append(kv[0])
                    rots.append(kv[1])
                if stats is not None:
                    counts.append(stats[0])
                    losses.append(stats[1])
        stats = moe.RouterStats(
            jnp.stack(counts) if counts else jnp.zeros((0, self.experts), jnp.float32),
            jnp.stack(losses) if losses else jnp.zeros((0,), jnp.float32))
        return self.norm(x), (latents, rots), stats


class DeepseekForCausalLM(causal.CausalLM):
    """`logits [B, T, V]` (float32) of the next token at every position; `forward_with_router_stats` also
    returns the MoE layers' `RouterStats` for the train step (head and decoding: `causal.CausalLM`)."""

    def __init__(self, cfg: DeepseekConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.model = DeepseekModel(cfg, rngs)
        self.init_head(cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings, cfg.initializer_range,
                       cfg.options, rngs)

    def input_embedding(self) -> Embed:
        return self.model.embed_tokens

    def kv_shapes(self) -> list:
        """The compressed latent cache: per layer `c [B, S, 1, kv_lora_rank]`, `k_rot [B, S, 1, qk_rope_head_dim]`."""
        cfg = self.config
        return [((1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim))] * cfg.num_hidden_layers

    def backbone(self, input_ids, positions, mask, token_mask, keys: Keys, cache=None):
        return self.model(input_ids, positions, mask, token_mask, keys, cache)


def name_table(cfg: DeepseekConfig, task: str) -> NameTable:
    """HF `DeepseekV{2,3}ForCausalLM` names ↔ jaxft paths (the paths mirror the HF module tree).

    Routed experts are stored per expert in HF (`mlp.experts.{e}.gate_proj.weight`, as `save_pretrained`
    writes them and Hub checkpoints hold them) and stacked along the leading `expert` axis in jaxft.
    With `scan_layers`, layers `0 … k-1` (dense MLP) stack into `model.dense_layers` and layers `k … L-1`
    (MoE) into `model.layers`, each with the layer as its leading axis.
    """
    H, k, L = "model.layers.{i}.", cfg.first_k_dense_replace, cfg.num_hidden_layers
    if cfg.options.scan_layers:
        groups = [("model.dense_layers.", {"i": (0, k)}, False), ("model.layers.", {"i": (k, L)}, True)]
        groups = [g for g, n in zip(groups, (k, L - k)) if n]
    else:
        groups = [(H, None, None)]  # one list; a layer's MLP kind follows from its tensors
    rules = [Rule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
             Rule("model.norm.weight", "model.norm.scale")]
    for P, within, is_moe in groups:
        rules += _layer_rules(cfg, H, P, within, is_moe)
    ignore = [r".*rotary_emb\.inv_freq"]
    # DeepSeek-V3 checkpoints store their multi-token-prediction module(s) as extra layers after the last
    # one; `transformers` does not load them either.
    ignore += [rf"model\.layers\.{cfg.num_hidden_layers + j}\..*" for j in range(cfg.num_mtp_layers)]
    if cfg.tie_word_embeddings:
        ignore.append(r"lm_head\.weight")  # transformers re-ties it to the embedding on load
    else:
        rules.append(Rule("lm_head.weight", "lm_head.kernel", Linear(1)))
    return NameTable(rules, ignore=ignore)


def _layer_rules(cfg: DeepseekConfig, H: str, P: str, within, is_moe: bool | None) -> list[Rule]:
    """Rules of the blocks whose HF names start with `H` and jaxft paths with `P`; `is_moe` None = both
    MLP kinds (an unscanned list), else only that kind's MLP tensors."""
    A, M, PA, PM = H + "self_attn.", H + "mlp.", P + "self_attn.", P + "mlp."
    r = lambda hf, path, t=None: Rule(hf, path, t or IDENTITY, within=within)  # noqa: E731
    rules = [r(H + "input_layernorm.weight", P + "input_layernorm.scale"),
             r(H + "post_attention_layernorm.weight", P + "post_attention_layernorm.scale"),
             r(A + "kv_a_proj_with_mqa.weight", PA + "kv_a_proj_with_mqa.kernel", Linear(1)),
             r(A + "kv_a_layernorm.weight", PA + "kv_a_layernorm.scale"),
             r(A + "kv_b_proj.weight", PA + "kv_b_proj.kernel", Linear(1)),
             r(A + "o_proj.weight", PA + "o_proj.kernel", Linear(2))]
    if cfg.q_lora_rank is None:
        rules.append(r(A + "q_proj.weight", PA + "q_proj.kernel", Linear(1)))
    else:
        rules += [r(A + "q_a_proj.weight", PA + "q_a_proj.kernel", Linear(1)),
                  r(A + "q_a_layernorm.weight", PA + "q_a_layernorm.scale"),
                  r(A + "q_b_proj.weight", PA + "q_b_proj.kernel", Linear(1))]
    if cfg.attention_bias:
        rules += [r(A + f"{p}.bias", PA + f"{p}.bias")
                  for p in ("kv_a_proj_with_mqa", "o_proj") + (("q_a_proj",) if cfg.q_lora_rank else ())]
    # the dense layers' MLP, the MoE layers' shared experts
    mlps = {None: ("", "shared_experts."), False: ("",), True: ("shared_experts.",)}[is_moe]
    for mlp in mlps:
        for p in ("gate_proj", "up_proj", "down_proj"):
            rules.append(r(M + mlp + f"{p}.weight", PM + mlp + f"{p}.kernel", Linear(1)))
            if cfg.mlp_bias:
                rules.append(r(M + mlp + f"{p}.bias", PM + mlp + f"{p}.bias"))
    if is_moe is not False:
        rules += [r(M + f"experts.{{e}}.{p}.weight", PM + f"experts.{p}.kernel", Linear(1))
                  for p in ("gate_proj", "up_proj", "down_proj")]
        rules.append(r(M + "gate.weight", PM + "gate.kernel", Linear(1)))
        if cfg.topk_method == "noaux_tc":
            rules.append(r(M + "gate.e_score_correction_bias", PM + "gate.e_score_correction_bias"))
    return rules
