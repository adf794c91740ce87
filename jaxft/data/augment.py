"""EDA augmentation of the train split (`data.augment`; Wei & Zou 2019, "EDA: Easy Data Augmentation
Techniques for Boosting Performance on Text Classification Tasks", https://arxiv.org/abs/1901.11196).

Each train example gets `copies` augmented copies beside the original. A copy applies one EDA operation,
chosen uniformly among those with a non-zero rate (as EDA does), to a sentence of L words:

    synonym_replacement  α: n = max(1, ⌊α·L⌋) distinct words that have synonyms are each replaced by one
    random_insertion     α: n synonyms of random words of the sentence are inserted at random positions
    random_swap          α: n times, two random words swap places
    random_deletion      p: each word is deleted with probability p (one random word is kept if none is)

Copies are made on the fly, when their batch is built, from a generator seeded by
(train.seed, epoch, example index, copy index): every epoch sees new copies, two runs with the same seed see
the same batches, and a resumed run sees exactly what the uninterrupted run saw. Only the train split is
augmented (validation carved from train is carved before); labels are those of the original. Of a text
pair (`data.text_pair_field`), the first text is augmented and the second kept.

Synonyms come from `data.augment.synonyms` (TSV `word<TAB>syn1,syn2` or JSON `{word: [syns]}`; any language),
else from WordNet when nltk and the WordNet database are installed (Debian's `wordnet-base` at
/usr/share/wordnet, or an nltk_data folder that already holds `corpora/wordnet`; nothing is downloaded).
WordNet skips EDA's English stop words; a synonym file is taken as written.

Words: whitespace-separated tokens; runs of Chinese/Japanese characters (written without spaces) are split
with `jieba` when it is installed (`cjk_words: auto | jieba`), else into single characters.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from jaxft.data.batches import Batches, Position
from jaxft.data.sources import DataError
from jaxft.data.tokenize import Encoded, encode

log = logging.getLogger("jaxft")

OPERATIONS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")
WORDNET_DIRS = ("/usr/share/wordnet",)  # Debian/Ubuntu `wordnet-base`
# WordNet 3.0's lexicographer files in id order (lexnames(5WN)); nltk's reader needs them, Debian ships no file
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
            "adj.ppl").split()
LEX_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_SEED_TAG = 0x45444121  # keeps these streams apart from the shuffling one, which is seeded by (seed, epoch)

# EDA's stop words (its reference code's list): never replaced or used for insertion with WordNet.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is are
was were be been being have has had having do does did doing a an the and but if or because as until while
of at by for with about against between into through during before after above below to from up down in out
on off over under again further then once here there when where why how all any both each few more most
other some such no nor not only own same so than too very s t can will just don should now
""".split())

# Han (with extension A and compatibility ideographs), hiragana, katakana: scripts written without spaces.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]+")


# ---------------------------------------------------------------------------------------------- synonyms

class SynonymFile:
    """`word → synonyms` from a TSV (`word<TAB>syn1,syn2`) or JSON (`{word: [syns]}`) file."""

    def __init__(self, path: str):
        p = Path(path).expanduser()
        key = f"data.augment.synonyms={path}"
        if not p.is_file():
            raise DataError(f"{key}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{key} cannot be read as UTF-8 text: {e}") from None
        table = self._json(text, key) if p.suffix.lower() == ".json" else self._tsv(text, key)
        self.table = {w: tuple(dict.fromkeys(s for s in syns if s and s != w)) for w, syns in table.items()}
        self.description = f"file {p} ({len(self.table)} words)"

    @staticmethod
    def _json(text: str, key: str) -> dict[str, list[str]]:
        try:
            table = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{key} is not valid JSON: {e}") from None
        if not isinstance(table, dict):
            raise DataError(f"{key} must hold a JSON object {{word: [synonyms]}}")
        for word, syns in table.items():
            if not isinstance(syns, list) or not all(isinstance(s, str) for s in syns):
                raise DataError(f"{key}: the synonyms of {word!r} must be a list of strings, got {syns!r}")
        return {w.strip(): [s.strip() for s in syns] for w, syns in table.items()}

    @staticmethod
    def _tsv(text: str, key: str) -> dict[str, list[str]]:
        table: dict[str, list[str]] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip():
                raise DataError(f"{key}, line {n}: expected word<TAB>synonym1,synonym2, got {line!r}")
            table.setdefault(parts[0].strip(), []).extend(s.strip() for s in parts[1].split(","))
        return table

    def __call__(self, word: str) -> tuple[str, ...]:
        return self.table.get(word) or self.table.get(word.lower(), ())


