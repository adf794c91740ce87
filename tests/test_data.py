"""Data: file formats, cleaning counts, label maps, tokenization cache, deterministic resumable batches."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import shared_data

from jaxft.config import load_config
from jaxft.data import build_classification_data
from jaxft.data.batches import Batches, Position
from jaxft.data.clean import LabelMap
from jaxft.data.sources import DataError, load_table
from jaxft.data.tokenize import Encoded, encode

ROWS = [("a fine film", "pos"), ('He said "wow', "pos"), ("dull", "neg"), ("", "neg"),
        ("a fine film", "pos"), ("so-so", None), ("great", "pos"), ("bad", "neg")]


def write(tmp_path, suffix, rows=ROWS, cols=("text", "label")):
    df = pd.DataFrame(rows, columns=list(cols))
    path = tmp_path / f"rows{suffix}"
    if suffix == ".tsv":
        path.write_text("\t".join(cols) + "\n" + "\n".join(
            "\t".join("" if v is None else str(v) for v in r) for r in rows) + "\n")
    elif suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(df.to_dict(orient="records")))
    elif suffix == ".parquet":
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".json", ".parquet"])
def test_every_file_type_reads_the_same_rows(tmp_path, suffix):
    table = load_table(str(write(tmp_path, suffix)), "data.train")
    assert len(table["text"]) == len(ROWS)
    assert table["text"][0] == "a fine film" and table["label"][2] == "neg"


def test_tsv_keeps_quotes_verbatim(tmp_path):
    table = load_table(str(write(tmp_path, ".tsv")), "data.train")
    assert table["text"][1] == 'He said "wow'  # an unbalanced quote swallows rows under CSV quoting


def test_missing_file_and_bad_suffix_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data.validation: data file .*nope.tsv does not exist"):
        load_table(str(tmp_path / "nope.tsv"), "data.validation")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match="supported file types"):
        load_table(str(tmp_path / "x.xml"), "data.train")


class CharTokenizer:
    """A tiny deterministic tokenizer with the HF call signature (no network, no files)."""

    pad_token_id = 0

    def __call__(self, texts, pairs=None, truncation=True, max_length=8, return_token_type_ids=True):
        ids, types = [], []
        for i, t in enumerate(texts):
            a = [1] + [2 + ord(c) % 50 for c in t] + [3]
            b = [2 + ord(c) % 50 for c in pairs[i]] + [3] if pairs is not None else []
            seq = (a + b)[:max_length]
            ids.append(seq)
            types.append(([0] * len(a) + [1] * len(b))[:max_length])
        return {"input_ids": ids, "token_type_ids": types}

    def get_vocab(self):
        return {"chars": 52}


def cfg_for(tmp_path, **over):
    train = write(tmp_path, ".tsv")
    items = [f"model.name_or_path=x", f"data.train={train}", "train.batch_size=2", "data.max_length=8",
             f"data.cache_dir={tmp_path / 'cache'}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, items)


def test_cleaning_counts_and_string_label_map(tmp_path):
    data = build_classification_data(cfg_for(tmp_path), CharTokenizer())
    report = data.reports[0]
    assert report.rows_in == 8 and report.rows_out == 5
    assert report.dropped == {"empty text": 1, "exact duplicate": 1, "missing label": 1}
    assert report.examples["exact duplicate"] == [5]  # 1-based row numbers of the file
    assert data.label_map.names == ("neg", "pos") and data.label_map.id2label == {0: "neg", 1: "pos"}


def test_label_unseen_in_train_is_an_error_naming_row_and_file(tmp_path):
    val = write(tmp_path / ".." / tmp_path.name, ".jsonl", rows=[("meh", "neutral")])
    cfg = cfg_for(tmp_path, **{"data.validation": val})
    with pytest.raises(ValueError, match=r"label 'neutral' in row 1 of .*rows.jsonl never appears"):
        build_classification_data(cfg, CharTokenizer())


def test_missing_text_field_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data.text_field='sentence' is not a column .*columns: text, label"):
        build_classification_data(cfg_for(tmp_path, **{"data.text_field": "sentence"}), CharTokenizer())


def test_validation_fraction_is_a_seeded_disjoint_split(tmp_path):
    a = build_classification_data(cfg_for(tmp_path, **{"data.validation_fraction": 0.4}), CharTokenizer())
    b = build_classification_data(cfg_for(tmp_path, **{"data.validation_fraction": 0.4}), CharTokenizer())
    assert len(a.splits["validation"].enc) == 2 and len(a.splits["train"].enc) == 3
    np.testing.assert_array_equal(a.splits["validation"].enc.ids, b.splits["validation"].enc.ids)


def test_integer_labels_map_to_themselves():
    lm = LabelMap.from_labels([1, 0, 1, 1], num_labels=None)
    assert lm.values == (0, 1) and lm.names == ("0", "1")
    assert LabelMap.from_labels([2, 0], num_labels=4).values == (0, 1, 2, 3)


class CountingTokenizer(CharTokenizer):
    """CharTokenizer that counts its calls; `shift` makes a different tokenizer (another vocabulary)."""

    def __init__(self, shift: int = 0):
        self.calls, self.shift = 0, shift

    def __call__(self, texts, *args, **kw):
        self.calls += 1
        out = super().__call__(texts, *args, **kw)
        return {"input_ids": [[t + self.shift for t in row] for row in out["input_ids"]],
                "token_type_ids": out["token_type_ids"]}

    def get_vocab(self):
        return {"chars": 52, "shift": self.shift}


def test_tokenization_is_cached(tmp_path):
    texts = ["ab", "cde"]
    tok = CountingTokenizer()
    first = encode(tok, texts, None, 8, tmp_path)
    assert tok.calls == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    again_tok = CountingTokenizer()
    again = encode(again_tok, texts, None, 8, tmp_path)
    assert again_tok.calls == 0  # a cache hit never calls the tokenizer
    np.testing.assert_array_equal(first.ids, again.ids)
    np.testing.assert_array_equal(first.lengths(), again.lengths())
    other = encode(CharTokenizer(), ["ab", "cdf"], None, 8, tmp_path)  # other texts: a miss
    assert not np.array_equal(first.ids, other.ids) and len(list(tmp_path.glob("*.npz"))) == 2
    # another tokenizer, same texts: a miss, tokenized by that tokenizer
    shifted_tok = CountingTokenizer(shift=1)
    shifted = encode(shifted_tok, texts, None, 8, tmp_path)
    assert shifted_tok.calls == 1 and len(list(tmp_path.glob("*.npz"))) == 3
    np.testing.assert_array_equal(shifted.ids, first.ids + 1)


def test_tokenization_cache_tells_hugging_face_tokenizers_apart(tmp_path):
    """Two fast tokenizers with the same words under other ids: the second never reads the first's entry."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def word_level(words):
        t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")

    words = ["<unk>", "a", "b", "c", "d"]
    a = encode(word_level(words), ["a b", "c d a"], None, 8, tmp_path)
    b = encode(word_level(words[:1] + words[1:][::-1]), ["a b", "c d a"], None, 8, tmp_path)
    assert a.ids.tolist() == [1, 2, 3, 4, 1] and b.ids.tolist() == [4, 3, 2, 1, 4]
    assert len(list(tmp_path.glob("*.npz"))) == 2


