"""`RunOptions`: how a model is run, as opposed to what it is.

A family's config (`BertConfig`, `DecoderConfig`, ...) describes the architecture read from the Hugging
Face `config.json`; the options below come from the jaxft run (`model.*` config keys) and are the same
for every family, so they travel as one object into every family's `from_hf` instead of being repeated in
each config and patched in afterwards.
"""

from __future__ import annotations

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

    def kw(self) -> dict:
        """The `dtype` / `param_dtype` keyword arguments every layer takes."""
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
