"""GPT-2 (`model_type: gpt2`, `GPT2LMHeadModel` in `transformers`).

Pre-LayerNorm blocks with learned absolute positions:

    x = wte[ids] + wpe[positions]
    x = x + c_proj(Attn(c_attn(LN₁(x))))        c_attn: one fused [D, 3·D] projection → q | k | v
    x = x + c_proj(act(c_fc(LN₂(x))))
    logits = LN_f(x) · wteᵀ                     (tied; an untied `lm_head` when `tie_word_embeddings` is false)

HF stores GPT-2's projections as `Conv1D` weights `[in, out]`, so they map onto einsum kernels by
reshaping alone. Positions restart per packed document, like RoPE models, so packing is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from jaxft.hf.table import IDENTITY, Conv1D, Flatten, Linear, NameTable, Rule
from jaxft.models import causal
from jaxft.models.options import RunOptions
from jaxft.models.attention import attention
from jaxft.models.dropout import dropout
from jaxft.models.layers import Dense, Embed, Keys, LayerNorm, activate, activation, make_layers, residual, run_layers


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    n_positions: int
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    options: RunOptions = RunOptions()  # dtype, param_dtype, remat, scan_layers (`jaxft.models.options`)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf, options: RunOptions = RunOptions(), *, num_labels: int | None = None) -> "GPT2Config":
        """Read a `transformers` GPT2Config; raise naming any option that changes the math and we lack."""
        for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if getattr(hf, name, False):
                raise ValueError(f"unsupported GPT-2 config field {name}=True (jaxft supports False)")
        if hf.n_embd % hf.n_head:
            raise ValueError(f"n_embd={hf.n_embd} is not divisible by n_head={hf.n_head}")
        activation(hf.activation_function, "activation_function")
        return cls(
            vocab_size=hf.vocab_size, n_embd=hf.n_embd, n_layer=hf.n_layer, n_head=hf.n_head,
            n_inner=hf.n_inner or 4 * hf.n_embd, n_positions=hf.n_positions,
            activation_function=hf.activation_function, layer_norm_epsilon=hf.layer_norm_epsilon,
            scale_attn_weights=bool(hf.scale_attn_weights), embd_pdrop=hf.embd_pdrop, attn_pdrop=hf.attn_pdrop,
            resid_pdrop=hf.resid_pdrop, tie_word_embeddings=bool(hf.tie_word_embeddings),
            initializer_range=hf.initializer_range, options=options)


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        kw, std = cfg.options.kw(), cfg.initializer_range
        D, N, H = cfg.n_embd, cfg.n_head, cfg.head_dim
        self.c_attn = Dense("BTD,DCNH->BTCNH", (D, 3, N, H), ("embed", "qkv", "heads", "head_dim"),
                            std=std, rngs=rngs, **kw)
        self.c_proj = Dense("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), std=std, rngs=rngs, **kw)
        self.scale = H ** -0.5 if cfg.scale_attn_weights else 1.0
        self.attn_rate, self.rate = cfg.attn_pdrop, cfg.resid_pdrop

    def __call__(self, x, mask, keys: Keys, kv=None, index=None):
        qkv = self.c_attn(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if kv is not None:
            k, v = causal.write(kv[0], k, index), causal.write(kv[1], v, index)
        out = attention(q, k, v, mask, scale=self.scale, dropout_rate=self.attn_rate, dropout_key=keys())
        return dropout(self.c_proj(out), self.rate, keys()), (k, v)


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        kw, std = cfg.options.kw(), cfg.initializer_range
        D, F = cfg.n_embd, cfg.n_inner
        self.c_fc = Dense("BTD,DF->BTF", (D, F), ("embed", "mlp"), std=std, rngs=rngs, **kw)
        self.c_proj = Dense("BTF,FD->BTD", (F, D), ("mlp", "embed"), std=std, rngs=rngs, **kw)
        self.act = activation(cfg.activation_function, "activation_function")
        self.rate = cfg.resid_pdrop

    def __call__(self, x, keys: Keys):
        return dropout(self.c_proj(activate(self.act, self.c_fc(x))), self.rate, keys())


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        kw, D, eps = cfg.options.kw(), cfg.n_embd, cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(D, eps, rngs=rngs, **kw)
        self.attn = GPT2Attention(cfg, rngs)
        self.ln_2 = LayerNorm(D, eps, rngs=rngs, **kw)
        self.mlp = GPT2MLP(cfg, rngs)

    def __call__(self, x, mask, keys: Keys, kv=None, index=None):
        a, kv = self.attn(self.ln_1(x), mask, keys, kv, index)
        x = x + a
        return x + self.mlp(self.ln_2(x), keys), kv


class GPT2Model(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        kw, std = cfg.options.kw(), cfg.initializer_range
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, std=std, rngs=rngs, **kw)
        self.wpe = Embed(cfg.n_positions, cfg.n_embd, axes=("position", "embed"), std=std, rngs=rngs, **kw)
        self.h = make_layers(lambda i: GPT2Block(cfg, rngs), cfg.n_layer, cfg.options.scan_layers)
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, rngs=rngs, **kw)
        self.rate, self.remat = cfg.embd_pdrop, cfg.options.remat

    def __call__(self, input_ids, positions, mask, keys: Keys, cache: causal.KVCache | None = None):
        x = residual(dropout(self.wte(input_ids) + self.wpe(positions), self.rate, keys()))
        index = None if cache is None else cache.index
        xs = None if cache is None else list(zip(cache.keys, cache.values))

        def call(layer, h, i, kv):
            h, kv = layer(h, mask, keys.layer(i), kv, index)
            return residual(h), (kv if cache is not None else None)

        x, kvs = run_layers(self.h, self.remat, x, call, xs)
        return self.ln_f(x), ([kv[0] for kv in kvs if kv], [kv[1] for kv in kvs if kv])


class GPT2LMHeadModel(causal.CausalLM):
    """`logits [B, T, V]` (float32) of the next token at every position (head and decoding: `causal.CausalLM`)."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.config = cfg
        self.transformer = GPT2Model(cfg, rngs)
        self.init_head(cfg.n_embd, cfg.vocab_size, cfg.tie_word_embeddings, cfg.initializer_range, cfg.options,
                       rngs)
        self.max_positions, self.positions_field = cfg.n_positions, "n_positions"

    def input_embedding(self) -> Embed:
        return self.transformer.wte

    def kv_shapes(self) -> list:
        cfg = self.config
        return [((cfg.n_head, cfg.head_dim),) * 2] * cfg.n_layer

    def backbone(self, input_ids, positions, mask, token_mask, keys: Keys, cache=None):
        h, kv = self.transformer(input_ids, positions, mask, keys, cache)
        return h, kv, None


