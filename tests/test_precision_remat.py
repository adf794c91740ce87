"""Mixed precision and rematerialisation.

bfloat16 compute keeps float32 master weights and optimizer state and trains to the float32 loss within
a stated tolerance; rematerialising each block (`model.remat`) changes what the backward pass keeps,
not the gradients (dropout included; equal up to float32 rounding, as recomputed blocks may fuse
differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from causal_helpers import save_hf
from conftest import save_tiny_bert
from jaxft.config import OptimSection
from jaxft.optim import make_optimizer
from jaxft.train.losses import LOSSES
from jaxft.train.step import Functional, init_state, make_train_step
from mesh_helpers import batches
from test_mesh import save_deepseek

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.002 per operation); after the layers'
# sums a loss within 1% of float32 is the expected agreement, and the same trend over the run.
BF16_RTOL = 1e-2


def train(folder, task, dtype, steps=8, remat="none"):
    model = jaxft.load_model(folder, task=task, dtype=dtype, remat=remat)
    fn = Functional(model)
    tx, lr = make_optimizer(OptimSection(lr=3e-3, warmup_steps=1), steps)
    state = init_state(fn, tx, 0)
    step = make_train_step(fn, LOSSES[task], tx, lr)
    losses = []
    data = batches(task, model.hf_config["vocab_size"], 2, 8, 16)   # two batches, seen in turn: it can fit them
    for i in range(steps):
        state, m = step(state, data[i % 2])
        losses.append(float(m["loss"]))
    return state, losses, fn


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf("llama-mha", tmp_path_factory.mktemp("llama"), num_key_value_heads=2, attention_dropout=0.1)


def test_bfloat16_compute_trains_with_float32_state(llama_dir):
    state32, loss32, _ = train(llama_dir, "causal-lm", "float32")
    state16, loss16, fn = train(llama_dir, "causal-lm", "bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(state16["params"])} == {"float32"}
    assert {str(x.dtype) for x in jax.tree.leaves(state16["opt_state"]) if x.ndim} == {"float32"}
    np.testing.assert_allclose(loss16, loss32, rtol=BF16_RTOL)
    assert loss16[-1] < loss16[0] - 0.1                                       # it trains
    # The matmuls really run in bfloat16; the logits reach the loss in float32.
    module = fn.module(state16["params"])
    ids = jnp.ones((2, 8), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda: module(ids))())
    assert "bf16[2,8,4,8]" in jaxpr and module(ids).dtype == jnp.float32


def grads(folder, task, remat, batch):
    model = jaxft.load_model(folder, task=task, remat=remat)
    fn = Functional(model)
    loss = lambda p: LOSSES[task](fn.module(p), batch, jax.random.key(7))[0]   # dropout on, fixed key
    return jax.jit(jax.grad(loss))(fn.params)


@pytest.fixture(scope="module")
def models(llama_dir, tmp_path_factory):
    """`{name: (folder, task, batch, gradients without remat)}` for a tiny Llama and BERT (dropout on) and a
    tiny DeepSeek-V3 (MLA + MoE, whose router bias is a non-trainable `Buffer`)."""
    bert = save_tiny_bert(tmp_path_factory.mktemp("bert"))                  # dropout 0.1 everywhere
    deepseek = save_deepseek(tmp_path_factory.mktemp("deepseek"))
    out = {}
    for name, folder, task in (("llama", llama_dir, "causal-lm"), ("bert", bert, "sequence-classification"),
                               ("deepseek", deepseek, "causal-lm")):
        batch = batches(task, 96, 1, 4, 16, seed=1)[0]
        out[name] = (folder, task, batch, grads(folder, task, "none", batch))
    return out


@pytest.mark.parametrize("name, remat", [("llama", "full"), ("llama", "dots_saveable"),
                                         ("llama", "dots_with_no_batch_dims_saveable"), ("bert", "full"),
                                         ("deepseek", "full")])
def test_remat_leaves_gradients_unchanged(models, name, remat):
    folder, task, batch, ref = models[name]
    got = grads(folder, task, remat, batch)
    for k in ref:
        # recomputed blocks may fuse differently: equal up to float32 rounding, which for sums over many
        # tokens (the embedding gradient of a model with every weight random) is relative to the tensor's
        # scale rather than to each small entry
        scale = float(np.abs(np.asarray(ref[k])).max())
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=max(1e-7, 1e-5 * scale),
                                   err_msg=f"{name} {remat} {k}")


def test_unknown_remat_policy_is_named(llama_dir):
    with pytest.raises(ValueError, match="unknown model.remat='sometimes'"):
        grads(llama_dir, "causal-lm", "sometimes", batches("causal-lm", 96, 1, 2, 8)[0])
