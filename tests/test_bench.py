"""The benchmark harness (jaxft/bench): its FLOP count, its report, and `scripts/bench_gpu.sh --reduced`,
so that the accelerator benchmark is known to run before an accelerator comes."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT
from jaxft.bench.sides import LM_SHAPES, forward_flops, matmul_flops_per_token


def linear_weights(model, skip=()) -> int:
    import torch

    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(s in name for s in skip))


@pytest.mark.parametrize("family", ["llama-untied-gqa", "bert"])
def test_matmul_flops_count_every_linear_layer_of_the_torch_model(family):
    """2 FLOPs per weight of every linear layer a token passes through (the LM head included), counted
    from the PyTorch model; BERT's pooler and classifier see one token per row and are left out."""
    import transformers

    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=80)
        model, skip = transformers.BertForSequenceClassification(cfg), ("pooler", "classifier")
    else:
        cfg = transformers.LlamaConfig(**dict(LM_SHAPES["tiny"], tie_word_embeddings=False, num_attention_heads=8,
                                              num_key_value_heads=2, head_dim=16))
        model, skip = transformers.LlamaForCausalLM(cfg), ()
    assert matmul_flops_per_token(cfg) == 2 * linear_weights(model, skip)
    # attention: QKᵀ and PV, 2·t²·(heads·head_dim) FLOPs each per layer
    heads_dim = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    extra = forward_flops(cfg, [10]) - 10 * matmul_flops_per_token(cfg)
    assert extra == 4 * cfg.num_hidden_layers * heads_dim * 100


def fake_step_result(step_s, rss_gib, flops_per_s=1e9):
    return {"first_step_s": 10.0, "step_s": step_s, "examples_per_s": [8 / s for s in step_s],
            "tokens_per_s": [2048 / s for s in step_s], "model_flops_per_s": [flops_per_s] * len(step_s),
            "matmul_peak_flops": 1e10, "peak_rss_bytes": int(rss_gib * 2**30), "trainable_params": 100}


def test_report_states_each_target_met_or_missed_by_how_much(tmp_path):
    from jaxft.bench.report import write_report

    results = {"llama-135m": {"params": {"batch": 8}, "sides": {
        "jaxft": fake_step_result([1.0, 1.2, 0.9, 5.0, 1.1], rss_gib=8.0),     # median 1.1 s
        "torch": fake_step_result([1.0, 1.0, 1.0], rss_gib=6.0)}},
        "moe": {"params": {}, "sides": {"jaxft": {"layer_s": {"8": [0.1], "64": [0.2]}},
                                        "torch": {"layer_s": {"8": [0.4], "64": [1.6]}}}}}
    out = tmp_path / "B.md"
    write_report(results, out, reduced=False, argv=["bench", "llama-135m", "moe"])
    text = out.read_text()
    assert "| step (median) | 1.100 s | 1.000 s | 0.91 |" in text
    assert "| MFU | 0.100 | 0.100 | 1.00 |" in text
    # rates: higher is better, so jaxft's over PyTorch's (a slower jaxft is below 1 on every row)
    assert "| tokens/s (real) | 1862 | 2048 | 0.91 |" in text
    # speed 1.0/1.1 = 0.909 against 1.1: missed by 17%; memory 6/8 = 0.75 against 1.0: missed by 25%
    assert "target step ≥ 1.1× PyTorch: 0.91× — missed by 17%" in text
    assert "target peak memory ≤ PyTorch's: 0.75× — missed by 25%" in text
    assert "| jaxft | 100.0 ms | 200.0 ms | 2.00× |" in text
    assert "| PyTorch (transformers) | 400.0 ms | 1600.0 ms | 4.00× |" in text
    assert "versions: Python" in text and "command: `jaxft bench llama-135m moe`" in text
    assert "LoRA vs full" not in text      # only when both LM workloads ran


