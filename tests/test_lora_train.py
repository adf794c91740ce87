"""LoRA training: what trains, what the optimizer holds, what the compiled step computes, what the planner
counts; the CLI end to end; exact resume; equality on a mesh."""

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
from jaxft.lora import LoraSpec, apply_lora
from jaxft.models.lora import LoRAParam
from jaxft.optim import make_optimizer
from jaxft.train.step import Functional, init_state, make_train_step

from causal_helpers import VOCAB, padded_batch, save_hf
from lora_helpers import TOL, _fit
from conftest import forward, xla_env


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
    # and what the device holds while the step runs: arguments + temporaries + outputs not written in place.
    # (Temporaries alone are not lower: without base gradients LoRA still keeps every layer's input for the
    # adapters' gradients, plus the adapters' own activations.)
    footprint = lambda m: (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                           - m.alias_size_in_bytes)
    assert footprint(lora_mem) < 0.85 * footprint(full_mem), (footprint(lora_mem), footprint(full_mem))


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
    ours = np.asarray(forward(restored.model, ids))
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
    """On 8 simulated devices, LoRA training equals one device's (losses within 1e-4 relative, adapters
    within 1e-4), with every adapter sharded as its base kernel's input (A) and output (B) axes and the
    rank never sharded: a Llama on fsdp 4 × tensor 2, the same with an NF4 base (QLoRA), and DeepSeek-V3 on
    fsdp 2 × expert 4 (all-linear: MLA, dense MLP, shared and routed experts; adapter dropout on), whose
    routed experts' adapters are split over the experts like their kernels."""
    import subprocess
    import sys

    from test_deepseek_parity import save_hf as save_deepseek

    llama = save_hf("llama-mha", tmp_path / "llama", hidden_size=64, intermediate_size=64)
    deepseek = save_deepseek("v3", tmp_path / "deepseek")
    cases = [{"folder": str(llama), "mesh": {"fsdp": 4, "tensor": 2}},
             {"folder": str(llama), "mesh": {"fsdp": 4, "tensor": 2}, "quantize": "nf4"},
             {"folder": str(deepseek), "mesh": {"fsdp": 2, "expert": 4}, "dropout": 0.1}]
    out = tmp_path / "out.json"
    env = xla_env(8)
    subprocess.run([sys.executable, str(Path(__file__).parent / "lora_mesh_helper.py"), json.dumps(cases),
                    str(out)], check=True, env=env, timeout=1200)
    results = json.loads(out.read_text())
    for case, r in zip(cases, results):
        assert np.allclose(r["many"], r["one"], rtol=1e-4, atol=0), (case, r["one"], r["many"])
        assert r["param_diff"] <= 1e-4, case
    plain, qlora, ds = (r["specs"] for r in results)
    assert plain["model.layers.0.self_attn.q_proj"] == {
        "kernel": "P('fsdp', 'tensor', None)", "a": "P('fsdp', None)", "b": "P(None, 'tensor', None)"}
    assert plain["model.layers.0.self_attn.o_proj"] == {
        "kernel": "P('tensor', None, 'fsdp')", "a": "P('tensor', None, None)", "b": "P(None, 'fsdp')"}
    assert plain["model.layers.1.mlp.down_proj"] == {
        "kernel": "P('tensor', 'fsdp')", "a": "P('tensor', None)", "b": "P(None, 'fsdp')"}
    # an NF4 base: packed codes keep the kernel's layout, so the same adapter shardings
    assert qlora["model.layers.0.self_attn.q_proj"]["a"] == "P('fsdp', None)"
    assert qlora["model.layers.0.self_attn.q_proj"]["kernel"].startswith("P('fsdp', 'tensor'")
    # MLA's latent projections: A over the model width (fsdp), B over the latent or heads
    assert ds["model.layers.1.self_attn.q_a_proj"]["a"] == "P('fsdp', None)"
    assert ds["model.layers.1.self_attn.kv_b_proj"]["a"] == "P('fsdp', None)"
    assert ds["model.layers.1.mlp.shared_experts.down_proj"]["b"] == "P(None, 'fsdp')"
    # routed experts: one adapter per expert, split over `expert` like the kernel; A's model width (gate/up)
    # and B's (down) over fsdp as the kernel's, the rank whole
    assert ds["model.layers.1.mlp.experts.gate_proj"] == {
        "kernel": "P('expert', 'fsdp', None)", "a": "P('expert', 'fsdp', None)", "b": "P('expert', None, None)"}
    assert ds["model.layers.2.mlp.experts.down_proj"] == {
        "kernel": "P('expert', None, 'fsdp')", "a": "P('expert', None, None)", "b": "P('expert', None, 'fsdp')"}


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
