"""Regularisation and schedule knobs (issue 13 item 4): each changes exactly what it should.

Dropout overrides (`model.hidden_dropout`, `model.attention_dropout`), label smoothing
(`train.label_smoothing`), layer-wise lr decay (`optim.layer_decay`), freezing (`model.freeze_embeddings`,
`model.freeze_layers`), the `cosine_restarts` and `polynomial` schedules, and the refusal to resume a run
with any of them changed.
"""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxft
from conftest import random_batch, save_tiny_bert
from jaxft.config import ConfigError, OptimSection, load_config
from jaxft.optim import make_optimizer, schedule
from jaxft.train.losses import chunked_cross_entropy, make_classification_loss
from test_optim import trained_hf_tensors

# ---------------------------------------------------------------------------------------------- schedules


def hf_reference(name: str, lr: float, warm: int, total: int, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if name == "cosine_restarts":
        sched = transformers.get_cosine_with_hard_restarts_schedule_with_warmup(opt, warm, total,
                                                                                num_cycles=kw["cycles"])
    else:
        sched = transformers.get_polynomial_decay_schedule_with_warmup(opt, warm, total, lr_end=kw["end_lr"],
                                                                       power=kw["power"])
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def formula(name: str, lr: float, warm: int, total: int, **kw) -> list[float]:
    """The schedules as written down (independently of both implementations), in exact rationals where
    a cycle restarts."""
    out = []
    for k in range(total):
        if k < warm:
            out.append(lr * k / warm)
            continue
        progress = (k - warm) / (total - warm)
        if name == "cosine_restarts":
            cycle = ((k - warm) * kw["cycles"] % (total - warm)) / (total - warm)
            out.append(lr * 0.5 * (1 + math.cos(math.pi * cycle)))
        else:
            out.append((lr - kw["end_lr"]) * (1 - progress) ** kw["power"] + kw["end_lr"])
    return out


@pytest.mark.parametrize("name,kw", [("cosine_restarts", dict(cycles=1)), ("cosine_restarts", dict(cycles=3)),
                                     ("polynomial", dict(power=1.0, end_lr=0.0)),
                                     ("polynomial", dict(power=2.0, end_lr=1e-4))])
@pytest.mark.parametrize("warm", [0, 6])
def test_schedules_match_formula_and_transformers(name, kw, warm):
    lr, total = 1e-3, 48
    ours = schedule(OptimSection(lr=lr, schedule=name, warmup_steps=warm, **kw), total)
    got = np.asarray(jax.jit(jax.vmap(ours))(jnp.arange(total)), np.float64)
    np.testing.assert_allclose(got, formula(name, lr, warm, total, **kw), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(got, hf_reference(name, lr, warm, total, **kw), rtol=1e-5, atol=1e-10)
    if name == "cosine_restarts" and kw["cycles"] == 3:  # three restarts back to lr after the warmup
        span = (total - warm) // 3
        assert [got[warm + i * span] for i in range(3)] == pytest.approx([lr] * 3, rel=1e-6)


def test_schedule_keys_are_checked():
    with pytest.raises(ConfigError, match="optim.cycles applies to optim.schedule=cosine_restarts"):
        load_config(base={"model": {"name_or_path": "x"}, "optim": {"cycles": 2}})
    with pytest.raises(ConfigError, match="optim.power applies to optim.schedule=polynomial"):
        load_config(base={"model": {"name_or_path": "x"}, "optim": {"schedule": "cosine", "power": 2}})
    with pytest.raises(ConfigError, match="optim.end_lr=0.1 must be below optim.lr"):
        load_config(base={"model": {"name_or_path": "x"}, "optim": {"schedule": "polynomial", "end_lr": 0.1}})
    with pytest.raises(ConfigError, match="train.label_smoothing applies to train.objective=supervised"):
        load_config(base={"model": {"name_or_path": "x", "task": "causal-lm"},
                          "train": {"objective": "dpo", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="train.label_smoothing is not applied by multi-task runs"):
        load_config(base={"model": {"name_or_path": "x"}, "tasks": [{"name": "a", "train": "a.tsv"}],
                          "train": {"label_smoothing": 0.1}})


# ---------------------------------------------------------------------------------------------- label smoothing


def reference_smoothed(logits: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    """(1 − ε)·CE + ε·mean_c(−log p_c) per row, in float64."""
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[:, None], -1)[:, 0]
    return (1 - eps) * nll + eps * (-logp.mean(-1))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_classification_equals_formula_and_torch(eps):
    rng = np.random.RandomState(0)
    logits = (3 * rng.randn(6, 5)).astype(np.float32)
    labels = rng.randint(0, 5, 6).astype(np.int32)
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # a padding row counts nothing
    batch = dict(input_ids=np.zeros((6, 4), np.int32), attention_mask=np.ones((6, 4), np.int32),
                 token_type_ids=np.zeros((6, 4), np.int32), labels=labels, weights=weights)
    model = lambda *a, **k: jnp.asarray(logits)  # noqa: E731  (the loss sees only the logits)
    loss_sum, aux = jax.jit(lambda b: make_classification_loss(eps)(model, b, None))(batch)
    mean = float(loss_sum / aux["weight"])
    assert mean == pytest.approx(reference_smoothed(logits, labels, eps)[:5].mean(), rel=1e-6)
    torch_ce = torch.nn.functional.cross_entropy(torch.tensor(logits[:5]), torch.tensor(labels[:5]).long(),
                                                 label_smoothing=eps)
    assert mean == pytest.approx(float(torch_ce), rel=1e-6)
    plain = float(torch.nn.functional.cross_entropy(torch.tensor(logits[:5]), torch.tensor(labels[:5]).long()))
    assert (mean != pytest.approx(plain, rel=1e-3)) == (eps > 0)  # smoothing changes the loss, 0 does not


class _Head:
    """A causal LM's head alone: `logits(h) = h · W`."""

    def __init__(self, w):
        self.w = w

    def logits(self, h):
        return h @ self.w


@pytest.mark.parametrize("chunk", [0, 6])  # all at once, and chunks of 6 tokens (a scan over positions)
def test_label_smoothing_causal_lm_over_the_vocabulary(chunk):
    rng = np.random.RandomState(1)
    B, T, D, V, eps = 2, 7, 8, 13, 0.2
    h = rng.randn(B, T, D).astype(np.float32)
    w = rng.randn(D, V).astype(np.float32)
    targets = rng.randint(0, V, (B, T)).astype(np.int32)
    weights = (rng.rand(B, T) > 0.3).astype(np.float32)
    total = float(jax.jit(lambda h: chunked_cross_entropy(_Head(jnp.asarray(w)), h, jnp.asarray(targets),
                                                          jnp.asarray(weights), chunk, eps))(h))
    logits = (h.reshape(-1, D) @ w)
    keep = weights.reshape(-1) > 0
    expect = reference_smoothed(logits, targets.reshape(-1), eps)[keep].sum()
    assert total == pytest.approx(expect, rel=1e-5)
    torch_sum = torch.nn.functional.cross_entropy(torch.tensor(logits[keep]), torch.tensor(targets.reshape(-1)[keep]).long(),
                                                  label_smoothing=eps, reduction="sum")
    assert total == pytest.approx(float(torch_sum), rel=1e-5)


# ---------------------------------------------------------------------------------------------- dropout overrides


def _forward_pair(model, task, seed=0):
    """(training-mode logits with a dropout key, evaluation logits) of one batch, in one compiled program."""
    ids, mask, types = random_batch(90, batch=3, length=12, seed=seed)
    kw = dict(attention_mask=mask, token_type_ids=types) if task == "sequence-classification" else \
        dict(attention_mask=mask)
    train, evaluate = jax.jit(lambda key: (model(ids, dropout_rng=key, **kw), model(ids, **kw)))(jax.random.key(1))
    return np.asarray(train), np.asarray(evaluate)


def test_dropout_overrides_reach_every_dropout_of_bert(tmp_path):
    """The checkpoint has hidden and attention dropout 0.1. Both overridden to 0: a training-mode forward
    is the evaluation forward exactly, so no dropout site kept the checkpoint's rate. Either one alone
    back on changes it. An export records the override in config.json."""
    folder = save_tiny_bert(tmp_path / "bert", random_init=True)  # hidden_dropout_prob = attention_probs = 0.1
    task = "sequence-classification"
    c = jaxft.load_model(folder, task=task).config  # no override: the checkpoint's rates
    assert (c.hidden_dropout_prob, c.attention_probs_dropout_prob) == (0.1, 0.1)
    cases = {(0.0, 0.0): False, (0.3, 0.0): True, (0.0, 0.3): True}
    for (hidden, attn), differs in cases.items():
        model = jaxft.load_model(folder, task=task, hidden_dropout=hidden, attention_dropout=attn)
        c = model.config
        assert (c.hidden_dropout_prob, c.attention_probs_dropout_prob) == (hidden, attn)
        train, evaluate = _forward_pair(model, task)
        assert (not np.array_equal(train, evaluate)) == differs, (hidden, attn)
    jaxft.save_pretrained(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["hidden_dropout_prob"], saved["attention_probs_dropout_prob"]) == (0.0, 0.3)


def test_dropout_overrides_gpt2_and_llama(tmp_path):
    from causal_helpers import save_hf

    gpt2 = save_hf("gpt2", tmp_path / "gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = jaxft.load_model(gpt2, hidden_dropout=0.0, attention_dropout=0.0)
    c = model.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0)
    train, evaluate = _forward_pair(model, "causal-lm")
    assert np.array_equal(train, evaluate)
    model = jaxft.load_model(gpt2, hidden_dropout=0.25, attention_dropout=0.0)
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.25, 0.25, 0.0)

    llama = save_hf("llama-gqa-tied", tmp_path / "llama")  # attention_dropout 0.0 in the checkpoint
    train, evaluate = _forward_pair(jaxft.load_model(llama), "causal-lm")
    assert np.array_equal(train, evaluate)
    model = jaxft.load_model(llama, attention_dropout=0.2)
    assert model.config.attention_dropout == 0.2
    train, evaluate = _forward_pair(model, "causal-lm")
    assert not np.array_equal(train, evaluate)
    with pytest.raises(ValueError, match="model.hidden_dropout: llama models have no hidden dropout"):
        jaxft.load_model(llama, hidden_dropout=0.1)


# ---------------------------------------------------------------------------------------------- layer-wise lr decay


def _hf_depth(name: str, L: int) -> int:
    """Depth from the Hugging Face tensor name alone: 0 embeddings, 1 + i block i, L + 1 the rest."""
    m = re.search(r"(?:encoder\.layer|model\.layers)\.(\d+)\.", name)
    if m:
        return 1 + int(m.group(1))
    return 0 if ("embeddings." in name or "embed_tokens" in name) else L + 1


def _one_update(fn, cfg: OptimSection, layers, grads):
    tx, _ = make_optimizer(cfg, 10, layers)
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, fn.params)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_layer_decay_scales_each_layer_update(tmp_path, family):
    """One AdamW update (weight decay on) with `optim.layer_decay` = d, divided by the same update without
    it, is d^(L + 1 − depth) for every tensor, by its Hugging Face name (so per slice of a scanned stack):
    the head 1, block i d^(L − i), the embeddings d^(L + 1). Looped and scanned layers alike."""
    from causal_helpers import save_hf
    from jaxft.layerwise import LayerMap
    from jaxft.train.step import Functional

    L, d = 3, 0.5
    if family == "bert":
        folder, task = save_tiny_bert(tmp_path / "hf", num_hidden_layers=L, random_init=True), "sequence-classification"
    else:
        folder, task = save_hf("llama-gqa-tied", tmp_path / "hf", num_hidden_layers=L), "causal-lm"
    for scan in (False, True):
        model = jaxft.load_model(folder, task=task, scan_layers=scan)
        fn = Functional(model)
        layers = LayerMap.of({k: v.shape for k, v in fn.params.items()})
        assert layers.num_layers == L
        rng = np.random.RandomState(0)
        grads = {k: jnp.asarray(rng.randn(*v.shape).astype(np.float32)) for k, v in fn.params.items()}
        base = OptimSection(lr=0.1, weight_decay=0.3, schedule="constant", warmup_steps=0)
        decayed = _one_update(fn, base.model_copy(update={"layer_decay": d}), layers, grads)
        plain = _one_update(fn, base, layers, grads)
        a = trained_hf_tensors(fn, decayed, model, tmp_path / f"a{scan}")
        b = trained_hf_tensors(fn, plain, model, tmp_path / f"b{scan}")
        depths = set()
        for name in a:
            depth = _hf_depth(name, L)
            depths.add(depth)
            np.testing.assert_allclose(a[name] / b[name], d ** (L + 1 - depth), rtol=1e-5,
                                       err_msg=f"{name} (scan_layers={scan})")
        assert depths == set(range(L + 2))  # (the tied Llama's head is its final norm)


# ---------------------------------------------------------------------------------------------- freezing


def _run_cfg(folder, scan, **model):
    return load_config(base={"model": {"name_or_path": str(folder), "scan_layers": scan, **model},
                             "optim": {"lr": 1e-2, "weight_decay": 0.5, "clip_norm": 0.05, "schedule": "constant",
                                       "layer_decay": 0.9}})


@pytest.mark.slow  # ~40 s alone: two compiled BERT train steps and four exports
def test_frozen_embeddings_and_layers_stay_bitwise_unchanged(tmp_path):
    """`model.freeze_embeddings` and `model.freeze_layers: 2` of a 3-block BERT, 3 steps of AdamW with weight
    decay, clipping that binds, dropout and layer decay: the embeddings and blocks 0-1 come out bit for bit
    (a −0.0 in a frozen bias included), every other tensor moves. Looped: the frozen tensors are not
    trainable (no gradient, no optimizer state). Scanned: the stacks keep slices 0-1 by a mask and their
    Adam moments stay 0; the losses equal the looped run's (the clip sees only trainable gradients)."""
    from jaxft.train.losses import classification_loss
    from jaxft.train.model import with_adapters
    from jaxft.train.step import Functional, init_state, make_train_step

    folder = save_tiny_bert(tmp_path / "hf", num_hidden_layers=3, random_init=True)
    st = load_file(str(folder / "model.safetensors"))
    st["bert.encoder.layer.0.attention.output.dense.bias"][0] = -0.0
    from safetensors.numpy import save_file
    save_file(st, str(folder / "model.safetensors"), metadata={"format": "pt"})
    source = load_file(str(folder / "model.safetensors"))
    batches = []
    for s in range(3):
        ids, mask, types = random_batch(99, batch=4, seed=s)
        batches.append(dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                            labels=np.array([0, 1, 2, 1], np.int32), weights=np.ones(4, np.float32)))
    frozen = lambda n: n.startswith("bert.embeddings.") or re.match(r"bert\.encoder\.layer\.[01]\.", n)  # noqa: E731
    losses = {}
    for scan in (False, True):
        cfg = _run_cfg(folder, scan, freeze_embeddings=True, freeze_layers=2)
        model = jaxft.load_model(folder, task="sequence-classification", scan_layers=scan)
        run = with_adapters(model, cfg)
        fn = Functional(run.model, run.trainable)
        masks = run.slice_masks(fn.params)
        if scan:
            assert masks and all(m.shape[0] == 3 and m[:2].all() and not m[2:].any() for m in masks.values())
            assert not any(k.startswith("bert.embeddings.") for k in fn.params)
        else:
            assert masks == {}
            assert not any(k.startswith("bert.embeddings.") or re.match(r"bert\.layers\.[01]\.", k)
                           for k in fn.params)
            assert any(k.startswith("bert.layers.2.") for k in fn.params)
        tx, lr = make_optimizer(cfg.optim, 3, run.layers, masks)
        step = make_train_step(fn, classification_loss, tx, lr)
        state = init_state(fn, tx, seed=0)
        losses[scan] = []
        for b in batches:
            state, m = step(state, b)
            losses[scan].append(float(m["loss"]))
        adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState)]
        assert len(adam) == 1 and sorted(adam[0].mu) == sorted(fn.params)  # optimizer state only for what trains
        for k, mask in masks.items():
            for moment in (adam[0].mu[k], adam[0].nu[k]):
                held = np.asarray(moment)[mask.reshape(mask.shape[0])]
                assert held.size and not held.any(), k
        after = trained_hf_tensors(fn, state["params"], model, tmp_path / f"out{scan}")
        assert sorted(after) == sorted(source)
        for name, value in after.items():
            if frozen(name):
                assert value.tobytes() == source[name].tobytes(), f"{name} changed (scan_layers={scan})"
            else:
                assert not np.array_equal(value, source[name]), f"{name} did not train (scan_layers={scan})"
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_freeze_layers_beyond_the_model_is_refused(tmp_path):
    from jaxft.train.model import with_adapters

    folder = save_tiny_bert(tmp_path / "hf")
    model = jaxft.load_model(folder, task="sequence-classification")
    with pytest.raises(ConfigError, match="model.freeze_layers=3: the model has 2 layers"):
        with_adapters(model, _run_cfg(folder, False, freeze_layers=3))


