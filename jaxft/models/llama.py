"""One decoder for `llama`, `mistral`, `qwen2` and `qwen3` (`*ForCausalLM` in `transformers`).

The four architectures are the same pre-norm block, differing only in options read from `config.json`:

    h = x + o_proj(Attn(rope(q_norm?(q_proj(RMSNorm(x)))), rope(k_norm?(k_proj(…))), v_proj(…)))
    y = h + down_proj(act(gate_proj(RMSNorm(h))) · up_proj(RMSNorm(h)))
    logits = RMSNorm(y_L) · Wᵀ   (W = lm_head, or the input embedding when tied)

What differs, and where `transformers` reads it from:

    q/k/v bias       llama, qwen3: `attention_bias`; qwen2: always; mistral: never
    o_proj bias      llama, qwen3: `attention_bias`; qwen2, mistral: never
    MLP bias         llama: `mlp_bias`; the others: never
    q/k RMSNorm      qwen3 only (over each head's `head_dim` channels, before RoPE)
    sliding window   mistral: every layer when `sliding_window` is set; qwen2/qwen3: the layers whose
                     `layer_types` entry is `sliding_attention` (`transformers` derives it from
                     `use_sliding_window` and `max_window_layers`: layers i ≥ max_window_layers);
                     query t then sees keys s with t − window < s ≤ t; llama: never

All take grouped-query attention (`num_key_value_heads`), `head_dim` ≠ hidden/heads, tied or untied
embeddings and every RoPE scaling in `jaxft.models.rope`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from jaxft.hf.table import Flatten, Linear, NameTable, Rule
from jaxft.models import causal, rope as rope_lib
from jaxft.models.options import RunOptions
from jaxft.models.attention import attention
from jaxft.models.layers import Dense, Embed, Keys, RMSNorm, activation, gated, make_layers, residual, run_layers
from jaxft.parallel import constrain

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: rope_lib.Rope
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()     # per layer: uses the sliding window
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    options: RunOptions = RunOptions()  # dtype, param_dtype, remat, scan_layers (`jaxft.models.options`)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.sliding_layers[layer] else None

    @classmethod
    def from_hf(cls, hf, options: RunOptions = RunOptions(), *, num_labels: int | None = None) -> "DecoderConfig":
        """Read a `transformers` Llama/Mistral/Qwen2/Qwen3 config; raise naming any field jaxft cannot honour."""
        mt = hf.model_type
        if mt not in MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not served by jaxft.models.llama ({MODEL_TYPES})")
        activation(hf.hidden_act)
        n, kv = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
        if n % kv:
            raise ValueError(f"num_attention_heads={n} is not a multiple of num_key_value_heads={kv}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n
        rope = rope_lib.rope_from_hf(hf, head_dim)
        if rope.dim != head_dim:
            raise ValueError(f"rope_parameters.partial_rotary_factor must be 1.0 for {mt} "
                             f"(rotary width {rope.dim} ≠ head_dim {head_dim})")
        L = hf.num_hidden_layers
        window = getattr(hf, "sliding_window", None)
        if mt == "mistral":
            sliding = (window is not None,) * L
        elif mt in ("qwen2", "qwen3"):
            types = list(hf.layer_types)
            bad = sorted(set(types) - {"full_attention", "sliding_attention"})
            if bad or len(types) != L:
                raise ValueError(f"unsupported layer_types={types!r}: expected {L} entries of "
                                 f"'full_attention' / 'sliding_attention'")
            sliding = tuple(t == "sliding_attention" for t in types)
            if any(sliding) and window is None:
                raise ValueError("layer_types asks for sliding_attention but sliding_window is not set")
        else:
            sliding = (False,) * L
        bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=mt, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_hidden_layers=L, num_attention_heads=n,
            num_key_value_heads=kv, head_dim=head_dim, rope=rope, hidden_act=hf.hidden_act,
            rms_norm_eps=hf.rms_norm_eps,
            qkv_bias=True if mt == "qwen2" else bias and mt != "mistral",
            o_bias=bias and mt in ("llama", "qwen3"),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)) and mt == "llama",
            qk_norm=mt == "qwen3", tie_word_embeddings=bool(hf.tie_word_embeddings),
            sliding_window=int(window) if any(sliding) else None, sliding_layers=sliding,
            attention_dropout=float(hf.attention_dropout or 0.0), initializer_range=hf.initializer_range,
            options=options)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; `N` query heads share `K` key/value heads."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        kw, std = cfg.options.kw(), cfg.initializer_range
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Dense("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"),
                            use_bias=cfg.qkv_bias, std=std, rngs=rngs, **kw)
        self.k_proj = Dense("BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"),
                            use_bias=cfg.qkv_bias, std=std, rngs=rngs, **kw)
        self.v_proj = Dense("BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"),
                            use_bias=cfg.qkv_bias, std=std, rngs=rngs, **kw)
        self.o_proj = Dense("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"),
                            use_bias=cfg.o_bias, std=std, rngs=rngs, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, cfg.rms_norm_eps, axes=("head_dim",), rngs=rngs, **kw)
            self.k_norm = RMSNorm(H, cfg.rms_norm_eps, axes=("head_dim",), rngs=rngs, **kw)
        self.qk_norm = cfg.qk_norm
        self.rate = cfg.attention_dropout

    def __call__(self, x, cos, sin, mask, keys: Keys, kv=None, index=None):
        """`mask`: this layer's attention mask (full or sliding window, see `causal.layer_masks`)."""
        q = constrain(self.q_proj(x), ("batch", "length", "heads", "head_dim"))
        k = constrain(self.k_proj(x), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(self.v_proj(x), ("batch", "length", "kv_heads", "head_dim"))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope_lib.apply(q, cos, sin), rope_lib.apply(k, cos, sin)
        if kv is not None:
            k, v = causal.write(kv[0], k, index), causal.write(kv[1], v, index)
        out = attention(q, k, v, mask, dropout_rate=self.rate, dropout_key=keys())
        return self.o_proj(out), (k, v)


class MLP(nnx.Module):
    """`down_proj(act(gate_proj(x)) · up_proj(x))` (SwiGLU for `silu`)."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        kw, std = cfg.options.kw(), cfg.initializer_range
        D, F, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Dense("BTD,DF->BTF", (D, F), ("embed", "mlp"), use_bias=b, std=std, rngs=rngs, **kw)
        self.up_proj = Dense("BTD,DF->BTF", (D, F), ("embed", "mlp"), use_bias=b, std=std, rngs=rngs, **kw)
        self.down_proj = Dense("BTF,FD->BTD", (F, D), ("mlp", "embed"), use_bias=b, std=std, rngs=rngs, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        h = constrain(gated(self.act, self.gate_proj(x), self.up_proj(x)), ("batch", "length", "mlp"))
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        kw = cfg.options.kw()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **kw)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **kw)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, mask, keys: Keys, kv=None, index=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, keys, kv, index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class DecoderModel(nnx.Module):
    """Embeddings, the blocks and the final norm; returns hidden states `[B, T, D]` and per-layer K/V."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        kw = cfg.options.kw()
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range, rngs=rngs, **kw)
        self.layers = make_layers(lambda i: DecoderLayer(cfg, rngs), cfg.num_hidden_layers, cfg.options.scan_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **kw)
        self.rope, self.remat = cfg.rope, cfg.options.remat
        self.windows = tuple(cfg.window(i) for i in range(cfg.num_hidden_layers))

    def __call__(self, input_ids, positions, mask, keys: Keys, cache: causal.KVCache | None = None):
        """`mask`: the call's `attention.Mask` (each block adds its window); → `(h, (keys, values))`, the
        per-layer K/V written to `cache` (empty lists without a cache)."""
        x = residual(self.embed_tokens(input_ids))
        cos, sin = rope_lib.cos_sin(self.rope, positions)
        select, xs = causal.layer_masks(mask, self.windows, self.layers)
        index = None if cache is None else cache.index
        if cache is not None:
            xs = [dict(x_i, kv=kv) for x_i, kv in zip(xs, zip(cache.keys, cache.values))]

        def call(layer, h, i, x_i):
            h, kv = layer(h, cos, sin, select(x_i), keys.layer(i), x_i.get("kv"), index)
            return residual(h), (kv if cache is not None else None)

        x, kvs = run_layers(self.layers, self.remat, x, call, xs)
        return self.norm(x), ([kv[0] for kv in kvs if kv], [kv[1] for kv in kvs if kv])