def test_report_compares_lora_with_full_fine_tuning(tmp_path):
    """The LoRA issue's target, jaxft's LoRA step against its own full step (≤ 0.75×), with XLA's
    compiled-program memory of both."""
    from jaxft.bench.report import write_report

    def side(step_s, temp_gib):
        return dict(fake_step_result(step_s, rss_gib=4.0), xla_bytes={"temporaries": int(temp_gib * 2**30)})

    torch = fake_step_result([1.0], rss_gib=6.0)
    results = {"llama-135m": {"params": {}, "sides": {"jaxft": side([2.0, 2.0, 2.2], 3.0), "torch": torch}},
               "llama-135m-lora": {"params": {}, "sides": {"jaxft": side([1.6, 1.7, 1.6], 1.5), "torch": torch}}}
    out = tmp_path / "B.md"
    write_report(results, out, reduced=False, argv=["bench"])
    text = out.read_text()
    assert "| step (median) | 2.000 s | 1.600 s | 0.80 |" in text
    assert "| compiled step temporaries (XLA) | 3.00 GiB | 1.50 GiB | 0.50 |" in text
    # 0.8 against at most 0.75: 0.8 / 0.75 = 1.067, missed by 7%
    assert "target LoRA step ≤ 0.75× the full step: 0.80× — missed by 7%" in text


@pytest.mark.slow
def test_bench_gpu_runs_in_reduced_mode():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), "--reduced"], capture_output=True,
                          text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["lora_rank"] for r in runs] == [None, 4]
    full, lora = runs
    assert lora["trainable_params"] < full["trainable_params"] / 10
    for r in runs:
        assert r["step_s"][0] > 0 and 0 < r["mfu"] < 1, r
    assert proc.stdout.count("| tiny | 2 × 64 |") == 2


def test_profile_kinds_and_report_table(tmp_path):
    """Ops are summed into the same kinds on both sides (XLA fusion names, ATen op names), the time outside
    any op is the wall time left over, and the report shows both sides' kinds and largest ops."""
    from jaxft.bench import profile
    from jaxft.bench.report import write_report

    xla = profile.summarise({"ynn_fusion": 3.0, "dot": 1.0, "copy_bitcast_fusion": 2.0, "transpose_copy_fusion": 0.5,
                             "multiply_add_fusion": 1.5}, wall=10.0, steps=2,
                            matmul=profile._XLA_MATMUL, copy=profile._XLA_COPY)
    assert xla["kinds"] == {"matmul": 2.0, "layout copy": 1.25, "other ops": 0.75, "not in an op": 1.0}
    assert xla["top"][0] == ["ynn_fusion", 1.5]
    aten = profile.summarise({"aten::addmm": 4.0, "aten::_scaled_dot_product_flash_attention_for_cpu": 1.0,
                              "aten::copy_": 1.0, "aten::mul": 2.0}, wall=8.0, steps=1,
                             matmul=profile._TORCH_MATMUL, copy=profile._TORCH_COPY)
    assert aten["kinds"] == {"matmul": 5.0, "layout copy": 1.0, "other ops": 2.0, "not in an op": 0.0}

    sides = {"jaxft": dict(fake_step_result([1.0], rss_gib=1.0), profile=xla),
             "torch": dict(fake_step_result([1.0], rss_gib=1.0), profile=aten)}
    out = tmp_path / "B.md"
    write_report({"llama-135m": {"params": {}, "sides": sides}}, out, reduced=True, argv=["bench"])
    text = out.read_text()
    assert "| layout copy | 1.250 | 1.000 |" in text and "| not in an op | 1.000 | 0.000 |" in text
    assert "Largest jaxft ops: `ynn_fusion` 1.500 s" in text and "Largest PyTorch ops: `aten::addmm` 4.000 s" in text


def test_a_near_miss_is_not_reported_as_zero_percent():
    from jaxft.bench.report import _percent

    assert (_percent(1 - 1.297 / 1.3), _percent(0.17), _percent(0.0)) == ("0.2%", "17%", "0.0%")


def test_rollout_workload_runs_both_sides_reduced(tmp_path):
    """`jaxft bench rollout --reduced`: both samplers make every token of every row (no early stop), and the
    report gives tokens/s with the ratio jaxft / PyTorch and the target line."""
    from jaxft.bench import run

    out = tmp_path / "BENCHMARKS.md"
    results = run(["rollout"], reduced=True, out=out, log=lambda *a: None)
    sides = results["rollout"]["sides"]
    assert {s: r["new_tokens"] for s, r in sides.items()} == {"jaxft": 2 * 2 * 8, "torch": 2 * 2 * 8}
    assert all(len(r["call_s"]) == 2 and min(r["call_s"]) > 0 for r in sides.values())
    text = out.read_text()
    assert "new tokens/s" in text and "tokens/s ≥ 2× transformers generate" in text
