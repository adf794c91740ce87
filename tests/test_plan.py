"""`jaxft plan`: parameter counts against the analytic formula, per-device memory on described pod meshes
and on this machine (compiled), remat's effect, model folders holding only config.json, the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from jaxft import cli
from jaxft.config import load_config
from jaxft.plan import CHIPS, GiB, plan, preflight

DEEPSEEK_V3 = {  # config.json of deepseek-ai/DeepSeek-V3 (the fields that shape the model)
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rope_theta": 10000, "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "hidden_act": "silu", "attention_bias": False}
LLAMA3_8B = {  # config.json of meta-llama/Meta-Llama-3.1-8B
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def deepseek_v3_count(c: dict) -> int:
    D, V, L, N = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["num_attention_heads"]
    Q, R, P, O, Vh = c["q_lora_rank"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    E, F, k_dense = c["n_routed_experts"], c["moe_intermediate_size"], c["first_k_dense_replace"]
    attention = D * Q + Q + Q * N * (P + O) + D * (R + O) + R + R * N * (P + Vh) + N * Vh * D
    norms = 2 * D
    dense_mlp = 3 * D * c["intermediate_size"]
    moe = E * 3 * D * F + c["n_shared_experts"] * 3 * D * F + D * E      # routed + shared + router
    return k_dense * (attention + norms + dense_mlp) + (L - k_dense) * (attention + norms + moe) + 2 * V * D + D


def llama_count(c: dict) -> int:
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    H = D // c["num_attention_heads"]
    attention = 2 * D * D + 2 * D * c["num_key_value_heads"] * H
    return L * (attention + 3 * D * F + 2 * D) + 2 * V * D + D


def write_run(tmp_path: Path, hf_config: dict, **sections) -> Path:
    """A model folder with config.json only, and a config YAML with no data files."""
    folder = tmp_path / hf_config["model_type"]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config))
    cfg = {**sections, "model": {"name_or_path": str(folder), "task": "causal-lm", **sections.get("model", {})}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# README / configs/deepseek_v3_pod.yaml: params 10.5 + optimizer state 21.0 + gradients 10.5 + activations
# 14.7 (the chunked LM loss's) = peak 56.7 GiB per chip; fits v5p (95), H100 (80), H200 (141); not v4/v6e
# (32) or v5e (16).
README_POD_GIB = {"params": 10.5, "opt_state": 21.0, "gradients": 10.5, "activations": 14.7, "peak": 56.7}
README_POD_FITS = {"TPU v4": False, "TPU v5e": False, "TPU v5p": True, "TPU v6e": False, "H100": True, "H200": True}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_deepseek_v3_on_a_described_pod(tmp_path, scan_layers):
    path = write_run(tmp_path, DEEPSEEK_V3, model={"dtype": "bfloat16", "remat": "full", "scan_layers": scan_layers},
                     data={"max_length": 4096}, train={"batch_size": 256}, mesh={"fsdp": 64, "expert": 4})
    p = plan(load_config(path))
    assert p.param_count == deepseek_v3_count(DEEPSEEK_V3) == 671_026_404_352
    assert p.method == "analytic" and p.devices == 256 and p.local_devices == 1
    assert p.mesh == {"data": 1, "fsdp": 64, "sequence": 1, "expert": 4, "tensor": 1}
    assert p.batch == {"global": 256, "grad_accum": 1, "per_device": 4, "length": 4096, "length_per_device": 4096}
    d = p.per_device
    total = p.param_count * 4                                          # float32 master weights
    # Routed experts (97% of the weights) are split 256 ways (expert × fsdp), the rest 64 ways (fsdp).
    assert total / 256 < d["params"] < total / 256 * 1.1
    assert d["opt_state"] == pytest.approx(2 * d["gradients"], rel=1e-6)   # Adam's mu and nu, float32
    # everything trains but the routers' score-correction biases (buffers): 58 × 256 floats
    assert 0 <= d["params"] - d["gradients"] <= 58 * 256 * 4
    assert d["peak"] == d["params"] + d["opt_state"] + d["gradients"] + d["activations"]
    for key, gib in README_POD_GIB.items():  # the figures README and the recipe print, within ±10%
        assert d[key] / GiB == pytest.approx(gib, rel=0.1), key
    assert set(p.fits()) == set(CHIPS) and p.fits() == README_POD_FITS


def test_llama3_8b_fsdp_shards_every_weight(tmp_path):
    path = write_run(tmp_path, LLAMA3_8B, data={"max_length": 2048}, train={"batch_size": 16}, mesh={"fsdp": 8})
    cfg = load_config(path)
    p = plan(cfg)
    assert p.param_count == llama_count(LLAMA3_8B) == 8_030_261_248
    assert p.per_device["params"] == p.param_count * 4 // 8              # every weight has the model width
    # remat keeps only each block's input for the backward pass: far fewer activation bytes
    cfg.model.remat = "full"
    remat = plan(cfg)
    assert remat.per_device["activations"] < p.per_device["activations"] / 2
    assert remat.per_device["params"] == p.per_device["params"]
    # scanned layers: the same parameters and (under remat full) the same saved block inputs
    cfg.model.scan_layers = True
    scanned = plan(cfg)
    assert scanned.param_count == p.param_count and scanned.per_device["params"] == p.per_device["params"]
    assert scanned.per_device["activations"] == pytest.approx(remat.per_device["activations"], rel=1e-3)


def test_compiled_plan_on_this_machine(tmp_path, caplog):
    tiny = dict(LLAMA3_8B, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    path = write_run(tmp_path, tiny, data={"max_length": 64}, train={"batch_size": 8})
    p = plan(load_config(path))
    assert p.method == "compiled" and p.devices == 1
    d = p.per_device
    batch = 8 * 64 * 4 * 3 + 8 * 4                                      # three int32 [B, T] arrays + weights
    # the step's arguments: parameters, optimizer state, the batch and a few scalars
    assert d["params"] + d["opt_state"] + batch <= d["xla_arguments"] <= d["params"] + d["opt_state"] + batch + 64
    assert d["peak"] >= d["xla_arguments"] and d["xla_temp"] > 0

    # the same numbers drive the pre-training check, which warns when a device is too small
    from types import SimpleNamespace

    import jaxft
    from jaxft import parallel
    from jaxft.optim import make_optimizer
    from jaxft.train.losses import causal_lm_loss
    from jaxft.train.step import Functional, init_state

    cfg = load_config(path)
    mesh = parallel.make_mesh({"data": 1})
    fn = Functional(jaxft.load_model(_weights(tmp_path, tiny), task="causal-lm", mesh=mesh))
    state = init_state(fn, make_optimizer(cfg.optim, 10)[0], 0)
    small = SimpleNamespace(memory_stats=lambda: {"bytes_limit": 100_000})
    with caplog.at_level(logging.INFO, logger="jaxft"):
        estimate = preflight(cfg, fn, state, mesh, causal_lm_loss, device=small)
    assert "may run out of memory" in caplog.text
    assert estimate == pytest.approx(d["params"] * 2 + d["opt_state"] + 16 + d["activations"], abs=64)
    assert preflight(cfg, fn, state, mesh, causal_lm_loss) is None        # CPU reports no memory limit


def _weights(tmp_path: Path, hf_config: dict) -> Path:
    """A random model of `hf_config` saved with transformers (the compiled plan needs none; preflight does)."""
    import transformers

    folder = tmp_path / "weights"
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_config)).save_pretrained(folder)
    return folder


def test_cli_prints_the_plan_and_json(tmp_path, capsys):
    path = write_run(tmp_path, LLAMA3_8B, data={"max_length": 1024}, train={"batch_size": 64})
    assert cli.main(["plan", str(path), "mesh.fsdp=16", "mesh.tensor=4", "model.remat=full"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248 parameters" in out and "fsdp=16, tensor=4 (64 devices)" in out
    assert "analytic estimate" in out and "TPU v5p (95 GiB): yes" in out
    assert cli.main(["plan", str(path), "mesh.fsdp=4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["devices"] == 4 and data["fits"]["H200"] in (True, False)
    # a batch the mesh cannot split is a user error (exit 2) naming the keys
    assert cli.main(["plan", str(path), "mesh.fsdp=128"]) == 2
    assert "train.batch_size=64 must be divisible by the data-parallel devices (128)" in capsys.readouterr().err


def test_sequence_axis_splits_the_activations(tmp_path):
    """`mesh.sequence=4` on a described mesh: each device traces a quarter of every row's tokens."""
    path = write_run(tmp_path, LLAMA3_8B, data={"max_length": 4096}, train={"batch_size": 32},
                     mesh={"fsdp": 8, "sequence": 4}, model={"remat": "full"})
    cfg = load_config(path)
    p = plan(cfg, devices=32)
    assert p.batch["per_device"] == 4 and p.batch["length_per_device"] == 1024 and p.mesh["sequence"] == 4
    cfg.mesh.sequence, cfg.mesh.expert = 1, 4        # the same 32 devices and rows per device, rows whole
    whole = plan(cfg, devices=32)
    assert whole.batch["length_per_device"] == 4096
    assert p.per_device["activations"] < whole.per_device["activations"] / 2
    assert "1024 tokens of each per device (sequence-parallel)" in p.report()
