"""A chat SFT run teaches a tiny Llama a mapping it could not do before (exact match of generations)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

import jaxft
from conftest import ROOT
from jaxft.cli import main
from sft_helpers import save_tiny_llama

PAIRS = {f"w{i}": f"d{(7 * i + 3) % 20}" for i in range(12)}


def exact_match(model, tok) -> float:
    hits = 0
    for w, d in PAIRS.items():
        prompt = tok.apply_chat_template([{"role": "user", "content": f"map {w}"}], add_generation_prompt=True,
                                         tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        out = np.asarray(jaxft.generate(model, np.array([prompt], np.int32), max_new_tokens=3))[0]
        hits += tok.convert_ids_to_tokens(out[:2].tolist()) == [d, "</s>"]
    return hits / len(PAIRS)


@pytest.mark.slow
def test_chat_sft_learns_a_mapping(tmp_path, capsys):
    folder = save_tiny_llama(tmp_path / "tiny")
    rows = [{"messages": [{"role": "user", "content": f"map {w}"}, {"role": "assistant", "content": d}]}
            for _ in range(4) for w, d in PAIRS.items()]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    before = exact_match(jaxft.load_model(folder, task="causal-lm"), tok)

    run = tmp_path / "run"
    code = main(["train", str(ROOT / "configs" / "sft_tiny.yaml"), f"model.name_or_path={folder}",
                 f"data.train={tmp_path / 'rows.jsonl'}", "data.validation_fraction=0.1", f"output_dir={run}"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["loss"] < 0.2 * train[0]["loss"]
    assert {"trained_tokens_per_step", "padding_fraction"} <= set(train[0])
    assert 0 <= train[0]["padding_fraction"] < 0.5  # packed rows are mostly full
    assert "perplexity" in [r for r in rows if r["split"] == "eval"][-1]

    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    exported = jaxft.load_model(tmp_path / "export", task="causal-lm")
    after = exact_match(exported, tok)
    assert before <= 0.25 and after == 1.0, (before, after)
    # transformers generation on the export stops where the model learned to stop
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "export")
    assert gen.eos_token_id == tok.eos_token_id
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "export").chat_template == tok.chat_template


@pytest.mark.slow
def test_generate_cli_from_a_run_directory(tmp_path, capsys):
    folder = save_tiny_llama(tmp_path / "tiny")
    rows = [{"prompt": f"map {w}", "completion": d} for _ in range(4) for w, d in PAIRS.items()]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "sft_tiny.yaml"), f"model.name_or_path={folder}",
                 "data.format=prompt_completion", "data.packing=false", f"data.train={tmp_path / 'rows.jsonl'}",
                 f"output_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "map w5", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == PAIRS["w5"]
