"""Causal-LM SFT data: loss masks token by token, truncation policy, packing, and a run that learns."""

from __future__ import annotations

import json

import numpy as np
from flax import nnx
import pytest

from jaxft.config import load_config
from jaxft.data.sft import build_sft, encode_chat, encode_prompt_completion, pack
from jaxft.data.sources import DataError
from sft_helpers import TEMPLATE_BAD, TEMPLATE_MARKED, make_tokenizer, save_tiny_llama
from conftest import forward

CHAT = [{"role": "user", "content": "map w1"}, {"role": "assistant", "content": "d1"},
        {"role": "user", "content": "map w2 please"}, {"role": "assistant", "content": "d2 d3"}]


def data_cfg(**over):
    return load_config(None, ["model.name_or_path=x", "model.task=causal-lm"] +
                       [f"data.{k}={v}" for k, v in over.items()]).data


def words(tok, ids, mask):
    return [t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m]


@pytest.mark.parametrize("template", [None, TEMPLATE_MARKED], ids=["prefix-diff", "generation-markers"])
def test_chat_mask_is_exactly_the_assistant_tokens(template):
    tok = make_tokenizer()
    ids, mask = encode_chat(tok, CHAT, template)
    assert tok.convert_ids_to_tokens(ids) == [
        "<|user|>", "map", "w1", "</s>", "<|assistant|>", "d1", "</s>",
        "<|user|>", "map", "w2", "please", "</s>", "<|assistant|>", "d2", "d3", "</s>"]
    # assistant content and its end-of-turn token (the model must learn to stop); nothing else
    assert mask == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_chat_errors_are_loud():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_chat(tok, [{"role": "user", "content": "hello"}], None)
    with pytest.raises(DataError, match="cannot locate the assistant tokens.*generation"):
        encode_chat(tok, CHAT, TEMPLATE_BAD)


def test_chat_rows_without_assistant_are_counted_or_fatal():
    tok = make_tokenizer()
    table = {"messages": [CHAT, [{"role": "user", "content": "hello"}], json.dumps(CHAT)]}
    enc, report = build_sft(table, tok, data_cfg(), "train")
    assert len(enc) == 2 and report.dropped == {"the conversation has no assistant turn": 1}
    assert report.examples == {"the conversation has no assistant turn": [2]}
    with pytest.raises(DataError, match="data.train, row 2: the conversation has no assistant turn"):
        build_sft(table, tok, data_cfg(on_bad_rows="error"), "train")


def test_prompt_completion_masks_completion_and_eos():
    tok = make_tokenizer()
    ids, mask = encode_prompt_completion(tok, "map w3", "d3")
    assert tok.convert_ids_to_tokens(ids) == ["map", "w3", "d3", "</s>"] and mask == [0, 0, 1, 1]


def test_conversational_prompt_completion_rows_are_rendered_with_the_template():
    """TRL's conversational prompt–completion rows (message lists) go through the chat template, loss on the
    completion only (an earlier assistant turn in the prompt is not trained); a list or dict that is not
    messages, or a number, is an error naming the row and the column, never its Python repr trained on."""
    tok = make_tokenizer()
    table = {"prompt": [CHAT[:3]], "completion": [[CHAT[3]]]}
    enc, _ = build_sft(table, tok, data_cfg(format="prompt_completion"), "train")
    ids, mask = enc.example(0)["input_ids"], enc.example(0)["loss_mask"]
    full, _ = encode_chat(tok, CHAT, None)
    assert ids.tolist() == full and words(tok, ids, mask) == ["d2", "d3", "</s>"]
    for bad, what in (({"role": "user"}, "dict"), (["a", "b"], "list"), (3, "int")):
        table = {"prompt": ["map w1", bad], "completion": ["d1", "d2"]}
        with pytest.raises(DataError, match=f"data.train, row 2, column 'prompt': expected text or a list of "
                                            f"{{role, content}} messages, got {what}"):
            build_sft(table, tok, data_cfg(format="prompt_completion"), "train")
    with pytest.raises(DataError, match="row 1: 'prompt' and 'completion' must both be text or both be message"):
        build_sft({"prompt": ["map w1"], "completion": [[CHAT[1]]]}, tok, data_cfg(format="prompt_completion"),
                  "train")
    with pytest.raises(DataError, match="row 1, column 'text': expected text, got int"):
        build_sft({"text": [5]}, tok, data_cfg(format="text"), "train")


def test_truncation_policy_is_counted():
    tok = make_tokenizer()
    table = {"prompt": ["map w1", "map " + " ".join(["w2"] * 10), "map w4"],
             "completion": ["d1 d2 d3 d4 d5", "d2", "d4"]}
    enc, report = build_sft(table, tok, data_cfg(max_length=6), "train")
    assert report.truncated == 1 and report.dropped == {"no trained token within max_length (prompt too long)": 1}
    assert enc.lengths().tolist() == [6, 4]
    _, report = build_sft(table, tok, data_cfg(max_length=6, truncation="drop"), "train")
    assert report.dropped == {"longer than max_length": 2}


