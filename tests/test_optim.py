"""The optimiser recipe against PyTorch: schedules value by value, and whole training trajectories."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

import jaxft
from conftest import random_batch, save_tiny_bert
from jaxft.config import OptimSection
from jaxft.optim import decay_mask, make_optimizer, schedule
from jaxft.train.losses import classification_loss
from jaxft.train.step import Functional, init_state, make_train_step

HF_SCHEDULES = {"linear": transformers.get_linear_schedule_with_warmup,
                "cosine": transformers.get_cosine_schedule_with_warmup,
                "constant": lambda opt, warm, total: transformers.get_constant_schedule_with_warmup(opt, warm)}


@pytest.mark.parametrize("name", HF_SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedules_match_transformers(name, warmup):
    total = 50
    ours = schedule(OptimSection(lr=1e-3, schedule=name, warmup_steps=warmup), total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = HF_SCHEDULES[name](opt, warmup, total)
    for step in range(total):
        np.testing.assert_allclose(float(ours(step)), opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-10)
        opt.step()
        ref.step()


def test_warmup_ratio_rounds_like_steps():
    assert float(schedule(OptimSection(lr=1.0, warmup_ratio=0.1), 100)(5)) == pytest.approx(0.5)


def test_decay_mask_spares_biases_and_norms():
    mask = decay_mask({"a.query.kernel": 0, "a.query.bias": 0, "a.norm.scale": 0, "word.embedding": 0})
    assert mask == {"a.query.kernel": True, "a.query.bias": False, "a.norm.scale": False,
                    "word.embedding": True}


def _family_folder(family, folder):
    from causal_helpers import save_hf
    from test_mesh import save_deepseek

    if family == "bert":
        return save_tiny_bert(folder), "sequence-classification"
    if family == "deepseek":
        return save_deepseek(folder), "causal-lm"   # MLA (q_a / kv_a norms) and MoE (router, experts)
    return save_hf(family, folder), "causal-lm"


@pytest.mark.parametrize("family", ["bert", "gpt2", "qwen2-bias-sliding", "qwen3-qk-norm", "deepseek"])
def test_weight_decay_reaches_every_matrix_and_no_bias_or_norm(tmp_path, family):
    """One AdamW update with zero gradients is the decay alone: p ← p·(1 − lr·wd). Exported to HF names,
    every tensor PyTorch holds as a weight of a non-norm module (Linear, Conv1D, Embedding, experts) must
    have shrunk exactly so, and every bias, norm scale (LayerNorm, RMSNorm, MLA's q_a/kv_a norms, Qwen3's
    q/k norms) and buffer (the MoE router's score-correction bias) must be bit-identical; looped and
    scanned layers alike."""
    import jax
    import optax
    from safetensors.numpy import load_file

    folder, task = _family_folder(family, tmp_path / "hf")
    source = load_file(str(folder / "model.safetensors"))
    auto = (transformers.AutoModelForSequenceClassification if task == "sequence-classification"
            else transformers.AutoModelForCausalLM)
    torch_model = auto.from_pretrained(str(folder))
    no_decay = {name: True for name, _ in torch_model.named_buffers()}
    for mname, module in torch_model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            no_decay[f"{mname}.{pname}"] = pname.endswith("bias") or "Norm" in type(module).__name__
    assert any(no_decay.values()) and not all(no_decay.values())

    def spared(name):
        # DeepSeek: PyTorch holds the experts fused, save_pretrained writes them one by one
        fused = re.sub(r"experts\.\d+\.(gate|up)_proj\.weight$", "experts.gate_up_proj", name)
        return no_decay[re.sub(r"experts\.\d+\.down_proj\.weight$", "experts.down_proj", fused)]
    lr, wd = 0.1, 0.5
    for scan in (False, True):
        model = jaxft.load_model(folder, task=task, scan_layers=scan)
        fn = Functional(model)
        tx, _ = make_optimizer(OptimSection(lr=lr, weight_decay=wd, schedule="constant", warmup_steps=0), 10)
        state = init_state(fn, tx, seed=0)
        @jax.jit  # one program: op-by-op dispatch of the optimizer over every tensor took minutes
        def decay_only(params, opt_state):
            updates, _ = tx.update(jax.tree.map(jax.numpy.zeros_like, params), opt_state, params)
            return optax.apply_updates(params, updates)
        after = trained_hf_tensors(fn, decay_only(state["params"], state["opt_state"]), model,
                                   tmp_path / f"out{scan}")
        assert sorted(after) == sorted(source)
        for name, a in after.items():
            if spared(name):
                assert a.tobytes() == source[name].tobytes(), f"{name} decayed (scan_layers={scan})"
            else:
                np.testing.assert_allclose(a, source[name] * (1 - lr * wd), rtol=1e-6, atol=1e-9,
                                           err_msg=f"{name} not decayed (scan_layers={scan})")


def trained_hf_tensors(fn, params, model, out) -> dict[str, np.ndarray]:
    """`params` (a train state's, or anything shaped like them: gradients) under the HF names, through
    an export of the module holding them."""
    from safetensors.numpy import load_file

    trained = fn.module(params)
    trained.hf_config, trained.source_dir = model.hf_config, model.source_dir
    jaxft.save_pretrained(trained, out)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


# BERT's key biases add the same q·b to every key of a query, which softmax ignores: their gradient is
# rounding noise, which Adam turns into lr-sized steps in arbitrary directions. They are left out of
# parameter comparisons after training.
NOISE_ONLY = ".attention.self.key.bias"


def test_training_trajectory_matches_pytorch(tmp_path):
    """12 steps of clip + AdamW(decoupled, masked decay) + warmup-cosine on a BERT with every parameter
    random: loss and pre-clipping gradient norm (PyTorch's `clip_grad_norm_` return value) within 1e-3
    relative at every step, and every trained parameter close to PyTorch's after the run. The weight
    decay (2.0) shrinks the decayed matrices by ~5%, so decaying a bias or a LayerNorm scale, or not
    decaying a matrix, shows in the parameters."""
    folder = save_tiny_bert(tmp_path / "hf", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            num_labels=3, random_init=True)
    steps, lr, wd = 12, 3e-3, 2.0
    cfg = OptimSection(lr=lr, weight_decay=wd, clip_norm=0.5, schedule="cosine", warmup_steps=3)
    batches = []
    for s in range(steps):  # three batches, seen four times each: the model can fit them
        ids, mask, types = random_batch(99, batch=4, seed=s % 3)
        labels = np.random.RandomState(100 + s % 3).randint(0, 3, 4).astype(np.int32)
        batches.append(dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                            weights=np.ones(4, np.float32)))

    model = jaxft.load_model(folder, task="sequence-classification")
    fn = Functional(model)
    tx, sched = make_optimizer(cfg, steps)
    state = init_state(fn, tx, seed=0)
    step = make_train_step(fn, classification_loss, tx, sched)
    ours, our_norms = [], []
    for b in batches:
        state, m = step(state, b)
        ours.append(float(m["loss"]))
        our_norms.append(float(m["grad_norm"]))
    ours_after = trained_hf_tensors(fn, state["params"], model, tmp_path / "ours")

    tm = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    tm.train()  # dropout rates are 0, so train mode is deterministic
    before = {n: p.detach().numpy().copy() for n, p in tm.named_parameters()}
    no_decay = [p for n, p in tm.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in tm.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sch = transformers.get_cosine_schedule_with_warmup(opt, 3, steps)
    ref, ref_norms = [], []
    for b in batches:
        out = tm(input_ids=torch.tensor(b["input_ids"]).long(), attention_mask=torch.tensor(b["attention_mask"]).long(),
                 token_type_ids=torch.tensor(b["token_type_ids"]).long(), labels=torch.tensor(b["labels"]).long())
        out.loss.backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(tm.parameters(), 0.5)))
        opt.step()
        sch.step()
        opt.zero_grad()
        ref.append(out.loss.item())
    assert ref[-1] < ref[0] - 0.05, ref  # the recipe really trains
    assert max(ref_norms) > 0.5 > min(ref_norms)  # clipped steps and unclipped ones
    np.testing.assert_allclose(ours, ref, rtol=1e-3)
    np.testing.assert_allclose(our_norms, ref_norms, rtol=1e-3)

    after = {n: p.detach().numpy() for n, p in tm.named_parameters()}
    assert sorted(ours_after) == sorted(after)
    shrink = []
    for name, theirs in after.items():
        if not name.endswith(NOISE_ONLY):
            np.testing.assert_allclose(ours_after[name], theirs, atol=2e-5, rtol=0, err_msg=name)
        if theirs.ndim == 2:
            shrink.append(np.linalg.norm(theirs) / np.linalg.norm(before[name]))
    assert max(shrink) < 0.98  # the decay is visible

def gradient_recorder():
    """An "optimizer" that changes nothing and keeps the gradients it was given in its state."""
    import jax
    import optax

    return optax.GradientTransformation(
        lambda params: {"grads": jax.tree.map(jax.numpy.zeros_like, params)},
        lambda grads, state, params=None: (jax.tree.map(jax.numpy.zeros_like, grads), {"grads": grads}))


def test_grad_accumulation_equals_the_large_batch(tmp_path):
    """The gradient the optimizer receives and `grad_norm`, before any optimizer: 1, 2 and 4 micro-batches
    (one of them all padding) give the large batch's, and that is PyTorch's gradient of the mean
    cross-entropy over the real rows (so a wrong overall scale fails too, not only a wrong split)."""
    folder = save_tiny_bert(tmp_path / "hf", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            random_init=True)
    ids, mask, types = random_batch(99, batch=4, seed=3)
    labels = np.array([0, 1, 2, 1], np.int32)
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                 weights=np.array([1, 1, 1, 0], np.float32))
    grads, norms = {}, {}
    for accum in (1, 2, 4):
        model = jaxft.load_model(folder, task="sequence-classification")  # the step donates its state
        fn = Functional(model)
        tx = gradient_recorder()
        state, m = make_train_step(fn, classification_loss, tx, lambda s: 0.0, accum)(init_state(fn, tx, 0), batch)
        grads[accum] = trained_hf_tensors(fn, state["opt_state"]["grads"], model, tmp_path / f"g{accum}")
        norms[accum] = float(m["grad_norm"])

    tm = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = tm(input_ids=torch.tensor(ids[:3]).long(), attention_mask=torch.tensor(mask[:3]).long(),
             token_type_ids=torch.tensor(types[:3]).long(), labels=torch.tensor(labels[:3]).long())
    out.loss.backward()  # mean over the three real rows
    ref = {n: p.grad.numpy() for n, p in tm.named_parameters()}
    ref_norm = float(torch.nn.utils.clip_grad_norm_(tm.parameters(), 1e9))
    assert ref_norm > 1.0
    scale = max(np.abs(g).max() for g in ref.values())
    assert sorted(grads[1]) == sorted(ref)
    for name, g in ref.items():
        np.testing.assert_allclose(grads[1][name], g, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    assert norms[1] == pytest.approx(ref_norm, rel=1e-4)
    for accum in (2, 4):
        assert norms[accum] == pytest.approx(norms[1], rel=1e-5)
        for name in ref:
            np.testing.assert_allclose(grads[accum][name], grads[1][name], rtol=1e-5, atol=1e-6 * scale,
                                       err_msg=f"grad_accum={accum}: {name}")
