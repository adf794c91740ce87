"""EDA augmentation (`data.augment`, jaxft/data/augment.py): seeded and resumable copies, labels kept, the
configured share of words changed, eval/test untouched, clear errors, CJK text, and a training run on it."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import save_tiny_bert
from jaxft.cli import main
from jaxft.config import ConfigError, load_config
from jaxft.data import build_classification_data
from jaxft.data.augment import (OPERATIONS, AugmentedBatches, Augmenter, SynonymFile, WordNetSynonyms, copy_rng,
                                join_words, word_splitter)
from jaxft.data.batches import Batches, Position
from jaxft.data.sources import DataError

VOCAB = ["film", "plot", "cast", "music", "scene", "story", "actor", "score", "script", "ending", "pace", "tone"]
SYNONYMS = {w: [f"{w}{k}" for k in ("x", "y", "z")] for w in VOCAB}  # every word has 3 synonyms, none in VOCAB
N_TRAIN = 48


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture
def files(tmp_path):
    """Train/validation/test TSVs of 12-word rows over VOCAB, labels a function of the row, and a TSV synonym file."""
    rng = np.random.RandomState(0)

    def write(name: str, n: int) -> str:
        rows = [f"{' '.join(rng.choice(VOCAB, 12))} {name}{i}\t{['neg', 'pos', 'mid'][i % 3]}" for i in range(n)]
        (tmp_path / f"{name}.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
        return str(tmp_path / f"{name}.tsv")

    syn = tmp_path / "syn.tsv"
    syn.write_text("".join(f"{w}\t{','.join(s)}\n" for w, s in SYNONYMS.items()))
    return {"train": write("train", N_TRAIN), "validation": write("validation", 20), "test": write("test", 20),
            "synonyms": str(syn), "tmp": tmp_path}


def config(files, minilm_dir, *over):
    return load_config(None, [f"model.name_or_path={minilm_dir}", f"data.train={files['train']}",
                              f"data.cache_dir={files['tmp'] / 'cache'}", "data.max_length=32", "train.batch_size=8",
                              "data.augment.copies=2", f"data.augment.synonyms={files['synonyms']}", *over])


def take(batches, n: int) -> list[dict]:
    return [batches.next() for _ in range(n)]


def test_copies_are_seeded_per_epoch_and_keep_labels(files, minilm_dir, tokenizer):
    data = build_classification_data(config(files, minilm_dir), tokenizer)
    train = data.splits["train"]
    assert isinstance(train, AugmentedBatches) and len(train) == N_TRAIN * 3 // 8
    epoch = take(train, len(train))
    ids = np.concatenate([b["example_ids"] for b in epoch])
    assert sorted(ids) == list(range(N_TRAIN * 3))  # every original and every copy once per epoch

    labels = np.array([i % 3 for i in range(N_TRAIN)])  # neg, pos, mid in the label map's sorted order
    names = data.label_map.names
    for b in epoch:  # each row carries its original's label
        assert [names[k] for k in b["labels"]] == [["neg", "pos", "mid"][k] for k in labels[b["example_ids"] % N_TRAIN]]

    # copies are real: a copy's tokens differ from its original's, and from the same copy in the next epoch
    rows = np.arange(N_TRAIN, 3 * N_TRAIN)
    first, second = train.augmented_texts(rows, 0), train.augmented_texts(rows, 1)
    originals = [train.texts[r % N_TRAIN] for r in rows]
    # (not all: deletion with p = 0.1 leaves 0.9^13 ≈ 25% of 13-word rows whole, a swap may swap equal words)
    assert sum(a != o for a, o in zip(first, originals)) > 0.8 * len(rows)
    enc = train.collate_rows(rows[:8], 0)["input_ids"]
    assert all(not np.array_equal(enc[k][enc[k] > 0], train.enc.example(int(r % N_TRAIN))["input_ids"])
               for k, r in enumerate(rows[:8]) if first[k] != originals[k])  # the step sees the copy's tokens
    assert sum(a != b for a, b in zip(first, second)) > 0.9 * len(rows)

    again = build_classification_data(config(files, minilm_dir), tokenizer).splits["train"]
    for a, b in zip(epoch, take(again, len(again))):  # same seed: identical batches
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other = build_classification_data(config(files, minilm_dir, "train.seed=1"), tokenizer).splits["train"]
    assert other.augmented_texts(rows, 0) != first  # another seed: other copies


def test_resumed_stream_equals_the_uninterrupted_one(files, minilm_dir, tokenizer):
    cfg = config(files, minilm_dir)
    straight = take(build_classification_data(cfg, tokenizer).splits["train"], 40)  # 2.2 epochs
    first = build_classification_data(cfg, tokenizer).splits["train"]
    head = take(first, 13)
    saved = json.loads(json.dumps(first.position.to_json()))  # what a checkpoint holds
    resumed = build_classification_data(cfg, tokenizer).splits["train"]
    resumed.position = Position(**saved)
    for a, b in zip(straight, head + take(resumed, 27)):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_validation_and_test_are_never_augmented(files, minilm_dir, tokenizer):
    over = [f"data.validation={files['validation']}", f"data.test={files['test']}"]
    plain = build_classification_data(config(files, minilm_dir, *over, "data.augment.copies=0"), tokenizer)
    aug = build_classification_data(config(files, minilm_dir, *over), tokenizer)
    for split in ("validation", "test"):
        assert type(aug.splits[split]) is Batches
        for a, b in zip(plain.splits[split].epoch(), aug.splits[split].epoch(), strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    carved = build_classification_data(config(files, minilm_dir, "data.validation_fraction=0.25"), tokenizer)
    assert type(carved.splits["validation"]) is Batches  # carved from train before augmentation
    assert carved.augment.rows_in == N_TRAIN - 12 and carved.splits["train"].rows == 3 * (N_TRAIN - 12)


def augmenter(**rates) -> Augmenter:
    cfg = load_config(None, ["model.name_or_path=x", "data.augment.copies=1"] +
                      [f"data.augment.{op}={rates.get(op, 0)}" for op in OPERATIONS])
    return Augmenter(cfg.data.augment, lambda w: tuple(SYNONYMS.get(w, ())), word_splitter("chars"))


def sentences(n: int, length: int = 20):
    rng = np.random.RandomState(1)
    return [list(rng.choice(VOCAB, length)) for _ in range(n)]


def test_each_operation_changes_the_configured_share_of_words():
    """Exact where EDA's count is fixed, within a derived bound where it is random.

    random_deletion: each of W words is deleted independently with probability p (the keep-one-word rule
    needs all 20 words of a sentence deleted: p^20 ≈ 1e-14), so deleted/W has mean p and standard deviation
    sqrt(p(1-p)/W); |deleted/W − p| > 4 sd has probability < 1e-4. The operation chosen per copy is uniform
    over the k enabled ones: each one's share of C copies is within 4·sqrt((1/k)(1−1/k)/C) of 1/k.
    """
    corpus, L = sentences(600), 20
    rng = lambda s: copy_rng(0, 0, s, 1)

    aug = augmenter(random_deletion=0.2)
    kept = sum(len(aug.words(s, rng(i))[0]) for i, s in enumerate(corpus))
    W = len(corpus) * L
    assert abs((W - kept) / W - 0.2) < 4 * math.sqrt(0.2 * 0.8 / W)

    n = 4  # EDA: max(1, ⌊α·L⌋) words per sentence, α = 0.23: ⌊4.6⌋
    aug = augmenter(synonym_replacement=0.23)
    for i, s in enumerate(corpus):
        out, op = aug.words(s, rng(i))
        changed = [(a, b) for a, b in zip(s, out) if a != b]
        assert op == "synonym_replacement" and len(out) == L and len(changed) == n
        assert all(b in SYNONYMS[a] for a, b in changed)

    aug = augmenter(random_insertion=0.23)
    for i, s in enumerate(corpus):
        out = aug.words(s, rng(i))[0]
        extra = Counter(out) - Counter(s)
        assert len(out) == L + n and sum(extra.values()) == n
        assert all(any(w in SYNONYMS[v] for v in s) for w in extra)  # inserted: synonyms of the sentence's words
        it = iter(out)
        assert all(w in it for w in s)  # the original words, in order

    aug = augmenter(random_swap=0.23)
    moved = 0
    for i, s in enumerate(corpus):
        out = aug.words(s, rng(i))[0]
        assert Counter(out) == Counter(s)
        moved += sum(a != b for a, b in zip(s, out))
        assert sum(a != b for a, b in zip(s, out)) <= 2 * n
    assert moved > len(corpus) * n  # most swaps move two different words

    aug, C = augmenter(**{op: 0.1 for op in OPERATIONS}), 2000
    ops = Counter(aug.words(corpus[i % 600], rng(i))[1] for i in range(C))
    assert set(ops) == set(OPERATIONS)
    assert all(abs(ops[op] / C - 0.25) < 4 * math.sqrt(0.25 * 0.75 / C) for op in OPERATIONS), ops


def test_missing_synonym_source_is_a_clear_error(files, minilm_dir, monkeypatch, capsys):
    monkeypatch.setattr(WordNetSynonyms, "installed", classmethod(lambda cls: None))  # as on a machine without it
    cfg = files["tmp"] / "c.yaml"
    cfg.write_text("train: {batch_size: 8, steps: 1}\n")
    assert main(["train", str(cfg), f"model.name_or_path={minilm_dir}", f"data.train={files['train']}",
                 "data.augment.copies=1", f"output_dir={files['tmp'] / 'run'}"]) == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert "data.augment.synonyms" in err and "wordnet-base" in err and "pip install nltk" in err

    # swap and deletion need no synonyms
    ok = config(files, minilm_dir, "data.augment.synonyms=null", "data.augment.synonym_replacement=0",
                "data.augment.random_insertion=0")
    from transformers import AutoTokenizer
    data = build_classification_data(ok, AutoTokenizer.from_pretrained(str(minilm_dir)))
    assert data.augment.synonyms == "none needed"

    bad = files["tmp"] / "bad.tsv"
    bad.write_text("film\tmovie\nplot has no tab\n")
    with pytest.raises(DataError, match=r"data\.augment\.synonyms=.*bad\.tsv, line 2"):
        SynonymFile(str(bad))
    with pytest.raises(DataError, match=r"data\.augment\.synonyms=.*nope\.json: no such file"):
        SynonymFile(str(files["tmp"] / "nope.json"))
    (files["tmp"] / "s.json").write_text('{"film": "movie"}')
    with pytest.raises(DataError, match="synonyms of 'film' must be a list"):
        SynonymFile(str(files["tmp"] / "s.json"))
    with pytest.raises(ConfigError, match="data.augment.copies=2 with every operation's rate at 0"):
        load_config(None, ["model.name_or_path=x", "data.augment.copies=2"] +
                    [f"data.augment.{op}=0" for op in OPERATIONS])
    with pytest.raises(ConfigError, match="data.augment applies to model.task=sequence-classification"):
        load_config(None, ["model.name_or_path=x", "model.task=causal-lm", "data.augment.copies=1"])


def test_wordnet_lemmas_become_synonyms(monkeypatch):
    """The WordNet source over a stand-in reader (nltk's synsets → lemmas → name API): underscores become
    spaces, the word itself, stop words and non-letter names are left out. Absent nltk → None, no download."""

    class Lemma:
        def __init__(self, name):
            self._name = name

        def name(self):
            return self._name

    class Reader:
        def synsets(self, word):
            table = {"good": [["good", "well"], ["full", "good_deal", "A-1"]], "a": [["angstrom"]]}
            return [type("Synset", (), {"lemmas": lambda self, ls=ls: [Lemma(x) for x in ls]})() for ls in table.get(word, [])]

    wn = WordNetSynonyms(Reader(), "stand-in")
    assert wn("Good") == ("full", "good deal", "well") and wn("a") == () and wn("zzz") == ()
    monkeypatch.setitem(sys.modules, "nltk", None)
    assert WordNetSynonyms.installed() is None


def test_cjk_text_is_cut_into_characters_without_jieba(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # jieba absent: auto falls back to characters
    split = word_splitter("auto")
    assert split("这部电影很好 ok!") == ["这", "部", "电", "影", "很", "好", "ok!"]
    assert "characters" in split.segmenter
    with pytest.raises(DataError, match="data.augment.cjk_words=jieba: jieba is not installed"):
        word_splitter("jieba")
    assert join_words(["这", "部", "电影", "ok", "fine", "好"]) == "这部电影ok fine好"

    (tmp_path / "zh.json").write_text(json.dumps({"好": ["佳", "良"], "电": ["雷"]}, ensure_ascii=False))
    cfg = load_config(None, ["model.name_or_path=x", "data.augment.copies=1", "data.augment.cjk_words=chars",
                             f"data.augment.synonyms={tmp_path / 'zh.json'}", "data.augment.random_swap=0",
                             "data.augment.random_deletion=0", "data.augment.random_insertion=0",
                             "data.augment.synonym_replacement=0.3"])
    aug = Augmenter(cfg.data.augment, SynonymFile(cfg.data.augment.synonyms), word_splitter("chars"))
    out = {aug("这部电影很好", copy_rng(0, 0, i, 1)) for i in range(20)}
    assert out == {"这部雷影很好", "这部电影很佳", "这部电影很良"}  # max(1, ⌊0.3·6⌋) = 1 of the 2 replaceable characters


@pytest.mark.slow
def test_training_on_copies_resumes_exactly(files, minilm_dir):
    """`jaxft train` with data.augment: copies reach the train step (batches.jsonl ids ≥ N), the data report
    counts them, and a run stopped and resumed equals the uninterrupted one bitwise. Model, shapes and optimiser
    are test_reliability's, so the suite compiles this step once for both."""
    from safetensors.numpy import load_file

    tmp = files["tmp"]
    model = save_tiny_bert(tmp / "tiny", vocab_size=30522, num_labels=2, tokenizer_from=minilm_dir)
    rows = [line.rsplit("\t", 1)[0] + f"\t{['neg', 'pos'][i % 2]}"
            for i, line in enumerate(open(files["train"]).read().splitlines()[1:])]
    (tmp / "two.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: {model}}}\n"
                   f"data: {{train: {tmp / 'two.tsv'}, max_length: 16, cache_dir: {tmp / 'cache'},\n"
                   f"       augment: {{copies: 2, synonyms: {files['synonyms']}}}}}\n"
                   "optim: {lr: 1.0e-3, warmup_steps: 2}\n"
                   "train: {batch_size: 8, steps: 20, log_every: 5, log_batches: true}\n")
    run = lambda name, *over: main(["train", str(cfg), f"output_dir={tmp / name}", *over])
    assert run("straight") == 0
    assert run("resumed", "train.stop_at_step=10") == 0  # mid-epoch 1 (18 batches per epoch)
    assert run("resumed", "train.stop_at_step=10") == 0

    log = lambda name: [json.loads(x) for x in (tmp / name / "batches.jsonl").read_text().splitlines()]
    ids = [i for row in log("straight") for i in row["example_ids"]]
    assert log("resumed") == log("straight") and len(ids) == 20 * 8
    assert sum(i >= N_TRAIN for i in ids) > 0.5 * len(ids)  # two thirds of the rows are copies
    report = json.loads((tmp / "straight" / "data_report.json").read_text())
    aug = [r for r in report if "copies" in r]
    assert aug and (aug[0]["rows_in"], aug[0]["copies"], aug[0]["rows_out"]) == (N_TRAIN, 2, 3 * N_TRAIN)
    assert aug[0]["synonym_coverage"] == pytest.approx(12 / 13)  # 12 VOCAB words + 1 row tag per row

    for name in ("straight", "resumed"):
        assert main(["export", str(tmp / name), str(tmp / f"{name}_hf")]) == 0
    a, b = (load_file(tmp / f"{n}_hf" / "model.safetensors") for n in ("straight", "resumed"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_text_pair_keeps_its_second_text(files, minilm_dir, tokenizer):
    """Of a pair, the first text is augmented and the second reaches the step as it was (token types 1)."""
    tmp = files["tmp"]
    lines = open(files["train"]).read().splitlines()[1:]
    (tmp / "pairs.tsv").write_text("text\thyp\tlabel\n" + "".join(
        f"{line.rsplit(chr(9), 1)[0]}\tthe cast was fine {i}\t{line.rsplit(chr(9), 1)[1]}\n" for i, line in enumerate(lines)))
    train = build_classification_data(config(files, minilm_dir, f"data.train={tmp / 'pairs.tsv'}",
                                             "data.text_pair_field=hyp", "data.max_length=64"), tokenizer).splits["train"]
    rows = np.arange(N_TRAIN, N_TRAIN + 8)
    batch = train.collate_rows(rows, 0)
    for k, r in enumerate(rows):
        second = batch["input_ids"][k][batch["token_type_ids"][k] == 1]
        want = tokenizer(f"the cast was fine {r % N_TRAIN}")["input_ids"][1:]  # without [CLS]; ends with [SEP]
        assert second.tolist() == want
    assert train.augmented_texts(rows, 0) != [train.texts[r % N_TRAIN] for r in rows]