# ---------------------------------------------------------------------------------------------- resume


NEW_KEYS = {"model.hidden_dropout": 0.2, "model.attention_dropout": 0.2, "model.freeze_embeddings": True,
            "model.freeze_layers": 1, "train.label_smoothing": 0.1, "optim.layer_decay": 0.8,
            "optim.schedule": "polynomial", "optim.power": 2.0, "optim.end_lr": 1e-7}


def test_every_new_key_is_refused_on_resume():
    from jaxft.train.faults import config_changes

    saved = load_config(base={"model": {"name_or_path": "x"}}).to_dict()
    for key, value in NEW_KEYS.items():
        extra = ["optim.schedule=polynomial"] if key.startswith("optim.") and key != "optim.layer_decay" else []
        now = load_config(base={"model": {"name_or_path": "x"}}, overrides=extra + [f"{key}={value}"]).to_dict()
        assert any(c.startswith(f"{key}:") for c in config_changes(saved, now)), key
    restarts = load_config(base={"model": {"name_or_path": "x"}, "optim": {"schedule": "cosine_restarts"}})
    more = restarts.model_copy(deep=True)
    more.optim.cycles = 3
    assert config_changes(restarts.to_dict(), more.to_dict()) == ["optim.cycles: 1 → 3"]


@pytest.mark.slow  # ~40 s: a CLI run, an export and a refused resume
def test_knobs_through_the_cli(tmp_path, minilm_dir):
    """A scanned tiny BERT trained by `jaxft train` with every knob on: the export's config.json records the
    dropout overrides, its embeddings and first block are the source's bit for bit, the later blocks moved;
    the logged lr follows cosine with 2 restarts; the eval loss is the plain CE of the exported model in
    PyTorch, not the smoothed one; resuming with a changed optim.layer_decay is refused."""
    from jaxft.cli import main

    folder = save_tiny_bert(tmp_path / "tiny", vocab_size=30522, num_labels=2, tokenizer_from=minilm_dir,
                            random_init=True)
    rows = [f"{'good' if i % 2 else 'bad'} film number {i}\t{'pos' if i % 2 else 'neg'}" for i in range(64)]
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    val = [(f"{'great' if i % 3 else 'awful'} plot {i}", "pos" if i % 3 else "neg") for i in range(100, 116)]
    (tmp_path / "val.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in val))
    args = [f"model.name_or_path={folder}", f"data.train={tmp_path / 'train.tsv'}", "data.max_length=16",
            f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=8", "train.steps=8", "train.log_every=1",
            f"output_dir={tmp_path / 'run'}", "model.scan_layers=true", "model.freeze_embeddings=true",
            "model.freeze_layers=1", "model.hidden_dropout=0.2", "model.attention_dropout=0.0",
            "optim.layer_decay=0.8", "train.label_smoothing=0.1", "optim.schedule=cosine_restarts",
            "optim.cycles=2", "optim.lr=1e-3", "optim.weight_decay=0.1", f"data.validation={tmp_path / 'val.tsv'}"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name_or_path: x}\n")
    assert main(["train", str(cfg), *args]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["split"] == "train"]
    expect = formula("cosine_restarts", 1e-3, 0, 8, cycles=2)
    np.testing.assert_allclose(lrs, expect, rtol=5e-3)  # metrics.jsonl keeps 3 significant digits
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["hidden_dropout_prob"], saved["attention_probs_dropout_prob"]) == (0.2, 0.0)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    enc = tok([t for t, _ in val], max_length=16, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"))(**enc).logits
    labels = torch.tensor([saved["label2id"][y] for _, y in val])
    plain = float(torch.nn.functional.cross_entropy(logits, labels))
    smoothed = float(torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    eval_loss = [r for r in rows if r["split"] == "eval"][-1]["loss"]
    assert eval_loss == pytest.approx(plain, rel=5e-3) and abs(plain - smoothed) > 0.01 * plain
    source, after = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, value in after.items():
        if name.startswith("bert.embeddings.") or name.startswith("bert.encoder.layer.0."):
            assert value.tobytes() == source[name].tobytes(), name
        elif name.startswith("bert.encoder.layer.1."):
            assert not np.array_equal(value, source[name]), name
    assert main(["train", str(cfg), *args, "train.steps=10", "optim.layer_decay=0.7"]) == 2
