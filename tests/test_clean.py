"""The `data.clean` rules on the real SST-2 and AG News files, each switchable, and the `jaxft data` command.

Expected counts are recomputed here from the raw files with the standard library (csv, html, unicodedata)
where that can be done independently of jaxft's rules; the numbers quoted in the README are checked too.
"""

from __future__ import annotations

import csv
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections import defaultdict

import pytest

from conftest import shared_data
from jaxft.cli import main
from jaxft.config import CleanSection, load_config
from jaxft.data.clean import Rows, clean_splits, report_table
from jaxft.data.text_rules import collapse_whitespace, match_key, normalize_unicode, repair_escapes

# what the repair rule is there to remove: entities (with or without their `&`), tags, doubled quotes, backslashes
DEBRIS = re.compile(r"#x?[0-9A-Fa-f]{2,5};|&[A-Za-z]+;|(?:^|\s)(?:quot|amp|lt|gt|apos|nbsp);|<[A-Za-z/][^<>]*>|\"\"|\\")


def read_tsv(path) -> tuple[list[str], list]:
    """The file as plain Python reads it (no jaxft): one header, tab-separated, no quoting."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    label = lambda v: int(v) if v.isdigit() else v
    return [r[0] for r in rows], [label(r[1]) for r in rows]


def as_rows(text, label) -> Rows:
    return Rows(list(text), None, list(label), list(range(1, len(text) + 1)))


@pytest.fixture(scope="module")
def agnews():
    folder = shared_data("agnews")
    return {s: read_tsv(folder / f"{s}.tsv") for s in ("train", "test")}


@pytest.fixture(scope="module")
def sst2():
    folder = shared_data("sst2")
    return {s: read_tsv(folder / f"{s}.tsv") for s in ("train", "validation", "test")}


def run_clean(data, **rules):
    rows, reports = clean_splits({s: as_rows(*v) for s, v in data.items()}, CleanSection(**rules))
    return rows, {r.split: r for r in reports}


def simple_key(text: str) -> str:
    """Whitespace- and case-insensitive comparison, without any of jaxft's repairs."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def conflicting(text, label) -> int:
    labels = defaultdict(set)
    for t, y in zip(text, label):
        labels[simple_key(t)].add(y)
    return sum(len(v) > 1 for v in labels.values())


def test_repairs_of_real_debris():
    assert repair_escapes("It #39;s over. I #39;m leaving") == "It's over. I'm leaving"
    assert repair_escapes("AT amp;T and P&amp;O") == "AT&T and P&O"
    assert repair_escapes("is  quot;unlikely quot; his") == 'is "unlikely" his'
    assert repair_escapes(r"for Won954.3bn (\$828m) and") == "for Won954.3bn ($828m) and"
    assert repair_escapes("spending  #151; grew") == "spending — grew"  # &#151; read as cp1252, like browsers
    assert repair_escapes("Corp. &lt;A HREF=\"\"http://x\"\"&gt;KMB.N&lt;/A&gt; said") == "Corp.  KMB.N  said"
    assert repair_escapes("last day\\of a U.N.") == "last day of a U.N."
    assert repair_escapes('"a ""quoted"" word."""') == 'a "quoted" word."'  # a CSV-quoted field, read raw
    assert repair_escapes("Western &amp;amp; Southern") == "Western & Southern"
    assert repair_escapes("plain text, 100% clean; ok") == "plain text, 100% clean; ok"
    assert normalize_unicode("ｆｕｌｌ\u00a0width ﬁ") == "full width fi"
    assert collapse_whitespace("  a \t b\n\nc ") == "a b c"
    assert match_key("It #39;s  OVER") == match_key("it's over")


