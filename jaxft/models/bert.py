"""BERT encoders (`model_type: bert`) with the Hugging Face sequence-classification head.

Math as in `transformers`' `BertForSequenceClassification`: post-LayerNorm blocks, absolute position
and token-type embeddings, exact-erf GELU, pooled output `tanh(W·h[CLS] + b)`, dropout, linear classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from jaxft.hf.table import Flatten, Linear, NameTable, Rule
from jaxft.models.options import RunOptions
from jaxft.models.attention import Mask, attention
from jaxft.models.dropout import dropout
from jaxft.models.layers import Dense, Embed, Keys, LayerNorm, activate, activation, make_layers, residual, run_layers


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    classifier_dropout: float | None = None
    num_labels: int = 2
    options: RunOptions = RunOptions()  # dtype, param_dtype, remat, scan_layers (`jaxft.models.options`)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf, options: RunOptions = RunOptions(), *, num_labels: int | None = None) -> "BertConfig":
        """Read a `transformers` BertConfig; raise on any option that changes the math and we lack."""
        unsupported = {
            "position_embedding_type": ("absolute", None),
            "is_decoder": (False, None),
            "add_cross_attention": (False, None),
        }
        for name, ok in unsupported.items():
            value = getattr(hf, name, None)
            if value not in ok:
                raise ValueError(f"unsupported BERT config field {name}={value!r} (jaxft supports {ok[0]!r})")
        if hf.hidden_size % hf.num_attention_heads:
            raise ValueError(f"hidden_size={hf.hidden_size} is not divisible by "
                             f"num_attention_heads={hf.num_attention_heads}")
        activation(hf.hidden_act)  # raises naming the field if unsupported
        return cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
            hidden_act=hf.hidden_act, hidden_dropout_prob=hf.hidden_dropout_prob,
            attention_probs_dropout_prob=hf.attention_probs_dropout_prob,
            max_position_embeddings=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
            layer_norm_eps=hf.layer_norm_eps, initializer_range=hf.initializer_range,
            classifier_dropout=getattr(hf, "classifier_dropout", None), num_labels=num_labels,
            options=options)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        kw, std = cfg.options.kw(), cfg.initializer_range
        self.word = Embed(cfg.vocab_size, cfg.hidden_size, std=std, rngs=rngs, **kw)
        self.position = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=("position", "embed"),
                              std=std, rngs=rngs, **kw)
        self.token_type = Embed(cfg.type_vocab_size, cfg.hidden_size, axes=("token_type", "embed"),
                                std=std, rngs=rngs, **kw)
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, **kw)
        self.rate = cfg.hidden_dropout_prob

    def __call__(self, input_ids, token_type_ids, keys: Keys):
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)
        return dropout(self.norm(x), self.rate, keys())


class BertLayer(nnx.Module):
    """Post-LN block: `x = LN(x + Attn(x)); x = LN(x + W2·act(W1·x))`."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        kw, std = cfg.options.kw(), cfg.initializer_range
        D, N, H, F = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        qkv = lambda: Dense("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), std=std,
                            rngs=rngs, **kw)
        self.query, self.key, self.value = qkv(), qkv(), qkv()
        self.attn_out = Dense("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), std=std,
                              rngs=rngs, **kw)
        self.attn_norm = LayerNorm(D, cfg.layer_norm_eps, rngs=rngs, **kw)
        self.mlp_in = Dense("BTD,DF->BTF", (D, F), ("embed", "mlp"), std=std, rngs=rngs, **kw)
        self.mlp_out = Dense("BTF,FD->BTD", (F, D), ("mlp", "embed"), std=std, rngs=rngs, **kw)
        self.mlp_norm = LayerNorm(D, cfg.layer_norm_eps, rngs=rngs, **kw)
        self.act = activation(cfg.hidden_act)
        self.rate, self.attn_rate = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob

    def __call__(self, x, mask, keys: Keys):
        a = attention(self.query(x), self.key(x), self.value(x), mask,
                      dropout_rate=self.attn_rate, dropout_key=keys())
        x = self.attn_norm(x + dropout(self.attn_out(a), self.rate, keys()))
        h = self.mlp_out(activate(self.act, self.mlp_in(x)))
        return self.mlp_norm(x + dropout(h, self.rate, keys()))