def name_table(cfg: GPT2Config, task: str) -> NameTable:
    """HF `GPT2LMHeadModel` names ↔ jaxft paths (the paths mirror the HF module tree; with `scan_layers`
    the layer index is the stacked leading axis, not part of the path)."""
    H, J = "transformer.h.{i}.", "transformer.h." if cfg.options.scan_layers else "transformer.h.{i}."
    rules = [Rule("transformer.wte.weight", "transformer.wte.embedding"),
             Rule("transformer.wpe.weight", "transformer.wpe.embedding"),
             Rule("transformer.ln_f.weight", "transformer.ln_f.scale"),
             Rule("transformer.ln_f.bias", "transformer.ln_f.bias"),
             Rule(H + "attn.c_attn.weight", J + "attn.c_attn.kernel", Conv1D(1)),
             Rule(H + "attn.c_attn.bias", J + "attn.c_attn.bias", Flatten()),
             Rule(H + "attn.c_proj.weight", J + "attn.c_proj.kernel", Conv1D(2)),
             Rule(H + "attn.c_proj.bias", J + "attn.c_proj.bias"),
             Rule(H + "mlp.c_fc.weight", J + "mlp.c_fc.kernel", IDENTITY),
             Rule(H + "mlp.c_fc.bias", J + "mlp.c_fc.bias"),
             Rule(H + "mlp.c_proj.weight", J + "mlp.c_proj.kernel", IDENTITY),
             Rule(H + "mlp.c_proj.bias", J + "mlp.c_proj.bias")]
    rules += [Rule(H + f"{ln}.{hf}", J + f"{ln}.{jx}") for ln in ("ln_1", "ln_2")
              for hf, jx in (("weight", "scale"), ("bias", "bias"))]
    # Old checkpoints carry the causal-mask buffers `attn.bias` / `attn.masked_bias`; transformers drops them.
    ignore = [r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"]
    if cfg.tie_word_embeddings:
        ignore.append(r"lm_head\.weight")
    else:
        rules.append(Rule("lm_head.weight", "lm_head.kernel", Linear(1)))
    return NameTable(rules, ignore=ignore)