class WordNetSynonyms:
    """Lemma names of every WordNet synset of the word (EDA's choice), read by nltk from a local database."""

    def __init__(self, reader, where: str):
        self.reader, self.description = reader, f"WordNet ({where}, read by nltk)"
        self.lookup = lru_cache(maxsize=None)(self._lookup)

    @classmethod
    def installed(cls) -> "WordNetSynonyms | None":
        """The installed WordNet, or None when nltk or the database is absent. Never downloads."""
        try:
            import nltk
            from nltk.corpus.reader.wordnet import WordNetCorpusReader
        except ImportError:
            return None
        try:
            root = nltk.data.find("corpora/wordnet")  # an nltk_data folder (or zip) already on disk
        except LookupError:
            root = next((d for d in WORDNET_DIRS if (Path(d) / "index.noun").is_file()), None)
            if root is None:
                return None
            if root not in nltk.data.path:  # nltk ≥ 3.9 reads files only under its data paths
                nltk.data.path.append(root)

        class Reader(WordNetCorpusReader):
            """Debian's database lacks the `lexnames` file, a fixed table of WordNet 3.0: served from LEXNAMES."""

            def open(self, fileid):
                if fileid == "lexnames" and isinstance(root, str) and not (Path(root) / fileid).is_file():
                    return io.StringIO("".join(f"{i:02d}\t{name}\t{LEX_POS[name.split('.')[0]]}\n"
                                               for i, name in enumerate(LEXNAMES)))
                return super().open(fileid)

            def map_wn(self, version="wordnet"):  # the map to nltk's own WordNet 3.0 serves only OMW languages
                return None

        with warnings.catch_warnings():  # "multilingual functions are not available": only English is used
            warnings.simplefilter("ignore")
            return cls(Reader(root, None), str(root))

    def _lookup(self, word: str) -> tuple[str, ...]:
        w = word.lower()
        if w in STOP_WORDS:
            return ()
        names = {lemma.name().replace("_", " ").replace("-", " ").lower()
                 for synset in self.reader.synsets(w) for lemma in synset.lemmas()}
        return tuple(sorted(n for n in names if n != w and re.fullmatch(r"[a-z ]+", n)))

    def __call__(self, word: str) -> tuple[str, ...]:
        return self.lookup(word)


def synonym_source(section):
    """The synonyms a config asks for: its file, else WordNet; None when no operation needs any.
    Raises `DataError` naming the key when synonyms are needed and neither source is there."""
    if section.synonyms:
        return SynonymFile(section.synonyms)
    if not (section.synonym_replacement or section.random_insertion):
        return None
    wordnet = WordNetSynonyms.installed()
    if wordnet is None:
        raise DataError(
            "data.augment.synonym_replacement / random_insertion need synonyms: give a file in "
            "data.augment.synonyms (TSV word<TAB>syn1,syn2 or JSON {word: [synonyms]}), or install WordNet "
            "(pip install nltk, plus the database: apt-get install wordnet-base, or an nltk_data folder holding "
            "corpora/wordnet), or set both rates to 0")
    return wordnet


# ---------------------------------------------------------------------------------------------- words

def word_splitter(mode: str):
    """`text → words` for `data.augment.cjk_words` (auto: jieba when installed, else characters)."""
    jieba = None
    if mode in ("auto", "jieba"):
        try:
            import jieba
            jieba.setLogLevel(logging.WARNING)
        except ImportError:
            if mode == "jieba":
                raise DataError("data.augment.cjk_words=jieba: jieba is not installed (pip install jieba), "
                                "or use cjk_words=chars") from None
    cut = jieba.lcut if jieba is not None else list

    def split(text: str) -> list[str]:
        words = []
        for token in text.split():
            if not _CJK.search(token):
                words.append(token)
                continue
            at = 0
            for m in _CJK.finditer(token):  # CJK runs cut into words; what lies between them kept whole
                if m.start() > at:
                    words.append(token[at:m.start()])
                words.extend(w for w in cut(m.group()) if w.strip())
                at = m.end()
            if at < len(token):
                words.append(token[at:])
        return words

    split.segmenter = "whitespace" + ("; CJK runs: jieba" if jieba is not None else "; CJK runs: characters")
    return split


