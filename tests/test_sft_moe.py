"""DeepSeek SFT through the CLI: the loss falls, router statistics are logged, the router can be frozen.
The run scans its layers (`model.scan_layers`: a dense stack and an MoE stack), so the CLI's train,
checkpoint and export path is exercised on stacked parameters too."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT
from jaxft.cli import main
from sft_helpers import save_tiny_deepseek

PAIRS = {f"w{i}": f"d{(3 * i + 1) % 20}" for i in range(10)}


def test_deepseek_sft_logs_router_stats_and_freezes_the_router(tmp_path):
    folder = save_tiny_deepseek(tmp_path / "tiny")
    rows = [{"prompt": f"map {w}", "completion": d} for _ in range(4) for w, d in PAIRS.items()]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "sft_tiny.yaml"), f"model.name_or_path={folder}",
                 f"data.train={tmp_path / 'rows.jsonl'}", "data.format=prompt_completion", "data.packing=false",
                 "train.steps=40", "train.log_every=10", "model.moe.aux_loss_coef=0.01",
                 "model.moe.freeze_router=true", "model.scan_layers=true", f"output_dir={run}"]) == 0
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    for row in train:
        assert row["moe_load_max"] >= 1.0 >= row["moe_load_min"] >= 0.0
        assert row["moe_load_ratio"] >= 1.0 and row["moe_balance_loss"] > 0

    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert sorted(before) == sorted(after)
    routers = [k for k in before if k.endswith("mlp.gate.weight")]
    assert routers and all(np.array_equal(before[k], after[k]) for k in routers)  # frozen
    assert all(np.array_equal(before[k], after[k]) for k in before if k.endswith("e_score_correction_bias"))
    assert not np.array_equal(before["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"],
                              after["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"])  # the rest trained


@pytest.mark.slow  # two CLI runs: ~40 s on a loaded 2-core machine
def test_aux_loss_coef_adds_coef_times_the_summed_balance_loss(tmp_path):
    """The logged step-1 loss (before any update) with `model.moe.aux_loss_coef=c` is the coef-0 loss plus
    c × Σ over MoE layers of the balance loss (2 MoE layers: 2 × the logged layer mean)."""
    folder = save_tiny_deepseek(tmp_path / "tiny")
    rows = [{"prompt": f"map {w}", "completion": d} for w, d in PAIRS.items()]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = {}
    for coef in (0.0, 0.5):
        run = tmp_path / f"run{coef}"
        assert main(["train", str(ROOT / "configs" / "sft_tiny.yaml"), f"model.name_or_path={folder}",
                     f"data.train={tmp_path / 'rows.jsonl'}", "data.format=prompt_completion", "data.packing=false",
                     "train.steps=1",
                     "train.log_every=1", f"model.moe.aux_loss_coef={coef}", f"output_dir={run}"]) == 0
        first[coef] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    balance = first[0.0]["moe_balance_loss"]
    assert balance == first[0.5]["moe_balance_loss"] > 0.5
    assert first[0.5]["loss"] - first[0.0]["loss"] == pytest.approx(0.5 * 2 * balance, rel=1e-4)


def test_router_load_is_aggregated_over_the_logging_window():
    """A window's expert load comes from the tokens routed over all its steps (summed counts), not from
    one step's or an average of per-step ratios; its balance loss is the mean over the steps."""
    from jaxft.objectives.supervised import CausalLMTask

    step1 = np.array([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])  # [layers, experts]
    step2 = np.array([[0.0, 2.0, 2.0, 4.0], [4.0, 0.0, 2.0, 2.0]])
    window = {"loss": 2 * 3.0, "grad_norm": 2.0, "weight": 16.0, "tokens": 16.0, "slots": 20.0,
              "moe_counts": step1 + step2, "moe_balance_loss": 1.2 + 1.6}
    m = CausalLMTask.train_metrics(window, 2)
    counts = step1 + step2                                          # [[6, 4, 2, 4], [6, 2, 4, 4]]
    share = counts * 4 / counts.sum(-1, keepdims=True)
    assert m["moe_load_max"] == pytest.approx(share.max()) == pytest.approx(1.5)
    assert m["moe_load_min"] == pytest.approx(share.min()) == pytest.approx(0.5)
    assert m["moe_load_ratio"] == pytest.approx(3.0)                  # 6 / 2, in both layers
    assert m["moe_balance_loss"] == pytest.approx(1.4)
    assert m["loss"] == pytest.approx(3.0)
