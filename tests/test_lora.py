"""LoRA parity, looped layers: merged export vs transformers, adapter export vs peft, on every causal family;
which modules `all-linear` and a regex target (see lora_helpers.py)."""

from __future__ import annotations


import numpy as np
import pytest

import jaxft
from jaxft.lora import LoraSpec, apply_lora, merge, save_adapter

from causal_helpers import hf_logits, load_hf, max_diff, padded_batch, save_hf
from lora_helpers import CAUSAL, TOL, _peft_logits, _save, check_causal_lora, randomise_adapters


@pytest.mark.parametrize("variant", CAUSAL)
def test_causal_lm_lora_looped(tmp_path, variant):
    check_causal_lora(tmp_path, variant, scan=False)


def test_deepseek_all_linear_merges_and_loads_in_peft(tmp_path):
    """`all-linear` on DeepSeek adapts the dense MLP, the shared experts and every routed expert (stacked per
    expert), never the router: the merged export matches transformers and the adapter export matches peft
    (>= 0.22; 0.21 in test_deepseek_adapter_under_peft_0_21); every MoE dispatch (dense, blocks, ragged_dot)
    gives the same logits, with adapter dropout too (the same masks per token and slot); a peft adapter peft
    would load wrongly is refused, naming why: rslora or gate_proj without up_proj on the routed experts."""
    import jax
    from flax import nnx

    from jaxft.models import moe
    from jaxft.models.lora import adapter_dropout

    src = _save("deepseek-v3", tmp_path / "base")
    ids, mask = padded_batch()
    model = jaxft.load_model(src, task="causal-lm", scan_layers=True)
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0, dropout=0.5))
    names = [n for t in adapters.targets for n in t.hf_names]
    assert "model.layers.0.mlp.gate_proj" in names and "model.layers.1.mlp.shared_experts.down_proj" in names
    assert {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (1, 2) for e in range(8)
            for p in ("gate_proj", "up_proj", "down_proj")} <= set(names)
    assert not any(n.endswith("mlp.gate") for n in names)
    assert model.model.layers.mlp.experts.up_proj.lora.a.shape == (2, 8, 32, 4)     # [L, E, D, r]
    assert model.model.layers.mlp.experts.down_proj.lora.b.shape == (2, 8, 4, 32)   # [L, E, r, D]
    randomise_adapters(model)

    @nnx.jit  # the key is an argument: None and a key trace apart, another key reuses the program
    def run(model, key):
        with adapter_dropout(key):
            return model(ids, attention_mask=mask)

    def logits(impl, key=None):
        for _, m in nnx.iter_modules(model):
            if isinstance(m, moe.MoE):
                m.impl = impl  # a static attribute: each dispatch is its own program
        return np.asarray(run(model, key))

    for key in (None, jax.random.key(5)):
        out = {impl: logits(impl, key) for impl in ("blocks", "dense", "ragged_dot")}
        for impl in ("dense", "ragged_dot"):
            assert max_diff(out[impl], out["blocks"], mask) <= 1e-5, (impl, key)
    assert max_diff(out["blocks"], logits("blocks"), mask) > 1e-2, "adapter dropout had no effect"
    lora = logits("blocks")
    save_adapter(model, adapters, tmp_path / "adapter", str(src))  # the installed peft (>= 0.22) keeps them all
    plain, adapted = _peft_logits(src, tmp_path / "adapter", ids, mask)
    assert max_diff(adapted, lora, mask) <= TOL and max_diff(adapted, plain, mask) > 1e-2
    merge(model, adapters)
    jaxft.save_pretrained(model, tmp_path / "merged")
    assert max_diff(hf_logits(load_hf(tmp_path / "merged"), ids, mask), lora, mask) <= TOL

    for spec, why in ((LoraSpec(targets=r"experts\..*", rslora=True), "rslora"),
                      (LoraSpec(targets=r"experts\.\d+\.(gate|down)_proj"), "both gate_proj and up_proj")):
        model = jaxft.load_model(src, task="causal-lm")
        with pytest.raises(ValueError, match=why) as e:
            save_adapter(model, apply_lora(model, spec), tmp_path / "refused", str(src))
        assert "merged" in str(e.value)
    assert not (tmp_path / "refused").exists()


PEFT_021_CHECK = """
import json, sys
sys.path.insert(0, "tests")
import numpy as np
import jaxft, peft
from jaxft.lora import LoraSpec, apply_lora, save_adapter
from causal_helpers import max_diff, padded_batch
from conftest import forward
from lora_helpers import _peft_logits, _save, randomise_adapters
from pathlib import Path
tmp = Path(sys.argv[1])
src = _save("deepseek-v3", tmp / "base")
ids, mask = padded_batch()
out = {"peft": peft.__version__}
for name, targets in (("experts", r"self_attn\\..*|experts\\..*"), ("all-linear", "all-linear")):
    model = jaxft.load_model(src, task="causal-lm")
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0, targets=targets))
    randomise_adapters(model)
    lora = np.asarray(forward(model, ids, attention_mask=mask))
    try:
        save_adapter(model, adapters, tmp / name, str(src))
    except ValueError as e:
        out[name] = str(e)
        continue
    plain, adapted = _peft_logits(src, tmp / name, ids, mask)
    out[name] = [float(max_diff(adapted, lora, mask)), float(max_diff(adapted, plain, mask))]
print(json.dumps(out))
"""