def test_agnews_counts_and_no_leak(agnews):
    text, label = agnews["train"]
    test_text = agnews["test"][0]
    rows, rep = run_clean(agnews, drop_leakage=True)
    train = rep["train"]
    assert train.rows_in == len(text) == 10001
    # exact duplicates: (text, label) seen before, straight from the file
    exact = len(text) - len(set(zip(text, label)))
    assert exact == 12 and train.dropped["exact duplicate"] == exact
    assert train.dropped["exact duplicate"] + train.dropped["normalised duplicate"] == 16
    assert train.conflicting_texts == conflicting(text, label) == 1
    assert train.dropped["conflicting labels"] == 2  # the text's Business row and its one Sci/Tech row left
    # the repair changes exactly the rows with debris, in both splits, and leaves none behind
    assert train.modified["repair_escapes"] == sum(bool(DEBRIS.search(t)) for t in text) == 3683
    assert rep["test"].modified["repair_escapes"] == sum(bool(DEBRIS.search(t)) for t in test_text)
    assert not any(DEBRIS.search(t) for t in rows["train"].text + rows["test"].text)
    sample = next(s for s in train.samples["repair_escapes"] if "#39;" in s["before"])
    assert "#39;" not in sample["after"] and "'" in sample["after"]
    # leakage: a train text also in test, compared raw, is one of those dropped; none is left
    raw_test = set(test_text)
    assert sum(t in raw_test for t in text) >= 10
    test_keys = {match_key(t) for t in test_text}
    assert not any(match_key(t) in test_keys for t in rows["train"].text)
    simple_test = {simple_key(u) for u in raw_test}
    assert not any(simple_key(t) in simple_test for t in rows["train"].text)
    assert train.dropped["text also in test"] == 10
    _, default = run_clean(agnews)  # drop_leakage is off by default: the rows are kept, and counted
    assert "text also in test" not in default["train"].dropped and default["train"].leaked_kept == {"test": 10}
    assert rows["test"].text.__len__() == 7600  # evaluation rows are repaired, never dropped
    table = report_table(list(rep.values()))
    assert "| dropped: exact duplicate | 12 | 0 |" in table and f"| rows kept | {train.rows_out} | 7600 |" in table


def test_sst2_counts_and_no_leak(sst2):
    text, label = sst2["train"]
    rows, rep = run_clean(sst2, drop_leakage=True)
    train = rep["train"]
    exact = len(text) - len(set(zip(text, label)))
    assert exact == 290 and train.dropped["exact duplicate"] == 290
    assert "normalised duplicate" not in train.dropped  # SST-2 is lower-cased and tokenised already
    assert train.conflicting_texts == conflicting(text, label) == 3
    others = {simple_key(t) for s in ("validation", "test") for t in sst2[s][0]}
    assert sum(simple_key(t) in others for t in set(text)) > 0  # validation shares texts with train
    assert train.dropped["text also in validation"] > 0
    assert not any(simple_key(t) in others for t in rows["train"].text)
    assert train.rows_out == len(rows["train"]) == len(text) - sum(train.dropped.values())


def test_sst2_recipe_rows_are_unchanged_by_the_defaults(sst2, minilm_dir):
    """configs/sst2_minilm.yaml trains on the first 4,000 rows for 125 steps of 32: no rule may drop one, and
    the MiniLM tokenizer must see the same token ids (the trailing spaces removed do not change them)."""
    from transformers import AutoTokenizer

    data = {"train": (sst2["train"][0][:4000], sst2["train"][1][:4000]), "test": sst2["test"]}
    rows, rep = run_clean(data)
    assert len(rows["train"]) == 4000 and not rep["train"].dropped and not rep["test"].dropped
    assert rows["train"].text == [" ".join(t.split()) for t in data["train"][0]]
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    for split in data:
        ids = lambda texts: tok(list(texts), truncation=True, max_length=64)["input_ids"]
        assert ids(rows[split].text) == ids(data[split][0])


def test_each_rule_switched_off(agnews):
    text, label = agnews["train"]
    base, rep = run_clean(agnews, drop_leakage=True)
    n = len(base["train"])
    # exact and normalised duplicates: with both off, all 16 stay (either alone, the other catches them)
    _, r = run_clean(agnews, dedup_train=False, drop_leakage=True)
    assert "exact duplicate" not in r["train"].dropped and r["train"].dropped["normalised duplicate"] == 16
    rows, r = run_clean(agnews, dedup_train=False, dedup_normalized=False, drop_leakage=True)
    assert len(rows["train"]) == n + 16 - 1  # less the conflicting text's second Sci/Tech row, now a conflict
    assert r["train"].dropped["conflicting labels"] == 3
    # leakage off: the leaked texts stay
    rows, r = run_clean(agnews, drop_leakage=False)
    assert len(rows["train"]) == n + rep["train"].dropped["text also in test"]
    assert not any(k.startswith("text also in") for k in r["train"].dropped)
    # conflicting labels: keep both rows, or keep the majority label's (Sci/Tech, 2 of 3 rows); the text is
    # also in test, so leakage is off here
    conflict = match_key(next(t for t in text if t.startswith("With the economy slowly turning up")))
    rows, r = run_clean(agnews, conflicting_labels="keep", drop_leakage=False)
    assert "conflicting labels" not in r["train"].dropped and r["train"].conflicting_texts == 1
    assert sorted(y for t, y in zip(rows["train"].text, rows["train"].label) if match_key(t) == conflict) == ["Business", "Sci/Tech"]
    rows, r = run_clean(agnews, conflicting_labels="majority", drop_leakage=False)
    assert r["train"].dropped["conflicting labels"] == 1
    assert [y for t, y in zip(rows["train"].text, rows["train"].label) if match_key(t) == conflict] == ["Sci/Tech"]
    # repairs off: the debris stays and nothing is counted
    rows, r = run_clean(agnews, repair_escapes=False, normalize_unicode=False, collapse_whitespace=False)
    assert not r["train"].modified and not r["test"].modified
    assert sum("#39;" in t for t in rows["train"].text) > 1000
    assert set(rows["train"].text) <= set(text)


