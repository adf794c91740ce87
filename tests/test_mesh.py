"""Meshes: training on 8 simulated CPU devices equals training on one, with really sharded state.

The multi-device runs happen in subprocesses (`tests/mesh_helpers.py`) started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, which must be set before JAX starts; two
subprocesses run at once to use both cores of a small CI machine. Each run trains 10 steps of AdamW on
the same random batches; the DESIGN.md bar is the single-device loss at every step within 1e-4 relative.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from causal_helpers import save_hf
from conftest import save_tiny_bert, xla_env
from jaxft import parallel

HERE = Path(__file__).resolve().parent
MESH_2x2x2 = {"data": 2, "fsdp": 2, "tensor": 2}
DEEPSEEK = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=256)


def save_deepseek(folder: Path, seed: int = 0) -> Path:
    """A tiny random DeepSeek-V3 (MoE in layer 1) with every parameter random (experts included, so the
    routed experts carry much of the output); router weights spread wide (std 0.5) so that no two
    experts' scores are close enough for float rounding to flip a routing choice."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("deepseek_v3", **DEEPSEEK))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def start(spec: dict, path: Path, devices: int = 8) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
    env = xla_env(devices)
    return subprocess.Popen([sys.executable, str(HERE / "mesh_helpers.py"), str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.split("RESULTS ", 1)[1])


def assert_same_losses(ref: dict, got: dict, label: str) -> None:
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-4, err_msg=label)


def assert_same_params(ref: Path, got: Path, label: str) -> None:
    """Every trained parameter within 1e-5 (10 steps at lr 3e-3 move them by up to ~3e-2; float
    reordering over a mesh leaves ~1e-7). Except BERT's key biases: they add the same q·b to every
    key of a query, which softmax ignores, so their gradient is 0 but for rounding noise, and Adam turns
    that noise into lr-sized steps in arbitrary directions."""
    a, b = np.load(ref), np.load(got)
    assert sorted(a.files) == sorted(b.files), label
    for name in a.files:
        if not name.endswith(".key.bias"):
            np.testing.assert_allclose(b[name], a[name], atol=1e-5, rtol=0, err_msg=f"{label}: {name}")


def test_mesh_shape_checks_the_device_count():
    assert parallel.mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "sequence": 1, "expert": 1,
                                                                 "tensor": 2}
    with pytest.raises(ValueError, match=r"mesh \{data: 2, fsdp: 2, tensor: 3\} needs 12 devices, but 8 are available"):
        parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="8 devices are not divisible by the product of the fixed axes \\(3\\)"):
        parallel.mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_rules_shard_each_weight_once_per_mesh_axis():
    from jax.sharding import AbstractMesh, PartitionSpec as P

    mesh = AbstractMesh((2, 4, 1, 1, 2), parallel.MESH_AXES)
    assert parallel.spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P("fsdp", "tensor", None)
    assert parallel.spec(("expert", "embed", "mlp"), (8, 32, 16), mesh) == P(None, "fsdp", "tensor")
    assert parallel.spec(("batch", "length", "embed"), (16, 8, 32), mesh) == P(("data", "fsdp"), None, None)
    assert parallel.spec(("embed", "vocab"), (30, 96), mesh) == P(None, "tensor")   # 30 % 4 ≠ 0: replicated
    assert parallel.shard_factor(P(("data", "fsdp"), "tensor"), mesh) == 16


