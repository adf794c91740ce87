"""Samples during training (`train.samples`): greedy generations of fixed prompts appear in samples.jsonl and
TensorBoard at the configured steps, generated with the parameters of that step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxft.config import ConfigError, load_config
from jaxft.generate import generate
from jaxft.train.loop import Trainer
from jaxft.train.run import restore_run

from sft_helpers import make_tokenizer, save_tiny_llama

PROMPTS = ["map w1", "hello world w3"]


@pytest.mark.slow
def test_samples_at_the_configured_steps_from_that_steps_params(tmp_path):
    model = save_tiny_llama(tmp_path / "llama")
    rows = [{"text": f"map w{i} d{(3 * i) % 20} d{(7 * i) % 20} w{i}"} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    cfg = load_config(None, [f"model.name_or_path={model}", "model.task=causal-lm", f"data.train={tmp_path / 'train.jsonl'}",
                             f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=4", "train.steps=5",
                             "optim.lr=1e-2", f"train.samples.file={tmp_path / 'prompts.txt'}",
                             "train.samples.every=2", "train.samples.max_new_tokens=4", f"output_dir={out}"])
    Trainer(cfg).run()

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in samples] == [(s, p) for s in (2, 4, 5) for p in PROMPTS]
    events = b"".join(f.read_bytes() for f in (out / "tensorboard").iterdir())
    assert b"samples/0" in events and b"samples/1" in events
    for r in samples:
        assert f"{r['prompt']} → {r['completion']}".encode() in events

    assert any(r["completion"] for r in samples[-2:])  # words, not only an immediate end of text
    assert [r["completion"] for r in samples[:2]] != [r["completion"] for r in samples[-2:]]  # the model changed
    # the last samples are the final (step 5) model's greedy continuations
    tok = make_tokenizer()
    final = restore_run(out).model
    for r in samples[-2:]:
        new = generate(final, np.asarray([tok(r["prompt"])["input_ids"]], np.int32), max_new_tokens=4,
                       eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        assert tok.decode(new[0].tolist(), skip_special_tokens=True) == r["completion"]


def test_samples_config_is_checked(tmp_path):
    base = ["model.name_or_path=x", "model.task=causal-lm"]
    with pytest.raises(ConfigError, match="prompts or file"):
        load_config(None, base + ["train.samples.every=2"])
    with pytest.raises(ConfigError, match="model.task=causal-lm"):
        load_config(None, ["model.name_or_path=x", "train.samples.prompts=[hi]"])