def test_deepseek_adapter_under_peft_0_21(tmp_path):
    """Under peft 0.21 (installed beside the venv by scripts/setup.sh, put first on the path of a child
    process), the DeepSeek adapter of attention + routed experts loads as the model computes it, and one
    with dense MLP / shared experts (which 0.21 would drop) is refused, naming the installed peft."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import missing

    old = Path(sys.prefix) / "peft-0.21.2"
    if not (old / "peft").is_dir():
        missing(f"{old} is absent: scripts/setup.sh installs peft 0.21.2 there (pip install --no-deps --target)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(old), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", PEFT_021_CHECK, str(tmp_path)], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["peft"] == "0.21.2"
    diff, moved = out["experts"]
    assert diff <= TOL and moved > 1e-2, out
    assert "installed peft 0.21" in out["all-linear"] and "peft>=0.22" in out["all-linear"], out


def test_all_linear_targets_match_peft(tmp_path):
    """`all-linear` adapts the modules peft's `all-linear` does on Llama and GPT-2 (every block linear
    layer, not the head), and a regex picks exactly the modules it names."""
    import peft
    import torch

    for variant in ("llama-bias", "gpt2"):
        src = save_hf(variant, tmp_path / variant)
        model = jaxft.load_model(src, task="causal-lm")
        ours = sorted(n for t in apply_lora(model, LoraSpec()).targets for n in t.hf_names)
        with torch.no_grad():
            pm = peft.get_peft_model(load_hf(src), peft.LoraConfig(r=2, target_modules="all-linear"))
        theirs = sorted({n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
                         for n, _ in pm.named_parameters() if ".lora_A." in n})
        assert ours == theirs
    model = jaxft.load_model(tmp_path / "llama-bias", task="causal-lm")
    names = sorted(n for t in apply_lora(model, LoraSpec(targets="q_proj|v_proj")).targets for n in t.hf_names)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="model.lora.targets='nothing_here'"):
        apply_lora(jaxft.load_model(tmp_path / "llama-bias", task="causal-lm"), LoraSpec(targets="nothing_here"))


@pytest.mark.parametrize("einsum, kernel", [
    ("BTD,DNH->BTNH", (6, 3, 4)),     # q/k/v projections
    ("BTNH,NHD->BTD", (3, 4, 6)),     # attention output: two input dims
    ("BTD,DCNH->BTCNH", (6, 3, 2, 4)),  # GPT-2's fused c_attn
    ("BD,DC->BC", (6, 5)),            # BERT's pooler / classifier (no length axis)
])
def test_adapter_backward_equals_autodiff(einsum, kernel):
    """The adapter's hand-written backward pass (`jaxft.models.lora._adapter_bwd`, laid out for XLA on CPU)
    gives the gradients autodiff takes of `scale·(x·A)·B`, for x, A and B, on every einsum shape a family
    uses (input dims 1 or 2, output dims 1–3, with and without a length axis)."""
    import jax
    import jax.numpy as jnp

    from jaxft.models.lora import LoRA, _adapter, split_einsum

    lhs, _, _, _, ins, outs = split_einsum(einsum)
    layer = LoRA(einsum, kernel, (None,) * len(kernel), rank=3, alpha=5.0, key=jax.random.key(0))
    size = dict(zip(layer.dims[2] + layer.dims[3], kernel[:len(ins)] + kernel[len(ins):]), B=2, T=5)
    ks = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(ks[0], tuple(size[c] for c in lhs))
    a = jax.random.normal(ks[1], layer.a.shape)
    b = jax.random.normal(ks[2], layer.b.shape)
    w = jax.random.normal(ks[3], jax.eval_shape(lambda: layer(x)).shape)

    def ours(x, a, b):
        return jnp.sum(_adapter(layer.dims, layer.scale, x, a, b) * w)

    def plain(x, a, b):
        lhs_, batch, ins_, outs_, out = layer.dims
        h = jnp.einsum(f"{lhs_},{ins_}r->{batch}r", x, a)
        return jnp.sum(jnp.einsum(f"{batch}r,r{outs_}->{out}", h, b) * layer.scale * w)

    np.testing.assert_allclose(ours(x, a, b), plain(x, a, b), rtol=1e-5)
    for g_ours, g_plain in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(plain, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_plain), rtol=1e-5, atol=1e-5)


def test_lm_head_adapter_is_not_fused_into_the_loss(tmp_path):
    """`model.lora.targets` naming `lm_head`: the head is then no longer one matrix (`head_matrix()` None),
    so the training loss does not take the fused head + cross-entropy path (which reads the base kernel
    alone): the loss and the gradients of every adapter (the head's included) equal plain autodiff of the
    next-token CE of the model's logits, in one chunk and in chunks of 16 tokens."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxft.train.losses import make_causal_lm_loss
    from jaxft.train.step import Functional

    src = save_hf("llama-bias", tmp_path / "base")
    model = jaxft.load_model(src, task="causal-lm")
    assert model.head_matrix() is not None   # untied, no bias: fused while it has no adapter
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0, targets="q_proj|lm_head"))
    assert "lm_head" in [n for t in adapters.targets for n in t.hf_names] and model.lm_head.lora is not None
    randomise_adapters(model)
    assert model.head_matrix() is None
    fn = Functional(model, adapters.trainable)
    assert {"lm_head.lora.a", "lm_head.lora.b"} <= set(fn.params)
    ids, mask = padded_batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask),
             "weights": jnp.ones((3,), jnp.float32)}

    def plain(params):
        logits = fn.module(params)(batch["input_ids"], attention_mask=batch["attention_mask"])
        w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]) * w)

    want, want_grads = jax.jit(jax.value_and_grad(plain))(fn.params)
    for chunk in (0, 16):
        loss_fn = make_causal_lm_loss(chunk_tokens=chunk)
        got, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(fn.module(p), batch, None)[0]))(fn.params)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        for k in want_grads:
            np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(want_grads[k]), rtol=1e-4, atol=1e-6,
                                       err_msg=f"{k} (chunk_tokens={chunk})")
        assert np.abs(np.asarray(grads["lm_head.lora.b"])).max() > 1e-3