class BertModel(nnx.Module):
    """Encoder plus pooler; returns `(hidden [B, T, D], pooled [B, D])`."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(cfg, rngs)
        self.layers = make_layers(lambda i: BertLayer(cfg, rngs), cfg.num_hidden_layers, cfg.options.scan_layers)
        D = cfg.hidden_size
        self.pooler = Dense("BD,DE->BE", (D, D), ("embed", "mlp"), std=cfg.initializer_range,
                            rngs=rngs, **cfg.options.kw())
        self.remat, self.options = cfg.options.remat, cfg.options

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, keys: Keys | None = None):
        keys = keys or Keys(None)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = residual(self.embeddings(input_ids, token_type_ids, keys))
        # bidirectional: every real token of the row, whatever the padding side
        mask = Mask(kv_valid=attention_mask.astype(bool), causal=False, impl=self.options.attention,
                    block=self.options.attention_block)
        x, _ = run_layers(self.layers, self.remat, x,
                          lambda layer, h, i, _: (residual(layer(h, mask, keys.layer(i))), None))
        return x, jnp.tanh(self.pooler(x[:, 0]))


class BertForSequenceClassification(nnx.Module):
    """`logits [B, num_labels] = W·dropout(pooled) + b`."""

    task = "sequence-classification"

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.bert = BertModel(cfg, rngs)
        self.classifier = Dense("BD,DC->BC", (cfg.hidden_size, cfg.num_labels), ("embed", "classes"),
                                std=cfg.initializer_range, rngs=rngs, **cfg.options.kw())
        rate = cfg.classifier_dropout
        self.rate = cfg.hidden_dropout_prob if rate is None else rate

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_rng=None):
        keys = Keys(dropout_rng)
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, keys)
        return self.classifier(dropout(pooled, self.rate, keys())).astype(jnp.float32)


def name_table(cfg: BertConfig, task: str) -> NameTable:
    """HF `BertForSequenceClassification` names ↔ jaxft paths (with `scan_layers` the layer index is the
    stacked leading axis, not part of the path)."""
    L = "bert.encoder.layer.{i}."
    J = "bert.layers." if cfg.options.scan_layers else "bert.layers.{i}."
    rules = [
        Rule("bert.embeddings.word_embeddings.weight", "bert.embeddings.word.embedding"),
        Rule("bert.embeddings.position_embeddings.weight", "bert.embeddings.position.embedding"),
        Rule("bert.embeddings.token_type_embeddings.weight", "bert.embeddings.token_type.embedding"),
        Rule("bert.embeddings.LayerNorm.weight", "bert.embeddings.norm.scale"),
        Rule("bert.embeddings.LayerNorm.bias", "bert.embeddings.norm.bias"),
    ]
    for hf, jx in [("attention.self.query", "query"), ("attention.self.key", "key"),
                   ("attention.self.value", "value")]:
        rules += [Rule(L + hf + ".weight", J + jx + ".kernel", Linear(1)),
                  Rule(L + hf + ".bias", J + jx + ".bias", Flatten())]
    rules += [
        Rule(L + "attention.output.dense.weight", J + "attn_out.kernel", Linear(2)),
        Rule(L + "attention.output.dense.bias", J + "attn_out.bias"),
        Rule(L + "attention.output.LayerNorm.weight", J + "attn_norm.scale"),
        Rule(L + "attention.output.LayerNorm.bias", J + "attn_norm.bias"),
        Rule(L + "intermediate.dense.weight", J + "mlp_in.kernel", Linear(1)),
        Rule(L + "intermediate.dense.bias", J + "mlp_in.bias"),
        Rule(L + "output.dense.weight", J + "mlp_out.kernel", Linear(1)),
        Rule(L + "output.dense.bias", J + "mlp_out.bias"),
        Rule(L + "output.LayerNorm.weight", J + "mlp_norm.scale"),
        Rule(L + "output.LayerNorm.bias", J + "mlp_norm.bias"),
        # HF initialises a missing pooler/classifier (a new head) with N(0, initializer_range²) and 0.
        Rule("bert.pooler.dense.weight", "bert.pooler.kernel", Linear(1), init="normal"),
        Rule("bert.pooler.dense.bias", "bert.pooler.bias", init="zeros"),
    ]
    if task == "sequence-classification":
        rules += [Rule("classifier.weight", "classifier.kernel", Linear(1), init="normal"),
                  Rule("classifier.bias", "classifier.bias", init="zeros")]
    return NameTable(rules, ignore=[r"(bert\.)?embeddings\.position_ids"])
