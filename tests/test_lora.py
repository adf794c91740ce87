"""LoRA: adapters on every family, checked against `transformers` (merged export) and `peft` (adapter export).

Every model is a tiny random `transformers` model with every weight randomised; the adapters are
randomised too (a fresh adapter has B = 0 and changes nothing, which would hide a wrong layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxft
from jaxft.config import OptimSection
from jaxft.lora import LoraSpec, apply_lora, merge, save_adapter
from jaxft.models.lora import LoRAParam
from jaxft.optim import make_optimizer
from jaxft.train.step import Functional, init_state, make_train_step

from causal_helpers import VOCAB, hf_logits, load_hf, max_diff, padded_batch, save_hf
from conftest import random_batch, save_tiny_bert


TOL = 1e-4

CAUSAL = ["llama-bias", "qwen2-bias-sliding", "gpt2", "deepseek-v2-lite", "deepseek-v3"]


def _save(variant: str, folder: Path) -> Path:
    if variant.startswith("deepseek"):
        from test_deepseek_parity import save_hf as save_deepseek

        return save_deepseek({"deepseek-v2-lite": "v2-lite", "deepseek-v3": "v3"}[variant], folder)
    return save_hf(variant, folder)


def _fit(fn: Functional, optim: OptimSection, steps: int) -> tuple[dict, list[float]]:
    """`steps` train steps of a causal LM on one fixed padded batch: `(final state, losses)`."""
    from jaxft.train.losses import causal_lm_loss

    tx, lr = make_optimizer(optim, steps)
    state, step = init_state(fn, tx, 0), make_train_step(fn, causal_lm_loss, tx, lr)
    ids, mask = padded_batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask),
             "weights": jnp.ones((3,), jnp.float32)}
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def randomise_adapters(model: nnx.Module, seed: int = 1, std: float = 0.1) -> None:
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        value = var.get_value()
        var.set_value(std * jax.random.normal(jax.random.key(seed * 1000 + i), value.shape, value.dtype))


def _peft_logits(base_dir: Path, adapter_dir: Path, ids, mask, classify: bool = False, types=None):
    import peft
    import torch
    import transformers

    if classify:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(str(base_dir)).eval()
    else:
        base = load_hf(base_dir)
    with torch.no_grad():
        kw = {"attention_mask": torch.tensor(mask)}
        if types is not None:
            kw["token_type_ids"] = torch.tensor(types)
        plain = base(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        adapted = model(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()
    return plain, adapted


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
@pytest.mark.parametrize("variant", CAUSAL)
def test_causal_lm_lora_matches_transformers_and_peft(tmp_path, variant, scan):
    src = _save(variant, tmp_path / "base")
    ids, mask = padded_batch()
    model = jaxft.load_model(src, task="causal-lm", scan_layers=scan)
    base = np.asarray(model(ids, attention_mask=mask))
    # peft cannot hold adapters on DeepSeek's dense MLP / shared experts (see test_deepseek_all_linear)
    targets = r"self_attn\..*" if variant.startswith("deepseek") else "all-linear"
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0, targets=targets))
    assert np.array_equal(np.asarray(model(ids, attention_mask=mask)), base), "a fresh adapter changed the logits"
    randomise_adapters(model)
    lora = np.asarray(model(ids, attention_mask=mask))
    assert max_diff(lora, base, mask) > 1e-2, "randomised adapters should change the logits"

    save_adapter(model, adapters, tmp_path / "adapter", str(src))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["fan_in_fan_out"] == variant.startswith("gpt2")
    plain, adapted = _peft_logits(src, tmp_path / "adapter", ids, mask)
    assert max_diff(adapted, lora, mask) <= TOL
    assert max_diff(adapted, plain, mask) > 1e-2, "peft ignored the adapter"

    merge(model, adapters)
    assert np.abs(np.asarray(model(ids, attention_mask=mask)) - lora)[mask.astype(bool)].max() <= 1e-5
    jaxft.save_pretrained(model, tmp_path / "merged")
    assert max_diff(hf_logits(load_hf(tmp_path / "merged"), ids, mask), lora, mask) <= TOL


def test_deepseek_all_linear_merges_and_refuses_a_misrouted_peft_adapter(tmp_path):
    """`all-linear` on DeepSeek also adapts the dense MLP and the shared experts: the merged export matches
    transformers; a peft adapter of them is refused, since peft's MoE loader would put them on the routed
    experts instead."""
    src = _save("deepseek-v3", tmp_path / "base")
    ids, mask = padded_batch()
    model = jaxft.load_model(src, task="causal-lm", scan_layers=True)
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0))
    names = [n for t in adapters.targets for n in t.hf_names]
    assert "model.layers.0.mlp.gate_proj" in names and "model.layers.1.mlp.shared_experts.down_proj" in names
    assert not any("experts.0" in n or n.endswith("mlp.gate") for n in names)
    randomise_adapters(model)
    lora = np.asarray(model(ids, attention_mask=mask))
    with pytest.raises(ValueError, match="re-targets"):
        save_adapter(model, adapters, tmp_path / "adapter", str(src))
    merge(model, adapters)
    jaxft.save_pretrained(model, tmp_path / "merged")
    assert max_diff(hf_logits(load_hf(tmp_path / "merged"), ids, mask), lora, mask) <= TOL


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


def _random_bert(folder: Path) -> Path:
    import torch
    import transformers

    save_tiny_bert(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "LayerNorm.weight" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
def test_bert_lora_with_trained_head_matches_peft(tmp_path, scan):
    import torch
    import transformers

    src = _random_bert(tmp_path / "bert")
    ids, mask, types = random_batch(99)
    model = jaxft.load_model(src, task="sequence-classification", num_labels=3, scan_layers=scan)
    base = np.asarray(model(ids, attention_mask=mask, token_type_ids=types))
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=4.0, rslora=True))
    assert adapters.train_modules == ["classifier"]
    assert adapters.train_paths == {"classifier.kernel", "classifier.bias"}
    assert "bert.pooler.dense" in [n for t in adapters.targets for n in t.hf_names]  # as peft's all-linear
    randomise_adapters(model)
    model.classifier.kernel.set_value(model.classifier.kernel.get_value() + 0.3)  # a trained head
    lora = np.asarray(model(ids, attention_mask=mask, token_type_ids=types))
    assert np.abs(lora - base).max() > 1e-2

    save_adapter(model, adapters, tmp_path / "adapter", str(src))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"] and cfg["use_rslora"]
    plain, adapted = _peft_logits(src, tmp_path / "adapter", ids, mask, classify=True, types=types)
    assert np.abs(adapted - lora).max() <= TOL
    assert np.abs(adapted - plain).max() > 1e-2

    merge(model, adapters)
    jaxft.save_pretrained(model, tmp_path / "merged")
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        merged = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             token_type_ids=torch.tensor(types)).logits.numpy()
    assert np.abs(merged - lora).max() <= TOL


def test_training_changes_only_adapters_and_keeps_no_base_state(tmp_path):
    """A LoRA step differentiates the adapters only: the base is bitwise unchanged, the optimizer state
    mirrors the adapters alone, and the loss goes down."""
    src = save_hf("llama-bias", tmp_path / "base")
    model = jaxft.load_model(src, task="causal-lm")
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0, dropout=0.1))
    fn = Functional(model, adapters.trainable)
    assert fn.params and all(".lora." in k for k in fn.params)
    base_before = {k: np.asarray(v).copy() for k, v in fn.frozen.items()}
    tx, _ = make_optimizer(OptimSection(lr=1e-2, weight_decay=0.1), 6)
    mirrored = [x.shape for x in jax.tree.leaves(init_state(fn, tx, 0)["opt_state"]) if x.ndim > 0]
    assert sorted(mirrored) == sorted([v.shape for v in fn.params.values()] * 2)  # Adam's mu and nu only
    state, losses = _fit(fn, OptimSection(lr=1e-2, weight_decay=0.1), 6)
    assert losses[-1] < losses[0]
    for k, v in fn.frozen.items():
        assert np.array_equal(np.asarray(v), base_before[k]), k
    trained = fn.module(state["params"])
    assert all(np.abs(np.asarray(v.get_value())).max() > 0
               for _, v in nnx.to_flat_state(nnx.state(trained, LoRAParam)) if "lora.b" in str(_))


def test_plan_counts_lora_memory(tmp_path):
    """The planner: all parameters held, gradients and optimizer state for the adapters only."""
    from jaxft.config import load_config
    from jaxft.plan import plan

    src = save_hf("llama-bias", tmp_path / "base")
    base = {"model": {"name_or_path": str(src), "task": "causal-lm"}, "train": {"batch_size": 2},
            "data": {"max_length": 16}}
    full = plan(load_config(base=base))
    lora = plan(load_config(base=base, overrides=["model.lora.rank=2"]))
    assert lora.param_count > full.param_count == full.trainable_count
    adapters = lora.trainable_count
    assert 0 < adapters < full.param_count / 5
    assert lora.per_device["gradients"] == 4 * adapters
    assert lora.per_device["opt_state"] < full.per_device["opt_state"] / 5
    assert lora.per_device["params"] == 4 * lora.param_count


def test_cli_lora_run_trains_exports_and_refuses_another_base(tmp_path, capsys):
    """`jaxft train` with model.lora.rank: the checkpoint holds only the adapters; the merged export and
    the peft adapter give the run's logits in transformers / peft; `jaxft generate` takes the run
    directory; resuming or exporting against a base whose weights changed is refused, naming both."""
    import peft
    import transformers

    from jaxft.cli import main
    from jaxft.train.run import restore_run
    from sft_helpers import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "tiny")
    rows = [{"messages": [{"role": "user", "content": f"map w{i}"}, {"role": "assistant", "content": f"d{i}"}]}
            for i in range(12)] * 2
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = ["train", str(Path(__file__).parents[1] / "configs" / "sft_tiny.yaml"), f"model.name_or_path={folder}",
            f"data.train={tmp_path / 'rows.jsonl'}", f"output_dir={run}", "train.steps=6", "train.log_every=3",
            "model.lora.rank=4", "model.lora.targets=q_proj|v_proj|down_proj", "optim.lr=2e-2", "train.batch_size=4"]
    assert main(args) == 0, capsys.readouterr().err
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert train[-1]["loss"] < train[0]["loss"]
    params = sorted(p.name for p in (run / "checkpoints" / "6" / "params").iterdir() if "lora" in p.name) or \
        sorted(json.loads((run / "checkpoints" / "6" / "params" / "_METADATA").read_text())["tree_metadata"])
    assert params and all("lora" in p for p in params), params[:5]

    restored = restore_run(run)
    ids = np.array([[3, 5, 7, 9, 11, 13]], np.int32)
    ours = np.asarray(restored.model(ids))
    assert main(["export", str(run), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert main(["export", str(run), str(tmp_path / "merged")]) == 0
    with __import__("torch").no_grad():
        import torch

        merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        base = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        plain = base(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        via_peft = adapted(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        via_merged = merged(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(via_merged - ours).max() <= TOL and np.abs(via_peft - ours).max() <= TOL
    assert np.abs(via_peft - plain).max() > 1e-3
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(folder)
    assert sorted(cfg["target_modules"]) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                                   for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "map w1", "--max-new-tokens", "3"]) == 0

    # the base's weights change under the run (an updated Hub repo, a re-saved folder): resume and export
    # are refused, naming the recorded and the current weights
    save_tiny_llama(folder, seed=7)
    capsys.readouterr()
    assert main([*args, "train.steps=8"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "different weights" in err and "sha256" in err, err
    assert main(["export", str(run), str(tmp_path / "again")]) == 2
    assert "different weights" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_on_a_mesh_equals_one_device(tmp_path):
    """fsdp 4 × tensor 2 on 8 simulated devices: the same losses and adapters as one device, and every
    adapter sharded as its base kernel's input (A) and output (B) axes, the rank never sharded."""
    import os
    import subprocess
    import sys

    src = save_hf("llama-mha", tmp_path / "base", hidden_size=64, intermediate_size=64)
    out = tmp_path / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, str(Path(__file__).parent / "lora_mesh_helper.py"), str(src),
                    json.dumps({"fsdp": 4, "tensor": 2}), str(out)], check=True, env=env, timeout=600)
    r = json.loads(out.read_text())
    assert np.allclose(r["many"], r["one"], rtol=1e-4, atol=0), (r["one"], r["many"])
    assert r["param_diff"] <= 1e-4
    specs = r["specs"]
    assert specs["model.layers.0.self_attn.q_proj"] == {
        "kernel": "P('fsdp', 'tensor', None)", "a": "P('fsdp', None)", "b": "P(None, 'tensor', None)"}
    assert specs["model.layers.0.self_attn.o_proj"] == {
        "kernel": "P('tensor', None, 'fsdp')", "a": "P('tensor', None, None)", "b": "P(None, 'fsdp')"}
    assert specs["model.layers.1.mlp.down_proj"] == {
        "kernel": "P('tensor', 'fsdp')", "a": "P('tensor', None)", "b": "P(None, 'fsdp')"}


