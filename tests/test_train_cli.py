"""End to end through the `jaxft` command: train on SST-2, resume, eval, export, PyTorch reload."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from conftest import forward, save_tiny_bert, shared_data
from jaxft.cli import main


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def sst2_config(tmp_path, minilm_dir):
    sst2 = shared_data("sst2")
    cfg = tmp_path / "sst2.yaml"
    cfg.write_text(f"""
model: {{name_or_path: {minilm_dir}, task: sequence-classification}}
data: {{train: {sst2 / 'train.tsv'}, text_field: sentence, label_field: label, max_length: 48,
        max_train_rows: 800, validation_fraction: 0.2, cache_dir: {tmp_path / 'cache'}}}
optim: {{lr: 1.0e-4, weight_decay: 0.01, warmup_ratio: 0.1}}
train: {{batch_size: 32, steps: 16, eval_every: 8, log_every: 4}}
checkpoint: {{keep: 1}}
output_dir: {tmp_path / 'run'}
""")
    return cfg


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_resume_eval_export(sst2_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(["train", sst2_config, "train.steps=12"], capsys)
    assert code == 0, err
    assert "eval accuracy:" in out
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [4, 8, 12]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
    assert {"loss", "lr", "accuracy", "grad_norm"} <= set(train_rows[0])
    assert [r["step"] for r in rows if r["split"] == "eval"] == [8, 12]
    assert {"loss", "accuracy", "macro_f1"} <= set(rows[-1])
    assert (run_dir / "config.yaml").exists() and (run_dir / "labels.json").exists()
    assert any((run_dir / "tensorboard").iterdir())

    # The same command with more steps resumes from step 12 and does not log any step twice.
    code, out, err = run(["train", sst2_config], capsys)
    assert code == 0, err
    assert "resumed from step 12" in (run_dir / "train.log").read_text()
    rows = read_metrics(run_dir)
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)) and (16, "train") in keys and (16, "eval") in keys
    # keep=1 plus the best checkpoint
    kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    evals = {r["step"]: r["accuracy"] for r in rows if r["split"] == "eval"}
    assert 16 in kept and len(kept) <= 2 and max(evals[s] for s in kept) == max(evals.values()), evals

    code, out, err = run(["eval", sst2_config, f"checkpoint={run_dir}"], capsys)
    assert code == 0, err

    export = tmp_path / "export"
    code, out, err = run(["export", run_dir, export], capsys)
    assert code == 0, err
    code, _, err = run(["export", run_dir, export], capsys)
    assert code == 2 and "--overwrite" in err
    torch_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch_model.config.id2label == {0: "0", 1: "1"}

    from jaxft.train.run import restore_model

    model, _, _ = restore_model(run_dir)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    enc = tok(["a triumph of style", "it never takes off ."], padding=True, return_tensors="np")
    ours = np.asarray(forward(model, enc["input_ids"], attention_mask=enc["attention_mask"],
                            token_type_ids=enc["token_type_ids"]))
    with torch.no_grad():
        ref = torch_model.eval()(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def tiny_setup(tmp_path, minilm_dir, rows, val_rows=None):
    model = save_tiny_bert(tmp_path / "tiny", vocab_size=30522, num_labels=2, tokenizer_from=minilm_dir)
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    lines = [f"model: {{name_or_path: {model}}}",
             f"data: {{train: {tmp_path / 'train.tsv'}, cache_dir: {tmp_path / 'cache'}}}",
             "train: {batch_size: 2, steps: 2}", f"output_dir: {tmp_path / 'run'}"]
    if val_rows is not None:
        (tmp_path / "val.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in val_rows))
        lines[1] = lines[1][:-1] + f", validation: {tmp_path / 'val.tsv'}}}"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg, model


ROWS = [("good", "pos"), ("bad", "neg"), ("fine", "pos"), ("awful", "neg")]


@pytest.mark.parametrize("overrides, message", [
    (["optim.betas=0.9"], "config key 'optim.betas': unknown key"),
    (["train.steps=many"], "config key 'train.steps': Input should be a valid integer"),
    (["data.train=/nonexistent/train.tsv"], "data.train: data file /nonexistent/train.tsv does not exist"),
    (["data.text_field=sentence"], "data.text_field='sentence' is not a column"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, minilm_dir, capsys, overrides, message):
    cfg, _ = tiny_setup(tmp_path, minilm_dir, ROWS)
    code, _, err = run(["train", cfg, *overrides], capsys)
    assert code == 2 and message in err, err


def test_label_unseen_in_train_in_validation(tmp_path, minilm_dir, capsys):
    cfg, _ = tiny_setup(tmp_path, minilm_dir, ROWS, val_rows=[("meh", "neutral")])
    code, _, err = run(["train", cfg], capsys)
    assert code == 2 and "label 'neutral' in row 1 of" in err and "never appears in the train data" in err


def test_model_folder_without_weights(tmp_path, minilm_dir, capsys):
    cfg, model = tiny_setup(tmp_path, minilm_dir, ROWS)
    (model / "model.safetensors").unlink()
    code, _, err = run(["train", cfg], capsys)
    assert code == 2 and "has no weights" in err and str(model) in err


def test_tiny_run_checkpoints_and_exports(tmp_path, minilm_dir, capsys):
    cfg, _ = tiny_setup(tmp_path, minilm_dir, ROWS)
    code, out, err = run(["train", cfg], capsys)
    assert code == 0, err
    code, out, err = run(["export", tmp_path / "run", tmp_path / "export"], capsys)
    assert code == 0, err
    exported = transformers.AutoConfig.from_pretrained(tmp_path / "export")
    assert exported.id2label == {0: "neg", 1: "pos"} and exported.label2id == {"neg": 0, "pos": 1}
    assert (tmp_path / "export" / "tokenizer.json").exists()
    shutil.rmtree(tmp_path / "export")