class LlamaForCausalLM(causal.CausalLM):
    """`logits [B, T, V]` (float32) of the next token at every position (head and decoding: `causal.CausalLM`)."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.model = DecoderModel(cfg, rngs)
        self.init_head(cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings, cfg.initializer_range,
                       cfg.options, rngs)

    def input_embedding(self) -> Embed:
        return self.model.embed_tokens

    def kv_shapes(self) -> list:
        cfg = self.config
        return [((cfg.num_key_value_heads, cfg.head_dim),) * 2] * cfg.num_hidden_layers

    def backbone(self, input_ids, positions, mask, token_mask, keys: Keys, cache=None):
        h, kv = self.model(input_ids, positions, mask, keys, cache)
        return h, kv, None


def name_table(cfg: DecoderConfig, task: str) -> NameTable:
    """HF `*ForCausalLM` names ↔ jaxft paths (the paths mirror the HF module tree). With
    `scan_layers` the layer index leaves the path and becomes the stacked leading axis."""
    H = "model.layers.{i}."
    P = "model.layers." if cfg.options.scan_layers else H
    rules = [Rule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
             Rule("model.norm.weight", "model.norm.scale"),
             Rule(H + "input_layernorm.weight", P + "input_layernorm.scale"),
             Rule(H + "post_attention_layernorm.weight", P + "post_attention_layernorm.scale")]
    for p in ("q_proj", "k_proj", "v_proj"):
        rules.append(Rule(H + f"self_attn.{p}.weight", P + f"self_attn.{p}.kernel", Linear(1)))
        if cfg.qkv_bias:
            rules.append(Rule(H + f"self_attn.{p}.bias", P + f"self_attn.{p}.bias", Flatten()))
    rules.append(Rule(H + "self_attn.o_proj.weight", P + "self_attn.o_proj.kernel", Linear(2)))
    if cfg.o_bias:
        rules.append(Rule(H + "self_attn.o_proj.bias", P + "self_attn.o_proj.bias"))
    if cfg.qk_norm:
        rules += [Rule(H + f"self_attn.{p}.weight", P + f"self_attn.{p}.scale") for p in ("q_norm", "k_norm")]
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(H + f"mlp.{p}.weight", P + f"mlp.{p}.kernel", Linear(1)))
        if cfg.mlp_bias:
            rules.append(Rule(H + f"mlp.{p}.bias", P + f"mlp.{p}.bias"))
    ignore = [r".*rotary_emb\.inv_freq"]
    if cfg.tie_word_embeddings:
        ignore.append(r"lm_head\.weight")  # transformers re-ties it to the embedding on load
    else:
        rules.append(Rule("lm_head.weight", "lm_head.kernel", Linear(1)))
    return NameTable(rules, ignore=ignore)
