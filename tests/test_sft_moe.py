"""DeepSeek SFT through the CLI: the loss falls, router statistics are logged, the router can be frozen.
The run scans its layers (`model.scan_layers`: a dense stack and an MoE stack), so the CLI's train,
checkpoint and export path is exercised on stacked parameters too."""

from __future__ import annotations

import json

import numpy as np
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
