"""Preference pairs: the response tokens of chat and plain rows, loud errors naming the row and field, and the
sequence log-probs jaxft computes for a tiny random Llama chat batch against the `transformers` model's."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxft
from jaxft.config import load_config
from jaxft.data.preference import PairBatches, build_pairs
from jaxft.data.sources import DataError
from jaxft.objectives.preference import _both_sides, sequence_logps

from causal_helpers import build_hf
from sft_helpers import make_tokenizer

PROMPTS = [[{"role": "user", "content": "map w1"}],
           [{"role": "user", "content": "map w2"}, {"role": "assistant", "content": "d2"},  # multi-turn prompt:
            {"role": "user", "content": "map w3 please"}],                                   # only the last reply counts
           [{"role": "system", "content": "hello"}, {"role": "user", "content": "map w4"}]]
CHOSEN = [[{"role": "assistant", "content": "d1"}], [{"role": "assistant", "content": "d3 d4 d5"}], "d4"]
REJECTED = [[{"role": "assistant", "content": "d9 d8"}], [{"role": "assistant", "content": "w3"}], "d0 d1 d2 d3"]


def data_cfg(**over):
    return load_config(None, ["model.name_or_path=x", "model.task=causal-lm", "train.objective=dpo"] +
                       [f"data.{k}={v}" for k, v in over.items()]).data


def words(tok, ids, mask):
    return [t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m]


def test_chat_pairs_count_only_the_response():
    tok = make_tokenizer()
    pairs, report = build_pairs({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}, tok, data_cfg(), "train")
    assert len(pairs) == 3 and report.rows_out == 3
    ex = [pairs.chosen.example(i) for i in range(3)]
    assert [words(tok, e["input_ids"], e["loss_mask"]) for e in ex] == [
        ["d1", "</s>"], ["d3", "d4", "d5", "</s>"], ["d4", "</s>"]]
    assert tok.convert_ids_to_tokens(ex[1]["input_ids"].tolist())[:4] == ["<|user|>", "map", "w2", "</s>"]
    rej = pairs.rejected.example(2)
    assert words(tok, rej["input_ids"], rej["loss_mask"]) == ["d0", "d1", "d2", "d3", "</s>"]


def test_plain_text_pairs():
    tok = make_tokenizer()
    pairs, _ = build_pairs({"prompt": ["map w1"], "chosen": ["d1"], "rejected": ["d2 d3"]}, tok, data_cfg(), "train")
    c, r = pairs.chosen.example(0), pairs.rejected.example(0)
    assert tok.convert_ids_to_tokens(c["input_ids"].tolist()) == ["map", "w1", "d1", "</s>"]
    assert words(tok, r["input_ids"], r["loss_mask"]) == ["d2", "d3", "</s>"]


def test_pair_errors_name_the_row_and_field():
    tok = make_tokenizer()
    with pytest.raises(DataError, match=r"no column 'chosen' \(data.chosen_field\)"):
        build_pairs({"prompt": ["a"], "better": ["b"], "rejected": ["c"]}, tok, data_cfg(), "train")
    bad = {"prompt": PROMPTS[:2], "chosen": CHOSEN[:2], "rejected": [REJECTED[0], [{"content": "no role"}]]}
    with pytest.raises(DataError, match=r"data.train, row 2, field 'rejected': rejected must be a list of"):
        build_pairs(bad, tok, data_cfg(on_bad_rows="error"), "train")
    pairs, report = build_pairs(bad, tok, data_cfg(), "train")  # skip (the default) counts it instead
    assert len(pairs) == 1 and report.dropped == {"bad rejected": 1} and report.examples["bad rejected"] == [2]
    empty = {"prompt": PROMPTS[:1], "chosen": [""], "rejected": REJECTED[:1]}
    with pytest.raises(DataError, match="no usable preference pairs"):
        build_pairs(empty, tok, data_cfg(), "train")


def test_sequence_logps_equal_transformers(tmp_path):
    """Σ log p over each response's tokens, from jaxft's Llama (both sides of every pair in one forward pass)
    and from the `transformers` model's logits; prompt tokens and padding are excluded by masks the test
    derives from the chat template itself."""
    tok = make_tokenizer()
    hf = build_hf("llama-gqa-tied", seed=3, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf.save_pretrained(tmp_path / "m")
    model = jaxft.load_model(tmp_path / "m", task="causal-lm")
    pairs, _ = build_pairs({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}, tok, data_cfg(), "train")
    batch = PairBatches(pairs, 4, pad_id=tok.pad_token_id, max_length=64).collate(np.arange(3))  # a padding row too
    ids, attention, mask = _both_sides({k: jnp.asarray(v) for k, v in batch.items() if k != "example_ids"})
    got, counts = map(np.asarray, sequence_logps(model, ids, attention, mask))

    want = []
    for prompt, *responses in zip(PROMPTS, CHOSEN, REJECTED):
        for response in responses:
            answer = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            full = list(tok.apply_chat_template(prompt + answer, tokenize=True)["input_ids"])
            n_prompt = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
            W = ids.shape[1]  # the padded batch's width, right padding as jaxft batches it
            x = torch.tensor([full + [tok.pad_token_id] * (W - len(full))])
            am = torch.tensor([[1] * len(full) + [0] * (W - len(full))])
            with torch.no_grad():
                logp = torch.log_softmax(hf(x, attention_mask=am).logits.double(), -1)[0]
            want.append(sum(float(logp[t - 1, full[t]]) for t in range(n_prompt, len(full))))
    assert np.abs(got[:6] - np.asarray(want)).max() <= 1e-5, (got[:6], want)
    assert counts[6:].tolist() == [0, 0]  # the padding pair has no response tokens
    assert len({round(float(v), 3) for v in got[:6]}) == 6  # distinct sequences, distinct log-probs
