"""`RunOptions`: how a model is run, as opposed to what it is.

A family's config (`BertConfig`, `DecoderConfig`, ...) describes the architecture read from the Hugging
Face `config.json`; the options below come from the jaxft run (`model.*` config keys) and are the same
for every family, so they travel as one object into every family's `from_hf` instead of being repeated in
each config and patched in afterwards.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import jax.numpy as jnp


@dataclass(frozen=True)
class RunOptions:
    dtype: str = "float32"          # compute dtype (matmuls, activations)
    param_dtype: str = "float32"    # stored parameters
    remat: str = "none"             # `jaxft.models.layers.REMAT_POLICIES`, per block
    scan_layers: bool = False       # stack the blocks and run them with jax.lax.scan (`layers.run_layers`)
    attention: str = "auto"         # auto | plain | blockwise (`jaxft.models.attention`)
    attention_block: int = 512      # query/key block of blockwise attention
    hidden_dropout: float | None = None     # overrides the checkpoint's hidden dropout (`with_dropout`)
    attention_dropout: float | None = None  # overrides its attention dropout

    def kw(self) -> dict:
        """The `dtype` / `param_dtype` keyword arguments every layer takes."""
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))


# The Hugging Face config fields each dropout override sets, by `model_type` (the names `transformers` reads).
# Llama, Mistral, Qwen and DeepSeek have attention dropout only: `transformers` applies no hidden dropout there.
_DECODER = {"attention": ("attention_dropout",)}
DROPOUT_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {"hidden": ("hidden_dropout_prob",), "attention": ("attention_probs_dropout_prob",)},
    "gpt2": {"hidden": ("resid_pdrop", "embd_pdrop"), "attention": ("attn_pdrop",)},
    **{mt: _DECODER for mt in ("llama", "mistral", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3")},
}


def with_dropout(hf, options: RunOptions):
    """A copy of the `transformers` config `hf` with `options.hidden_dropout` / `attention_dropout` written into
    the family's own dropout fields (`DROPOUT_FIELDS`); `hf` itself when neither is set. The family then reads
    them as it reads any checkpoint's, and an export writes them to `config.json` (as `transformers`'
    `from_pretrained(..., hidden_dropout_prob=x)` then `save_pretrained` does). A family without that kind of
    dropout is an error naming the key: nothing would apply it."""
    wanted = {"hidden": options.hidden_dropout, "attention": options.attention_dropout}
    if all(v is None for v in wanted.values()):
        return hf
    hf = copy.deepcopy(hf)
    fields = DROPOUT_FIELDS.get(hf.model_type, {})
    for kind, value in wanted.items():
        if value is None:
            continue
        if kind not in fields:
            raise ValueError(f"model.{kind}_dropout: {hf.model_type} models have no {kind} dropout in transformers "
                             f"(dropout overrides apply to: "
                             f"{', '.join(f'{k}_dropout' for k in fields) or 'none'})")
        for name in fields[kind]:
            setattr(hf, name, float(value))
    return hf
