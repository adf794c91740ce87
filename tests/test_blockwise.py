"""Blockwise attention and the chunked LM loss compute the plain functions, and with them the train step's
memory grows linearly in the sequence length.

Every family is loaded twice from one tiny random checkpoint: `model.attention=plain` (dense masks) and
`blockwise` with 8-token blocks (so a 40-token row spans 5 query and 5 key blocks and a 16-token sliding
window crosses block edges). The batch holds every mask type at once: a full row, a right-padded row, a
left-padded row (its first queries see no key at all) and a row of three packed documents.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.train.losses import classification_loss, make_causal_lm_loss
from jaxft.train.step import Functional
from causal_helpers import VOCAB, build_hf as build_causal
from conftest import decode, forward, random_batch, save_tiny_bert

TOL = 1e-5
BLOCK = 8
T = 40

CAUSAL = {  # case -> (builder, load options)
    "llama-gqa": (lambda: build_causal("llama-gqa-tied"), {}),
    "mistral-sliding": (lambda: build_causal("mistral-sliding"), {}),
    "qwen2-sliding-scanned": (lambda: build_causal("qwen2-bias-sliding"), {"scan_layers": True}),
    "gpt2": (lambda: build_causal("gpt2"), {}),
    "deepseek-v3-mla": (lambda: _deepseek("v3"), {}),
}

DECODE = ("mistral-sliding", "deepseek-v3-mla")   # cases that also decode with a KV cache (window, MLA latent)


def _deepseek(variant):
    from test_deepseek_parity import build_hf

    return build_hf(variant)


def causal_batch(seed: int = 0) -> dict:
    """Rows: full, right-padded, left-padded, three packed documents (then padding)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (4, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, T - 11:] = 0
    mask[2, :7] = 0
    mask[3, T - 3:] = 0
    seg = mask.copy()
    seg[3, 12:25], seg[3, 25:T - 3] = 2, 3
    loss_mask = mask.copy()
    loss_mask[:, :3] = 0
    return {"input_ids": np.where(mask > 0, ids, 0), "attention_mask": mask, "segment_ids": seg,
            "loss_mask": loss_mask, "weights": np.ones(4, np.float32)}


def load_pair(folder, task, **options):
    plain = jaxft.load_model(folder, task=task, attention="plain", **options)
    block = jaxft.load_model(folder, task=task, attention="blockwise", attention_block=BLOCK, **options)
    return plain, block


def mean_loss_grads(model, loss_fn, batch):
    """`(loss / weight, gradients of it)` for every parameter, keyed by path."""
    fn = Functional(model)

    def f(p):
        s, aux = loss_fn(fn.module(p), batch, None)
        return s / aux["weight"]

    return jax.jit(jax.value_and_grad(f))(fn.params)


def assert_grads_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: float(jnp.abs(a[k] - b[k]).max()))
    d = float(jnp.abs(a[worst] - b[worst]).max())
    print(f"max gradient difference {d:.2e} ({worst})")
    assert d <= TOL, worst


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CAUSAL))
def test_causal_blockwise_and_chunked_loss_equal_plain(case, tmp_path):
    build, options = CAUSAL[case]
    build().save_pretrained(tmp_path)
    plain, block = load_pair(tmp_path, "causal-lm", **options)
    batch = causal_batch()
    kw = dict(attention_mask=batch["attention_mask"], segment_ids=batch["segment_ids"])
    d = float(jnp.abs(forward(plain, batch["input_ids"], **kw) - forward(block, batch["input_ids"], **kw)).max())
    print(f"{case}: logits {d:.2e}")
    assert d <= TOL

    # plain attention + whole-sequence loss vs blockwise attention + a loss in chunks of 3 positions
    # (12 tokens over 4 rows: 14 chunks, the last one padded)
    loss_a, grads_a = mean_loss_grads(plain, make_causal_lm_loss(0.01, chunk_tokens=0), batch)
    loss_b, grads_b = mean_loss_grads(block, make_causal_lm_loss(0.01, chunk_tokens=12), batch)
    assert abs(float(loss_a) - float(loss_b)) <= TOL
    assert_grads_close(grads_a, grads_b)

    if case not in DECODE:
        return
    # cached decoding (left-padded prompt, then one token) goes through the same mask description
    ids, mask = batch["input_ids"][:3], batch["attention_mask"][:3] * (batch["segment_ids"][:3] > 0)
    positions = np.where(mask, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    outs = []
    for model in (plain, block):
        cache = model.init_cache(3, T + 1)
        first, cache = decode(model, ids, positions, mask, cache)
        nxt, _ = decode(model, ids[:, -1:], positions[:, -1:] + 1, np.ones((3, 1), bool), cache)
        outs.append((first, nxt))
    for x, y in zip(*outs):
        assert float(jnp.abs(x - y).max()) <= TOL


@pytest.mark.slow
def test_bert_blockwise_equals_plain(tmp_path):
    save_tiny_bert(tmp_path, random_init=True, max_position_embeddings=T)
    plain, block = load_pair(tmp_path, "sequence-classification")
    ids, mask, types = random_batch(99, batch=3, length=T)
    mask[2, :9] = 0   # a left-padded row too
    d = float(jnp.abs(forward(plain, ids, mask, types) - forward(block, ids, mask, types)).max())
    assert d <= TOL
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
             "labels": np.array([0, 1, 2], np.int32), "weights": np.ones(3, np.float32)}
    (la, ga), (lb, gb) = (mean_loss_grads(m, classification_loss, batch) for m in (plain, block))
    assert abs(float(la) - float(lb)) <= TOL
    assert_grads_close(ga, gb)