def ragged(lengths):
    ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])
    return Encoded({"input_ids": ids}, np.concatenate([[0], np.cumsum(lengths)]))


def test_padding_rounds_up_to_a_multiple_and_caps_at_max_length():
    b = Batches(ragged([3, 17, 5]), None, 3, pad_id=0, max_length=20, pad_to_multiple_of=8)
    batch = next(b.epoch())
    assert batch["input_ids"].shape == (3, 20)  # 17 → 24, capped at 20
    assert batch["attention_mask"].sum(1).tolist() == [3, 17, 5]
    b = Batches(ragged([3, 5]), None, 2, pad_id=0, max_length=20, pad_to_multiple_of=8)
    assert next(b.epoch())["input_ids"].shape == (2, 8)
    b.padding = "max_length"
    assert next(b.epoch())["input_ids"].shape == (2, 20)


def test_shuffled_batches_are_seeded_and_resume_exactly():
    labels = np.arange(10, dtype=np.int32)
    make = lambda: Batches(ragged([2] * 10), {"labels": labels}, 3, pad_id=0, max_length=4, shuffle=True, seed=7,
                           drop_remainder=True)
    straight = make()
    seq = [straight.next()["example_ids"].tolist() for _ in range(7)]
    assert len(set(sum(seq[:3], []))) == 9 and seq[:3] != seq[3:6]  # next epoch, new order
    resumed = make()
    for _ in range(4):
        resumed.next()
    pos = resumed.position.to_json()
    again = make()
    again.position = Position(**pos)
    assert [again.next()["example_ids"].tolist() for _ in range(3)] == seq[4:7]