def test_packing_keeps_documents_apart():
    tok = make_tokenizer()
    table = {"text": ["w1 w2 w3", "w4 w5", "w6", "w7 w8 w9 w10 w11"]}
    enc, _ = build_sft(table, tok, data_cfg(), "train")
    packed = pack(enc, 8, seed=0)
    assert all(n <= 8 for n in packed.lengths())
    assert sum(packed.lengths()) == sum(enc.lengths())
    for i in range(len(packed)):
        seg = packed.example(i)["segment_ids"]
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0)


def test_packed_text_rows_stay_apart(tmp_path):
    """`text` rows (every token, the first of each document included, is a target) packed several to a row:
    every token carries its own document's segment id, each document's logits equal its logits alone (no
    position attends across a boundary, positions restart), and the loss sums exactly the documents' own
    next-token losses (no position predicts the next document's first token)."""
    import jaxft
    from causal_helpers import save_hf
    from jaxft.data.batches import Batches
    from jaxft.train.losses import causal_lm_loss

    tok = make_tokenizer()
    docs = ["w1 w2 w3", "w4 w5", "w6", "w7 w8 w9 w10 w11", "hello world", "d1 d2 d3 d4", "map w12 please"]
    enc, _ = build_sft({"text": docs}, tok, data_cfg(), "train")
    singles = [enc.example(i) for i in range(len(enc))]
    assert all(s["loss_mask"].all() for s in singles)  # text rows: every token is a target
    packed = pack(enc, 12, seed=0)
    assert len(packed) < len(enc)
    batch = Batches(packed, None, len(packed), pad_id=tok.pad_token_id, max_length=12, padding="max_length").next()
    seen = []
    for r in range(len(packed)):
        seg, ids, n = batch["segment_ids"][r], batch["input_ids"][r], int(packed.lengths()[r])
        assert (seg[n:] == 0).all() and (batch["attention_mask"][r, :n] == 1).all()
        bounds = np.flatnonzero(np.diff(seg[:n])) + 1
        pieces = np.split(np.arange(n), bounds)
        assert [int(seg[p[0]]) for p in pieces] == list(range(1, len(pieces) + 1))
        for p in pieces:  # each segment is one whole document, every token of it with the same id
            match = [i for i, s in enumerate(singles) if s["input_ids"].tolist() == ids[p].tolist()]
            assert len(match) >= 1 and (seg[p] == seg[p[0]]).all()
            seen.append((match[0], r, p))
    assert sorted(i for i, _, _ in seen) == list(range(len(docs)))
    assert max(len(np.unique(batch["segment_ids"][r])) - 1 for r in range(len(packed))) >= 3

    model = jaxft.load_model(save_hf("llama-gqa-tied", tmp_path / "m"), task="causal-lm")  # all params random
    logits = np.asarray(forward(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                              segment_ids=batch["segment_ids"]))
    # the same documents unpacked, one per (right-padded) row
    alone = Batches(enc, None, len(enc), pad_id=tok.pad_token_id, max_length=12).next()
    ref = np.asarray(forward(model, alone["input_ids"], attention_mask=alone["attention_mask"]))
    for i, r, p in seen:
        np.testing.assert_allclose(logits[r, p], ref[i, : len(p)], atol=1e-4, rtol=0)
    loss = nnx.jit(lambda model, b: causal_lm_loss(model, b, None))  # one program, not op by op
    total, aux = loss(model, alone)
    total, weight = float(total), float(aux["weight"])
    packed_sum, packed_aux = loss(model, batch)
    assert weight == sum(len(s["input_ids"]) - 1 for s in singles)
    assert float(packed_aux["weight"]) == weight
    assert abs(float(packed_sum) - total) < 1e-5 * max(1.0, total)


def test_packed_and_unpacked_losses_agree(tmp_path):
    import jax.numpy as jnp

    import jaxft
    from jaxft.train.losses import causal_lm_loss

    folder = save_tiny_llama(tmp_path / "m")
    model = jaxft.load_model(folder, task="causal-lm")
    tok = make_tokenizer()
    a, ma = encode_prompt_completion(tok, "map w1", "d1 d2")
    b, mb = encode_prompt_completion(tok, "map w2 please", "d5")
    ids = np.array([a + b], np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.array([ma + mb]),
             "segment_ids": np.array([[1] * len(a) + [2] * len(b)]), "weights": np.ones(1, np.float32)}
    packed_sum, packed_aux = causal_lm_loss(model, batch, None)
    total, weight = 0.0, 0.0
    for x, m in ((a, ma), (b, mb)):
        single = {"input_ids": np.array([x]), "attention_mask": np.ones((1, len(x)), np.int32),
                  "loss_mask": np.array([m]), "weights": np.ones(1, np.float32)}
        s, aux = causal_lm_loss(model, single, None)
        total, weight = total + float(s), weight + float(aux["weight"])
    assert float(packed_aux["weight"]) == weight == 5  # d1 d2 </s> + d5 </s>
    assert abs(float(packed_sum) - total) < 1e-5 * max(1.0, total)
