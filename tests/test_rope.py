"""`jaxft.models.rope` against `transformers.modeling_rope_utils`, function by function."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import rope
from causal_helpers import ROPE_VARIANTS, hf_config


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_inv_freq_and_attention_factor(variant):
    """Short calls, and (for dynamic/longrope) calls longer than the switch length."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = hf_config(variant)
    r = rope.rope_from_hf(hf, getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    kind = hf.rope_parameters["rope_type"]
    for length in (100, 700):
        if kind == "default":
            ref, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
        else:
            seq = torch.tensor(length) if kind == "dynamic" and length > hf.max_position_embeddings else None
            seq = length if kind == "longrope" else seq
            ref, factor = ROPE_INIT_FUNCTIONS[kind](hf, seq_len=seq)
        ours = rope.inv_freq(r, jnp.arange(length)[None])
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=2e-7, atol=0)
        assert r.attention_factor == pytest.approx(factor, rel=1e-12)


def test_apply_matches_both_transformers_layouts():
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.RandomState(0)
    q = rng.randn(2, 5, 3, 8).astype(np.float32)                   # B T N d
    r = rope.Rope(rope_type="yarn", theta=100.0, dim=8, factor=4.0, original_max_position_embeddings=16,
                  attention_factor=1.3)
    pos = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = rope.cos_sin(r, jnp.asarray(pos))
    full_cos = torch.tensor(np.concatenate([cos, cos], -1))         # transformers' cat(freqs, freqs)
    full_sin = torch.tensor(np.concatenate([sin, sin], -1))
    qt = torch.tensor(q).transpose(1, 2)                            # B N T d
    for interleaved, fn in ((False, apply_rotary_pos_emb), (True, apply_rotary_pos_emb_interleave)):
        ref, _ = fn(qt, qt, full_cos, full_sin)
        ours = rope.apply(jnp.asarray(q), cos, sin, interleaved=interleaved)
        np.testing.assert_allclose(np.asarray(ours), ref.transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6)


def test_unknown_rope_type_names_the_field():
    hf = hf_config("llama-linear")
    hf.rope_parameters = {"rope_type": "made_up", "rope_theta": 1e4}
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_type='made_up'"):
        rope.rope_from_hf(hf, hf.head_dim)