def test_lora_step_skips_base_weight_gradients(tmp_path):
    """XLA's own accounting of the compiled train step: with LoRA the backward pass computes no base-weight
    gradient (about a third of a full step's matmul FLOPs) and holds no base gradient or optimizer state."""
    from jaxft.train.losses import causal_lm_loss

    src = save_hf("llama-mha", tmp_path / "base", hidden_size=64, intermediate_size=128, vocab_size=VOCAB)
    ids, mask = padded_batch(length=32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask),
             "weights": jnp.ones((3,), jnp.float32)}
    stats = {}
    for kind in ("full", "lora"):
        model = jaxft.load_model(src, task="causal-lm")
        fn = Functional(model, apply_lora(model, LoraSpec(rank=4)).trainable) if kind == "lora" else Functional(model)
        tx, lr = make_optimizer(OptimSection(lr=1e-3), 4)
        compiled = make_train_step(fn, causal_lm_loss, tx, lr).lower(init_state(fn, tx, 0), batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        stats[kind] = (cost["flops"], compiled.memory_analysis())
    (full_flops, full_mem), (lora_flops, lora_mem) = stats["full"], stats["lora"]
    assert lora_flops < 0.75 * full_flops, (lora_flops, full_flops)
    # arguments: the donated state (params + Adam moments) shrinks to the adapters'
    assert lora_mem.output_size_in_bytes < 0.3 * full_mem.output_size_in_bytes
    assert lora_mem.temp_size_in_bytes < full_mem.temp_size_in_bytes


# --- QLoRA: a quantised frozen base ---------------------------------------------------------------

def test_nf4_code_book_and_quantisation_error_bounds():
    """NF4 levels are the published ones and follow from the normal quantiles; every entry of a dequantised
    kernel is within the stated bound (int8: s/2 per output channel; nf4: absmax·max_gap/2 per block)."""
    from jaxft.models.quant import NF4, NF4_MAX_GAP, QuantKernel, nf4_from_quantiles

    published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
    assert np.array_equal(NF4, np.float32(published))
    assert np.abs(nf4_from_quantiles() - NF4).max() < 1e-6
    w = jax.random.normal(jax.random.key(0), (3, 64, 4, 128)) * jnp.linspace(0.1, 2.0, 128)  # [L, D, N, H]
    for kind in ("int8", "nf4"):
        q = QuantKernel(w, kind, ("layers", "embed", "heads", "head_dim"), (-3,))
        err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
        bound = np.asarray(q.error_bound())
        if kind == "int8":
            assert q.codes.dtype == jnp.int8 and q.scale.shape == (3, 4, 128)
            assert (err <= bound[:, None] * (1 + 1e-6)).all()
            assert err.max() < 0.01 * np.abs(np.asarray(w)).max()
        else:
            assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 64, 4, 64) and q.scale.shape == (3, 64, 4, 2)
            blocks = err.reshape(3, 64, 4, 2, 64)
            assert (blocks <= bound[..., None] * (1 + 1e-6)).all()
            assert NF4_MAX_GAP == pytest.approx(0.3038, abs=1e-4)
            # and the bound is not slack: some entry uses at least half of it
            assert (blocks / bound[..., None]).max() > 0.5


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_trains_and_merged_export_matches(tmp_path, kind):
    """A tiny Llama loaded quantised: only the codes and scales are held (no float kernel of a linear layer),
    LoRA training lowers the loss, and the merged export (dequantised base + adapters) loads in
    transformers with jaxft's QLoRA logits within 1e-4."""
    from jaxft.models.quant import QuantParam

    src = save_hf("llama-bias", tmp_path / "base")
    model = jaxft.load_model(src, task="causal-lm", quantize=kind, scan_layers=True)
    codes = [v for _, v in nnx.to_flat_state(nnx.state(model, QuantParam))]
    assert codes and {str(v.get_value().dtype) for v in codes} >= {"int8" if kind == "int8" else "uint8"}
    assert model.model.layers.self_attn.q_proj.kernel is None and model.lm_head.quant is None
    adapters = apply_lora(model, LoraSpec(rank=4, alpha=8.0))
    fn = Functional(model, adapters.trainable)
    assert all(".lora." in k for k in fn.params) and any(".quant." in k for k in fn.frozen)
    state, losses = _fit(fn, OptimSection(lr=2e-2), 8)
    assert losses[-1] < 0.9 * losses[0], losses
    ids, mask = padded_batch()
    trained = fn.module(state["params"])
    trained.hf_config = model.hf_config
    ours = np.asarray(trained(ids, attention_mask=mask))
    merge(trained, adapters)
    jaxft.save_pretrained(trained, tmp_path / "merged")
    assert max_diff(hf_logits(load_hf(tmp_path / "merged"), ids, mask), ours, mask) <= TOL