def test_attention_key_is_validated():
    from jaxft.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.attention.*'flash'"):
        load_config(None, ["model.name_or_path=x", "model.attention=flash"])
    assert load_config(None, ["model.name_or_path=x"]).model.attention == "auto"


# ---- memory: a small Llama-shaped model, batch 1, default settings (auto attention, chunked loss) ----

MEM_VOCAB = 32000


def llama_step_folder(tmp_path):
    folder = tmp_path / "llama"
    if not folder.exists():
        build_causal("llama-gqa-tied", vocab_size=MEM_VOCAB, hidden_size=64, intermediate_size=128,
                     max_position_embeddings=8192).save_pretrained(folder)
    return folder


def llama_step(tmp_path, length: int, **loss_kw):
    """The compiled train step (AdamW) of a 2-layer Llama (width 64, 4 heads / 2 KV heads, vocab 32k)
    for one row of `length` tokens; compiled from shapes, never run."""
    import optax

    from jaxft.plan import batch_shapes
    from jaxft.train.step import init_state, make_train_step

    fn = Functional(jaxft.load_model(llama_step_folder(tmp_path), task="causal-lm"))
    tx = optax.adamw(1e-4)
    state = init_state(fn, tx, 0)
    step = make_train_step(fn, make_causal_lm_loss(**loss_kw), tx, lambda s: 1e-4)
    return step.lower(state, batch_shapes("causal-lm", 1, length)).compile()


@pytest.mark.slow
def test_train_step_memory_grows_linearly(tmp_path):
    temp = {}
    for length in (1024, 2048, 4096, 8192):
        compiled = llama_step(tmp_path, length)
        temp[length] = compiled.memory_analysis().temp_size_in_bytes
        if length >= 4096:  # chunked loss (default train.loss_chunk_tokens): no [1, T, vocab] float32 logits
            assert not re.search(rf"f32\[1,{length},{MEM_VOCAB}\]", compiled.as_text()), length
    print({t: f"{b / 2**20:.1f} MiB" for t, b in temp.items()})
    assert temp[8192] / temp[4096] <= 2.2, temp


def test_unchunked_loss_holds_full_logits(tmp_path):
    """The HLO check above can see the buffer: without chunking the [1, T, vocab] logits are there."""
    compiled = llama_step(tmp_path, 1024, chunk_tokens=0)
    assert re.search(rf"f32\[1,1024,{MEM_VOCAB}\]", compiled.as_text())


def test_plan_counts_linear_activations(tmp_path):
    """`jaxft plan`'s activation estimate (the backward's residuals, traced) follows the implementation:
    with the defaults it doubles with T (no T² scores, no [T, vocab] logits); forced plain and unchunked it
    grows faster (plain attention keeps no scores for the backward, only its boolean [T, S] mask)."""
    from jaxft.config import load_config
    from jaxft.plan import plan

    llama_step_folder(tmp_path)

    def activations(length, *extra):
        cfg = load_config(None, [f"model.name_or_path={tmp_path / 'llama'}", "model.task=causal-lm",
                                 f"data.max_length={length}", "train.batch_size=1", *extra])
        return plan(cfg, compile=False).per_device["activations"]

    ratio = activations(8192) / activations(4096)
    plain = activations(8192, "model.attention=plain", "train.loss_chunk_tokens=0") / activations(
        4096, "model.attention=plain", "train.loss_chunk_tokens=0")
    print(f"activations 8k/4k: default {ratio:.2f}, plain {plain:.2f}")
    assert ratio <= 2.2 and plain > ratio + 0.05, (ratio, plain)


def test_blockwise_attention_dropout_is_unbiased():
    """With attention dropout, blockwise attention drops probabilities (outputs differ from the undropped
    ones) and is unbiased: the mean over 1024 dropout keys is the undropped output."""
    from jaxft.models.attention import Mask, attention

    r = np.random.RandomState(0)
    q, k, v = (jnp.asarray(r.normal(size=(1, 24, 2, 4)), jnp.float32) for _ in range(3))
    mask = Mask(kv_valid=jnp.asarray(np.arange(24) < 20)[None], causal=False, impl="blockwise", block=BLOCK)
    exact = attention(q, k, v, mask)
    drop = jax.vmap(lambda key: attention(q, k, v, mask, dropout_rate=0.3, dropout_key=key))(
        jax.random.split(jax.random.key(0), 1024))
    assert float(jnp.abs(drop[0] - exact).max()) > 0.1
    assert float(jnp.abs(drop.mean(0) - exact).max()) < 0.05