def test_group_by_length_cuts_padding_keeps_every_row_and_resumes_exactly():
    """Real SST-2 sentence lengths (words + 2, as a stand-in for tokens), batch 32, windows of 50 batches:
    each epoch still trains on every row of its full batches exactly once, the dropped remainder is the
    ungrouped order's, batches change between epochs, a resumed position continues the same sequence, and
    padding falls by more than half."""
    table = load_table(str(shared_data("sst2") / "train.tsv"), "data.train", 4000)
    lengths = [min(64, len(t.split()) + 2) for t in table["sentence"]]
    enc, n = ragged(lengths), len(lengths)
    make = lambda group: Batches(enc, None, 32, pad_id=0, max_length=64, shuffle=True, seed=3,
                                 drop_remainder=True, group_by_length=group)
    plain, grouped = make(0), make(50)
    for epoch in (0, 1):
        a, b = plain.order(epoch), grouped.order(epoch)
        full = n // 32 * 32
        assert sorted(b[:full].tolist()) == sorted(a[:full].tolist()) and b[full:].tolist() == a[full:].tolist()
    assert grouped.order(0)[:32].tolist() != grouped.order(1)[:32].tolist()
    padded = lambda bs: sum(bs.next()["input_ids"].size for _ in range(len(bs)))
    real = sum(np.asarray(lengths)[grouped.order(0)[:n // 32 * 32]])
    waste_plain, waste_grouped = padded(make(0)) - real, padded(make(50)) - real
    assert waste_grouped < 0.5 * waste_plain, (waste_grouped, waste_plain)
    straight = make(50)
    seq = [straight.next()["example_ids"].tolist() for _ in range(130)]   # into the second epoch
    again = make(50)
    again.position = Position(epoch=0, offset=120 * 32)
    assert [again.next()["example_ids"].tolist() for _ in range(10)] == seq[120:]


def test_eval_batches_cover_every_example_once_with_weights():
    b = Batches(ragged([2] * 5), {"labels": np.arange(5, dtype=np.int32)}, 2, pad_id=0, max_length=4)
    batches = list(b.epoch())
    assert len(batches) == 3
    assert batches[-1]["weights"].tolist() == [1.0, 0.0]
    assert sum(int(x["weights"].sum()) for x in batches) == 5


def test_bad_rows_counted_per_reason_or_fatal(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"text\tlabel\nfine film\tpos\nbroken \xff\xfe bytes\tneg\n\tneg\nok\t\ngood\tpos\n")
    cfg = load_config(None, ["model.name_or_path=x", f"data.train={path}", "train.batch_size=2",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    data = build_classification_data(cfg, CharTokenizer())
    assert data.reports[0].dropped == {"undecodable bytes": 1, "empty text": 1, "missing label": 1}
    assert data.reports[0].examples["undecodable bytes"] == [2]
    cfg = load_config(None, ["model.name_or_path=x", f"data.train={path}", "data.on_bad_rows=error",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match=r"row 2 of .*bad.tsv: undecodable bytes"):
        build_classification_data(cfg, CharTokenizer())


def test_a_split_that_ends_up_empty_is_an_error(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("text\tlabel\n\tpos\nx\t\n")
    cfg = load_config(None, ["model.name_or_path=x", f"data.train={path}", f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(DataError, match="has no usable rows after cleaning"):
        build_classification_data(cfg, CharTokenizer())


def test_an_unreadable_tokenization_cache_entry_is_made_again(tmp_path, caplog):
    """A cut or empty cache file is a warning and a fresh tokenization (the same ids), never a traceback."""
    from jaxft.data.tokenize import encode
    from sft_helpers import make_tokenizer

    tok = make_tokenizer()
    texts = ["map w1", "hello world please", "w3 w4"]
    first = encode(tok, texts, None, 16, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    import logging

    logging.getLogger("jaxft").addHandler(caplog.handler)   # the jaxft logger may not propagate
    for damage in (lambda p: p.write_bytes(p.read_bytes()[:40]), lambda p: p.write_bytes(b"")):
        damage(entry)
        try:
            again = encode(tok, texts, None, 16, tmp_path)
        finally:
            logging.getLogger("jaxft").removeHandler(caplog.handler)
            logging.getLogger("jaxft").addHandler(caplog.handler)
        assert "is unreadable" in caplog.text
        assert np.array_equal(again.ids, first.ids) and np.array_equal(again.offsets, first.offsets)
        caplog.clear()
    logging.getLogger("jaxft").removeHandler(caplog.handler)