def test_plan_shows_the_qlora_saving_for_an_8b_model(tmp_path):
    """Llama-3-8B's shape (config only, nothing allocated): full fine-tuning in bfloat16 fits neither a 16 GiB
    TPU v5e nor a 24 GiB GPU; LoRA on an nf4 base with remat does, at about half a byte per base parameter."""
    from jaxft.config import load_config
    from jaxft.plan import GiB, plan

    folder = tmp_path / "llama3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    base = {"model": {"name_or_path": str(folder), "task": "causal-lm", "dtype": "bfloat16",
                      "param_dtype": "bfloat16", "remat": "full", "scan_layers": True},
            "train": {"batch_size": 1}, "data": {"max_length": 1024}}
    full = plan(load_config(base=base), devices=1)
    qlora = plan(load_config(base=base, overrides=["model.lora.rank=16", "model.quantize=nf4"]), devices=1)
    assert 7.9e9 < full.param_count < 8.1e9
    assert not full.fits()["TPU v5e"] and full.per_device["peak"] > 24 * GiB
    assert qlora.fits()["TPU v5e"], qlora.report()
    assert qlora.per_device["peak"] < 16 * GiB < full.per_device["peak"] / 3
    # the quantised linear layers at ~0.53 bytes; embeddings and the head stay bfloat16 (2 bytes)
    assert 0.5 < float(qlora.settings["base_bytes_per_param"]) < 0.9
    assert "nf4" in qlora.report() and "bytes per base parameter" in qlora.report()