@pytest.mark.slow
def test_sharded_training_equals_one_device(tmp_path):
    """Tiny Llama, BERT and DeepSeek-V3 (MoE; BERT and DeepSeek with every parameter random, so that the
    routed experts matter): 10 steps on meshes of 8 devices vs one device, losses at every step and, for
    BERT and DeepSeek, the trained parameters; gradient
    accumulation (4 × 8 on the mesh vs a batch of 32 on one device); scanned layers on a mesh; each
    device's shard read from the checkpoint as a slice."""
    llama = save_hf("llama-mha", tmp_path / "llama", num_key_value_heads=2)
    bert = save_tiny_bert(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          random_init=True)
    deepseek = save_deepseek(tmp_path / "deepseek")
    causal = lambda model, mesh: {"model": str(model), "task": "causal-lm", "mesh": mesh}
    meshes = [None, {"data": 8}, {"fsdp": 8}, MESH_2x2x2]
    # plus gradient accumulation on the mesh: 4 micro-batches of 8 vs one batch of 32 on one device
    accum = [dict(causal(llama, None), batch=32), dict(causal(llama, MESH_2x2x2), batch=32, grad_accum=4)]
    scanned = dict(causal(llama, MESH_2x2x2), scan_layers=True, remat="full")
    long = causal(llama, {"fsdp": 2, "sequence": 2, "tensor": 2})                 # sequence parallelism
    runs = [dict(causal(llama, m), count_reads=m == {"fsdp": 8}) for m in meshes]
    a = start({"runs": runs + accum + [scanned, long]}, tmp_path / "a.json")
    bert_run = lambda mesh, i: {"model": str(bert), "task": "sequence-classification", "mesh": mesh,  # noqa: E731
                                "params_out": str(tmp_path / f"bert{i}.npz")}
    ds_meshes = (None, {"fsdp": 2, "expert": 4}, MESH_2x2x2)
    b = start({"runs": [bert_run(m, i) for i, m in enumerate((None, MESH_2x2x2, {"data": 2, "sequence": 4}))]
               + [dict(causal(deepseek, m), all_gathers=True, params_out=str(tmp_path / f"ds{i}.npz"))
                  for i, m in enumerate(ds_meshes)]
               + [dict(causal(deepseek, {"fsdp": 2, "expert": 4}), scan_layers=True),
                  dict(causal(deepseek, {"sequence": 2, "expert": 4}), params_out=str(tmp_path / "ds3.npz"))]},
              tmp_path / "b.json")
    llama_runs, (bert_1, bert_8, bert_sp, ds_1, ds_ep, ds_8, ds_scan, ds_sp) = finish(a), finish(b)
    big, accumulated, llama_scan, llama_sp = llama_runs[-4:]
    np.testing.assert_allclose(accumulated["losses"], big["losses"], rtol=1e-5, err_msg="grad_accum 4 x 8 vs 32")
    # Adam's updates hardly depend on the gradient's scale: the norm before the optimizer does
    np.testing.assert_allclose(accumulated["grad_norms"], big["grad_norms"], rtol=1e-5, err_msg="grad_accum norms")
    llama_runs = llama_runs[:-4]

    for mesh, run in zip(meshes[1:], llama_runs[1:]):
        assert_same_losses(llama_runs[0], run, f"llama {mesh}")
    assert_same_losses(bert_1, bert_8, "bert (2, 2, 2)")
    assert_same_losses(ds_1, ds_ep, "deepseek (fsdp 2, expert 4)")
    assert_same_losses(ds_1, ds_8, "deepseek (2, 2, 2)")
    assert_same_losses(llama_runs[0], llama_scan, "llama scanned + remat (2, 2, 2)")
    assert_same_losses(ds_1, ds_scan, "deepseek scanned (fsdp 2, expert 4)")
    assert_same_losses(llama_runs[0], llama_sp, "llama (fsdp 2, sequence 2, tensor 2)")
    assert_same_losses(bert_1, bert_sp, "bert (data 2, sequence 4)")
    assert_same_losses(ds_1, ds_sp, "deepseek (sequence 2, expert 4)")
    for i, label in enumerate(["bert (2, 2, 2)", "bert (data 2, sequence 4)"], 1):
        assert_same_params(tmp_path / "bert0.npz", tmp_path / f"bert{i}.npz", label)
    for i, label in enumerate(["deepseek (fsdp 2, expert 4)", "deepseek (2, 2, 2)",
                               "deepseek (sequence 2, expert 4)"], 1):
        assert_same_params(tmp_path / "ds0.npz", tmp_path / f"ds{i}.npz", label)
    # Under `sequence` the batches' token axis is split too.
    assert llama_sp["batch_spec"] == [["data", "fsdp"], "sequence"]
    assert bert_sp["batch_spec"] == [["data", "fsdp"], "sequence"]
    assert llama_runs[0]["batch_spec"] == [["data", "fsdp"], None]
    assert llama_runs[0]["losses"][-1] < llama_runs[0]["losses"][0]       # it trains

    # Shardings as the rules say: FSDP over the model width, tensor over heads / MLP / vocab, experts.
    one, fsdp, mixed = llama_runs[0]["params"], llama_runs[2]["params"], llama_runs[3]["params"]
    q = "model.layers.0.self_attn.q_proj.kernel"                           # [D=32, N=4, H=8]
    assert one[q]["shard_shape"] == [32, 4, 8]
    assert fsdp[q]["spec"] == ["fsdp", None, None] and fsdp[q]["shard_shape"] == [4, 4, 8]
    assert mixed[q]["spec"] == ["fsdp", "tensor", None] and mixed[q]["shard_shape"] == [16, 2, 8]
    assert mixed["model.embed_tokens.embedding"]["spec"] == ["tensor", "fsdp"]
    assert mixed["model.layers.1.mlp.down_proj.kernel"]["spec"] == ["tensor", "fsdp"]
    assert llama_runs[1]["params"][q]["spec"] == [None, None, None]         # pure data parallelism
    experts = ds_ep["params"]["model.layers.1.mlp.experts.gate_proj.kernel"]   # [E=8, D=32, F=16]
    assert experts["spec"] == ["expert", "fsdp", None] and experts["shard_shape"] == [2, 16, 16]
    # Expert parallelism: each device gathers only its own 2 experts' width over fsdp, never all 8.
    assert "f32[2,32,16]" in ds_ep["all_gathers"], ds_ep["all_gathers"]
    full = {"f32[8,32,16]", "f32[8,16,32]"}                                     # all 8 experts' gate/up, down
    assert not full & set(ds_ep["all_gathers"] + ds_8["all_gathers"]), ds_ep["all_gathers"]
    latent = ds_8["params"]["model.layers.0.self_attn.kv_b_proj.kernel"]       # [R=12, N=4, P+V=14]
    assert latent["spec"] == ["fsdp", "tensor", None]
    # Scanned: the layer axis leads and stays whole; the rest is sharded as in a looped model.
    stacked = llama_scan["params"]["model.layers.self_attn.q_proj.kernel"]    # [L=2, D=32, N=4, H=8]
    assert stacked["spec"] == [None, "fsdp", "tensor", None] and stacked["shard_shape"] == [2, 16, 2, 8]
    experts = ds_scan["params"]["model.layers.mlp.experts.gate_proj.kernel"]  # MoE layers [1, E=8, D, F]
    assert experts["spec"] == [None, "expert", "fsdp", None] and experts["shard_shape"] == [1, 2, 16, 16]
    assert "model.dense_layers.mlp.gate_proj.kernel" in ds_scan["params"]

    # Loading under fsdp=8: every device's shard is its own slice read, and each slice is read once.
    reads = llama_runs[2]["reads"]["model.layers.0.self_attn.q_proj.weight"]  # HF [N*H=32, D=32] float32
    assert reads == [32 * 4 * 4] * 8, reads

    # The optimizer state mirrors the parameters: under fsdp=8 each device holds 1/8 of params + state.
    run = llama_runs[2]
    state = list(run["params"].values()) + run["opt_state"]
    total, per_device = sum(x["bytes"] for x in state), sum(x["shard_bytes"] for x in state)
    assert per_device <= total / 8 * 1.1, (per_device, total)
    moments = [x for x in run["opt_state"] if x["shape"] == [32, 4, 8]]
    assert len(moments) == 4 and all(x["shard_shape"] == [4, 4, 8] for x in moments)   # mu, nu of both q_proj


def test_sequence_axis_needs_lengths_it_divides():
    """Every batch's token axis is split evenly over `mesh.sequence`, so the padded lengths must divide."""
    from jax.sharding import AbstractMesh

    from jaxft.config import ConfigError, load_config
    from jaxft.train.loop import check_batch

    mesh = AbstractMesh((1, 1, 4, 1, 1), parallel.MESH_AXES)
    base = ["model.name_or_path=x", "data.train=x.tsv", "train.batch_size=8"]
    check_batch(load_config(None, base + ["data.max_length=64"]), mesh)
    with pytest.raises(ConfigError, match="data.max_length=66 must be divisible by mesh.sequence=4"):
        check_batch(load_config(None, base + ["data.max_length=66"]), mesh)
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of=6 must be divisible by mesh.sequence=4"):
        check_batch(load_config(None, base + ["data.pad_to_multiple_of=6"]), mesh)
    from jax.sharding import PartitionSpec as P

    assert parallel.batch_sharding(mesh, 2).spec == P(("data", "fsdp"), "sequence")
    assert parallel.batch_sharding(mesh, 1).spec == P(("data", "fsdp"))
