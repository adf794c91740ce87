"""A run records the base it was trained on (issue 14 B7): eval, export and generate use the run's own
tokenizer, and a base whose weights changed since training is refused, naming both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import transformers

from jaxft.cli import main
from sft_helpers import save_tiny_llama


def test_changed_base_is_refused_and_the_runs_tokenizer_is_used(tmp_path, capsys):
    folder = save_tiny_llama(tmp_path / "tiny")
    original = tmp_path / "original"
    shutil.copytree(folder, original)
    rows = [{"text": f"w{i} d{i} w{i + 1}"} for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["train", str(Path(__file__).parents[1] / "configs" / "sft_tiny.yaml"),
                 f"model.name_or_path={folder}", f"data.train={tmp_path / 'rows.jsonl'}", "data.format=text",
                 "data.packing=false", "train.batch_size=4", "train.steps=2", f"output_dir={run}"]) == 0

    # the base folder's tokenizer changes after training: exports keep the run's
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.add_tokens(["brand_new_token"])
    tok.save_pretrained(str(folder))
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert "brand_new_token" not in exported.get_vocab() and len(exported) == len(tok) - 1

    # the base's weights change: export and generate are refused, naming the recorded and the current base
    save_tiny_llama(folder, seed=9)
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "export2")]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "different weights" in err and "sha256" in err, err
    assert not (tmp_path / "export2").exists()
    assert main(["generate", str(run), "--prompt", "w1"]) == 2
    # the original weights back (same bytes, same hash): accepted again
    for f in original.glob("*.safetensors"):
        shutil.copy(f, folder / f.name)
    assert main(["export", str(run), str(tmp_path / "export3")]) == 0