def test_length_bounds_in_characters_and_tokens():
    class Tok:  # one token per word, plus two specials
        def __call__(self, text, pair=None, truncation=False):
            return {"input_ids": [[0] * (len(t.split()) + 2) for t in text]}

    data = {"train": (["a", "ab cd", "one two three four", "x" * 30], [0, 1, 0, 1])}
    rows, rep = clean_splits({s: as_rows(*v) for s, v in data.items()}, CleanSection(min_chars=2, max_chars=20))
    assert rows["train"].text == ["ab cd", "one two three four"]
    assert rep[0].dropped == {"shorter than min_chars=2": 1, "longer than max_chars=20": 1}
    rows, rep = clean_splits({s: as_rows(*v) for s, v in data.items()}, CleanSection(max_tokens=4), tokenizer=Tok())
    assert rows["train"].text == ["a", "ab cd", "x" * 30] and rep[0].dropped == {"longer than max_tokens=4": 1}
    with pytest.raises(ValueError, match="min_tokens/max_tokens need the model's tokenizer"):
        clean_splits({s: as_rows(*v) for s, v in data.items()}, CleanSection(min_tokens=3))


def small_config(tmp_path, minilm_dir):
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\nIt #39;s a  fine day\tpos\nIt #39;s a  fine day\tpos\nrain again &amp; again\tneg\n"
                     "great   match\tpos\nseen in test\tneg\nawful \\$5 lunch\tneg\n")
    test = tmp_path / "test.tsv"
    test.write_text("text\tlabel\nSeen in  test\tneg\nwonderful\tpos\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {minilm_dir}\ndata:\n  train: {train}\n  test: {test}\n  max_length: 8\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    return cfg


def test_jaxft_data_cli_prints_report_and_writes_histogram(tmp_path, minilm_dir, capsys):
    cfg = small_config(tmp_path, minilm_dir)
    assert main(["data", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "| dropped: exact duplicate | 1 | 0 |" in out
    assert "| kept (drop_leakage=false): text also in test | 1 | 0 |" in out  # counted, not dropped by default
    assert "'It #39;s a  fine day'\n        → \"It's a  fine day\"" in out  # before → after, per rule
    assert "| train | 5 |" in out and "truncated at max_length=8" in out
    run = tmp_path / "run"
    svg = ET.parse(run / "token_lengths.svg").getroot()
    bars = [e for e in svg.iter("{http://www.w3.org/2000/svg}rect") if e.get("class") == "bar"]
    assert {b.get("data-split") for b in bars} == {"train", "test"}
    assert (run / "data_report.json").exists() and "| rows kept | 5 | 2 |" in (run / "data_report.md").read_text()
    # a rule switched off on the command line
    assert main(["data", str(cfg), "data.clean.drop_leakage=true", "--out", str(tmp_path / "o2")]) == 0
    assert "| dropped: text also in test | 1 | 0 |" in capsys.readouterr().out
    # a training run writes the same table beside data_report.json
    from jaxft.objectives.supervised import ClassificationTask
    from transformers import AutoTokenizer

    run2 = tmp_path / "run2"
    run2.mkdir()
    ClassificationTask(load_config(cfg, ["train.batch_size=2"]), AutoTokenizer.from_pretrained(str(minilm_dir)), run2, resuming=False)
    assert (run2 / "data_report.md").read_text() == (run / "data_report.md").read_text().split("\n# Token")[0]
    # a bad key is named
    assert main(["data", str(cfg), "data.clean.dedup=false"]) == 2
    assert "data.clean.dedup" in capsys.readouterr().err
    # causal-LM data is refused, before any tokenizer is looked up
    assert main(["data", str(cfg), "model.task=causal-lm", "model.name_or_path=no/such-hub-model"]) == 2
    assert "jaxft data covers classification data" in capsys.readouterr().err