@pytest.mark.slow
def test_lora_resume_is_exact(tmp_path, capsys):
    """Stop a LoRA run (adapter dropout on) at step 3 and resume it to 6: the adapters are bitwise those of a
    run straight to 6."""
    from safetensors.numpy import load_file

    from jaxft.cli import main
    from sft_helpers import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "tiny")
    rows = [{"text": f"w{i} d{i} w{i + 1} d{i + 1}"} for i in range(16)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [str(Path(__file__).parents[1] / "configs" / "sft_tiny.yaml"), f"model.name_or_path={folder}",
              f"data.train={tmp_path / 'rows.jsonl'}", "data.format=text", "data.packing=false",
              "train.batch_size=4", "train.steps=6", "model.lora.rank=4", "model.lora.dropout=0.2",
              "optim.lr=1e-2"]
    assert main(["train", *common, f"output_dir={tmp_path / 'straight'}"]) == 0
    assert main(["train", *common, f"output_dir={tmp_path / 'resumed'}", "train.stop_at_step=3"]) == 0
    assert main(["train", *common, f"output_dir={tmp_path / 'resumed'}"]) == 0
    capsys.readouterr()
    out = {}
    for run in ("straight", "resumed"):
        assert main(["export", str(tmp_path / run), str(tmp_path / f"{run}-adapter"), "--adapter"]) == 0
        out[run] = load_file(str(tmp_path / f"{run}-adapter" / "adapter_model.safetensors"))
    assert sorted(out["straight"]) == sorted(out["resumed"]) and out["straight"]
    for k, v in out["straight"].items():
        assert np.array_equal(v, out["resumed"][k]), k
    assert any(np.abs(v).max() > 0 for k, v in out["straight"].items() if "lora_B" in k)