def join_words(words: list[str]) -> str:
    """Words back to text: a space between two words, none where either side is a CJK character."""
    out = []
    for w in words:
        if out and not (_CJK.match(out[-1][-1]) or _CJK.match(w[0])):
            out.append(" ")
        out.append(w)
    return "".join(out)


# ---------------------------------------------------------------------------------------------- operations

def copy_rng(seed: int, epoch: int, index: int, copy: int) -> np.random.Generator:
    """The generator of copy `copy` (1-based) of train example `index` in epoch `epoch`."""
    return np.random.default_rng([_SEED_TAG, seed & (2**64 - 1), epoch, index, copy])


class Augmenter:
    """The EDA operations with `data.augment`'s rates over one synonym source and one word splitter."""

    def __init__(self, section, synonyms, split_words):
        self.rates = {op: getattr(section, op) for op in OPERATIONS}
        self.ops = [op for op in OPERATIONS if self.rates[op] > 0]
        self.synonyms, self.split = synonyms, split_words

    def words(self, words: list[str], rng: np.random.Generator) -> tuple[list[str], str]:
        """One copy of `words`: → (new words, the operation applied)."""
        op = self.ops[int(rng.integers(len(self.ops)))]
        return getattr(self, op)(list(words), self.rates[op], rng), op

    def __call__(self, text: str, rng: np.random.Generator) -> str:
        words = self.split(text)
        return join_words(self.words(words, rng)[0]) if words else text

    @staticmethod
    def _count(rate: float, n_words: int) -> int:
        return max(1, int(rate * n_words))

    def synonym_replacement(self, words, rate, rng):
        candidates = [i for i, w in enumerate(words) if self.synonyms(w)]
        chosen = rng.permutation(len(candidates))[:self._count(rate, len(words))]
        for k in sorted(chosen):
            syns = self.synonyms(words[candidates[k]])
            words[candidates[k]] = syns[int(rng.integers(len(syns)))]
        return words

    def random_insertion(self, words, rate, rng):
        sources = [w for w in words if self.synonyms(w)]
        if not sources:
            return words
        for _ in range(self._count(rate, len(words))):
            syns = self.synonyms(sources[int(rng.integers(len(sources)))])
            words.insert(int(rng.integers(len(words) + 1)), syns[int(rng.integers(len(syns)))])
        return words

    def random_swap(self, words, rate, rng):
        n = len(words)
        if n < 2:
            return words
        for _ in range(self._count(rate, n)):
            i = int(rng.integers(n))
            j = int(rng.integers(n - 1))
            j += j >= i  # a position other than i
            words[i], words[j] = words[j], words[i]
        return words

    @staticmethod
    def random_deletion(words, rate, rng):
        if len(words) < 2:
            return words
        keep = rng.random(len(words)) >= rate
        if not keep.any():
            keep[int(rng.integers(len(words)))] = True
        return [w for w, k in zip(words, keep) if k]


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class AugmentReport:
    """What augmentation adds to the train split, for data_report.json and the log."""

    split: str
    rows_in: int
    copies: int
    operations: dict[str, float]
    synonyms: str
    words: str
    synonym_coverage: float | None = None  # share of train words that have a synonym
    rows_out: int = field(init=False)

    def __post_init__(self):
        self.rows_out = self.rows_in * (1 + self.copies)

    def summary(self) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in self.operations.items() if v)
        cover = "" if self.synonym_coverage is None else f", {self.synonym_coverage:.1%} of words have synonyms"
        return (f"augment {self.split}: {self.rows_in} rows + {self.copies} EDA copies each = {self.rows_out} rows "
                f"per epoch ({ops}; synonyms: {self.synonyms}{cover}; words: {self.words})")


class AugmentedBatches(Batches):
    """Train batches over `rows_in × (1 + copies)` rows: row `r` is copy `r // rows_in` of example
    `r % rows_in`, copy 0 being the original (tokenized once, from the cache). The other copies are
    augmented and tokenized when their batch is built. `example_ids` hold `r`, so batches.jsonl shows
    which copy of which example each step trained on.
    """

    def __init__(self, base: Batches, texts: list[str], pairs: list[str] | None, copies: int,
                 augmenter: Augmenter, tokenizer):
        vars(self).update(vars(base))  # the base's examples, labels, batch size, padding and seed
        self.texts, self.pairs, self.copies = texts, pairs, copies
        self.augmenter, self.tokenizer = augmenter, tokenizer

    @property
    def rows(self) -> int:
        return len(self.enc) * (1 + self.copies)

    def row_lengths(self) -> np.ndarray:
        """Copies are grouped by their original's length (theirs is known only once they are made)."""
        return np.tile(self.enc.lengths(), 1 + self.copies)

    def next(self) -> dict[str, np.ndarray]:
        per_epoch = len(self) * self.batch_size if self.drop_remainder else self.rows
        if self.position.offset >= per_epoch:
            self.position = Position(self.position.epoch + 1, 0)
        epoch, start = self.position.epoch, self.position.offset
        rows = self.order(epoch)[start:start + self.batch_size]
        self.position = Position(epoch, start + len(rows))
        return self.collate_rows(rows, epoch)

    def augmented_texts(self, rows: np.ndarray, epoch: int) -> list[str]:
        """The texts of (augmented) rows in `epoch`: a pure function of the seed, epoch, example and copy."""
        n = len(self.enc)
        return [self.augmenter(self.texts[r % n], copy_rng(self.seed, epoch, int(r % n), int(r // n)))
                for r in rows]

    def collate_rows(self, rows: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        n = len(self.enc)
        src, copy = rows % n, rows // n
        aug = rows[copy > 0]
        fresh = encode(self.tokenizer, self.augmented_texts(aug, epoch),
                       None if self.pairs is None else [self.pairs[r % n] for r in aug],
                       self.max_length, cache=None) if len(aug) else None  # one-off texts: not worth caching
        examples, j = [], 0
        for i, c in zip(src, copy):
            if c == 0:
                examples.append(self.enc.example(int(i)))
            else:
                examples.append({k: v for k, v in fresh.example(j).items() if k in self.enc.fields})
                j += 1
        enc = Encoded.from_lists({k: [e[k] for e in examples] for k in self.enc.fields})
        batch = self.pad(enc, np.arange(len(rows)), self.width(enc.lengths()))
        batch.update(self.row_fields(src))  # labels (and any other per-example array) of the originals
        batch["example_ids"][:len(rows)] = rows
        return batch


def augment_batches(base: Batches, texts: list[str], pairs: list[str] | None, section, tokenizer,
                    split: str = "train") -> tuple[AugmentedBatches, AugmentReport]:
    """Wrap a split's batches with `section.copies` EDA copies per example (`data.augment`)."""
    synonyms = synonym_source(section)
    split_words = word_splitter(section.cjk_words)
    augmenter = Augmenter(section, synonyms, split_words)
    batches = AugmentedBatches(base, texts, pairs, section.copies, augmenter, tokenizer)
    coverage = None
    if synonyms is not None:
        counts: dict[str, int] = {}
        for t in texts:
            for w in split_words(t):
                counts[w] = counts.get(w, 0) + 1
        total = sum(counts.values())
        coverage = sum(c for w, c in counts.items() if synonyms(w)) / max(total, 1)
        if coverage == 0 and (section.synonym_replacement or section.random_insertion):
            log.warning("data.augment: no word of the %s split has a synonym in %s: synonym replacement and "
                        "random insertion will change nothing", split, synonyms.description)
    report = AugmentReport(split, len(texts), section.copies, {op: getattr(section, op) for op in OPERATIONS},
                           synonyms.description if synonyms is not None else "none needed",
                           split_words.segmenter, coverage)
    log.info("%s", report.summary())
    return batches, report
