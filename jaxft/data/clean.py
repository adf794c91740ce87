"""Cleaning of classification rows: every rule switchable (`data.clean.*`), every effect counted.

Per split, in this order (jaxft.data.text_rules has the repairs):
  1. rows that cannot be used are dropped: text of the wrong type, undecodable bytes, empty text (after
     the repairs), a missing label or one of the wrong type or outside `model.num_labels` (for a regression
     task, `tasks[i].kind=regression`, a label that is not a finite number);
  2. text is repaired in every split alike (the model must see at test time what it saw in training):
     `repair_escapes`, `normalize_unicode` (NFKC), `collapse_whitespace` — each row changed is counted;
then on train only (duplicates and odd lengths in evaluation splits are real test cases):
  3. `min_chars`/`max_chars`/`min_tokens`/`max_tokens`: rows outside the length bounds;
  4. `dedup_train`: exact duplicate rows (text, pair and label as in the file);
  5. `dedup_normalized`: rows equal after normalisation (`text_rules.match_key`: repaired, NFKC, case-folded,
     whitespace collapsed) with the same label;
  6. `conflicting_labels`: a text found with different labels: `drop` every row of it, or keep the `majority`
     label's rows (counted before de-duplication; a tie drops all), or `keep` (regression targets are
     compared as numbers: one text with targets 0.5 and 0.7 conflicts);
  7. `drop_leakage`: train rows whose normalised text is also in validation or test (evaluation would
     measure memorisation). Off by default (a validation file cut from train is a common smoke test and
     would lose its rows, or empty train); such rows are counted and warned about either way.
A label in validation/test that train never had is an error (LabelMap.encode): the model cannot predict it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from jaxft.data.text_rules import REPAIRS, match_key

SAMPLES = 3  # examples kept per rule (row numbers, and the text before → after)


@dataclass
class Rows:
    """Aligned columns of one split, plus the original row numbers (1-based, header excluded).

    `exact` holds each row's (text, pair, label) as read from the file, before any repair, for the exact
    duplicate rule."""

    text: list[str]
    pair: list[str] | None
    label: list
    row: list[int]
    exact: list | None = None

    def __len__(self) -> int:
        return len(self.text)

    def take(self, idx) -> "Rows":
        pick = lambda col: None if col is None else [col[i] for i in idx]
        return Rows(pick(self.text), pick(self.pair), pick(self.label), pick(self.row), pick(self.exact))

    def keys(self) -> list[tuple]:
        """Normalised (text, pair) of each row: how duplicates, conflicts and leakage are matched."""
        pairs = self.pair or [None] * len(self)
        return [(match_key(t), match_key(p)) for t, p in zip(self.text, pairs)]


@dataclass
class CleanReport:
    split: str
    rows_in: int
    dropped: dict[str, int] = field(default_factory=dict)         # reason → rows dropped
    examples: dict[str, list[int]] = field(default_factory=dict)  # a few row numbers per reason
    modified: dict[str, int] = field(default_factory=dict)        # repair rule → rows changed
    samples: dict[str, list[dict]] = field(default_factory=dict)  # reason/rule → a few {row, text | before, after}
    conflicting_texts: int = 0                                     # distinct texts found with different labels
    leaked_kept: dict[str, int] = field(default_factory=dict)     # split → train rows kept although in it

    @property
    def rows_out(self) -> int:
        return self.rows_in - sum(self.dropped.values())

    def drop(self, reason: str, row: int, text=None, **extra) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < SAMPLES:
            self.examples[reason].append(row)
            self.samples.setdefault(reason, []).append({"row": row, "text": text, **extra})

    def modify(self, rule: str, row: int, before: str, after: str) -> None:
        self.modified[rule] = self.modified.get(rule, 0) + 1
        if len(self.samples.setdefault(rule, [])) < SAMPLES:
            self.samples[rule].append({"row": row, "before": before, "after": after})

    def summary(self) -> str:
        changed = "".join(f", {n} changed by {rule}" for rule, n in self.modified.items())
        if not self.dropped:
            return f"{self.split}: {self.rows_in} rows, none dropped{changed}"
        parts = ", ".join(f"{n} {reason} (e.g. rows {self.examples[reason]})"
                          for reason, n in self.dropped.items())
        return f"{self.split}: {self.rows_in} rows → {self.rows_out} kept; dropped {parts}{changed}"


def report_table(reports: list[CleanReport]) -> str:
    """The reports as one Markdown table: a line per rule, a column per split (rows dropped or changed)."""
    splits = [r.split for r in reports]
    lines = ["| rule | " + " | ".join(splits) + " |", "| --- |" + " ---: |" * len(splits),
             "| rows read | " + " | ".join(str(r.rows_in) for r in reports) + " |"]
    for kind, attr in (("dropped", "dropped"), ("changed", "modified")):
        names = list(dict.fromkeys(k for r in reports for k in getattr(r, attr)))
        for name in names:
            counts = " | ".join(str(getattr(r, attr).get(name, 0)) for r in reports)
            lines.append(f"| {kind}: {name} | {counts} |")
    for split in dict.fromkeys(s for r in reports for s in r.leaked_kept):
        lines.append(f"| kept (drop_leakage=false): text also in {split} | "
                     + " | ".join(str(r.leaked_kept.get(split, 0)) for r in reports) + " |")
    if any(r.conflicting_texts for r in reports):
        lines.append("| texts with conflicting labels | " + " | ".join(str(r.conflicting_texts) for r in reports)
                     + " |")
    lines.append("| rows kept | " + " | ".join(str(r.rows_out) for r in reports) + " |")
    return "\n".join(lines) + "\n"


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def as_target(label) -> float | None:
    """A regression label as a finite float (numbers, or text such as "3.5"), or None when it is not one."""
    if isinstance(label, bool) or not isinstance(label, (str, int, float)):
        return None
    try:
        v = float(label)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _problem(text, pair, label, has_pair: bool, num_labels: int | None, drop_empty: bool,
             drop_bad_labels: bool, regression: bool = False) -> str | None:
    """Why a row cannot be used, or None."""
    for value in (text, pair) if has_pair else (text,):
        if value is not None and not isinstance(value, (str, int, float)):
            return "text of the wrong type"
        if isinstance(value, str) and "\ufffd" in value:
            return "undecodable bytes"
        if drop_empty and _missing(value):
            return "empty text"
    if not drop_bad_labels:
        return None
    if _missing(label):
        return "missing label"
    if regression:
        return None if as_target(label) is not None else "label not a finite number"
    if isinstance(label, float) and not label.is_integer() or not isinstance(label, (str, int, float)):
        return "label of the wrong type"
    if num_labels is not None and isinstance(label, int) and not 0 <= label < num_labels:
        return f"label outside 0..{num_labels - 1}"
    return None


def _repair(value, rules, changes: dict, row: int):
    """`value` through the switched-on repairs; each rule that changed it is recorded in `changes`
    (rule → (before, after)), so a row counts once per rule whether its text, its pair or both changed."""
    if not isinstance(value, str):
        return value
    for name, fn in rules:
        after = fn(value)
        if after != value:
            changes.setdefault(name, (value, after))
            value = after
    return value


def clean(rows: Rows, split: str, c, *, num_labels: int | None = None, on_bad_rows: str = "skip",
          where: str = "", regression: bool = False) -> tuple[Rows, CleanReport]:
    """Steps 1–2 of one split (`c` is the config's CleanSection): repair the text, drop unusable rows
    (counted per reason), or raise on the first with `on_bad_rows="error"`. With `regression` a label must
    be a finite number and is kept as a float (so "3.5" and 3.5 are one target for the later rules)."""
    report = CleanReport(split, len(rows))
    rules = [(name, fn) for name, fn in REPAIRS if getattr(c, name)]
    keep, text, pair = [], list(rows.text), None if rows.pair is None else list(rows.pair)
    exact = [(t, None if pair is None else pair[i], rows.label[i]) for i, t in enumerate(rows.text)]
    for i in range(len(rows)):
        changes = {}
        text[i] = _repair(text[i], rules, changes, rows.row[i])
        if pair is not None:
            pair[i] = _repair(pair[i], rules, changes, rows.row[i])
        reason = _problem(text[i], None if pair is None else pair[i], rows.label[i], pair is not None,
                          num_labels, c.drop_empty, c.drop_bad_labels, regression)
        if reason is not None and on_bad_rows == "error":
            raise ValueError(f"row {rows.row[i]} of {where or split}: {reason} (text={rows.text[i]!r}, "
                             f"label={rows.label[i]!r}); set data.on_bad_rows=skip to drop such rows")
        if reason is not None:
            report.drop(reason, rows.row[i], rows.text[i])
            continue
        for name, (before, after) in changes.items():
            report.modify(name, rows.row[i], before, after)
        keep.append(i)
    label = [as_target(v) for v in rows.label] if regression else rows.label
    return Rows(text, pair, label, rows.row, exact).take(keep), report


def token_lengths(tokenizer, rows: Rows) -> list[int]:
    """Tokens of each row (text, and pair where given) with the model's special tokens, untruncated."""
    out = []
    for s in range(0, len(rows), 1024):
        text = rows.text[s:s + 1024]
        pair = None if rows.pair is None else rows.pair[s:s + 1024]
        out += [len(ids) for ids in tokenizer(text, pair, truncation=False)["input_ids"]]
    return out


def _length_problem(n_chars: int, n_tokens: int | None, c) -> str | None:
    for n, unit, lo, hi in ((n_chars, "chars", c.min_chars, c.max_chars),
                            (n_tokens, "tokens", c.min_tokens, c.max_tokens)):
        if lo is not None and n < lo:
            return f"shorter than min_{unit}={lo}"
        if hi is not None and n > hi:
            return f"longer than max_{unit}={hi}"
    return None


def clean_train(rows: Rows, report: CleanReport, c, others: dict[str, Rows], tokenizer=None) -> Rows:
    """Steps 3–7, on the train split after `clean`: lengths, duplicates, conflicting labels, leakage.
    `others` are the cleaned validation/test splits (for leakage); `report` is train's, counts are added."""
    if c.min_tokens is not None or c.max_tokens is not None:
        if tokenizer is None:
            raise ValueError("data.clean.min_tokens/max_tokens need the model's tokenizer")
        n_tok = token_lengths(tokenizer, rows)
    else:
        n_tok = [None] * len(rows)
    n_char = [len(t) + len(rows.pair[i] if rows.pair else "") for i, t in enumerate(rows.text)]
    keys = rows.keys()
    votes = Counter((k, lab) for k, lab in zip(keys, rows.label))  # before de-duplication: the majority
    by_text: dict[tuple, set] = {}
    for k, lab in zip(keys, rows.label):
        by_text.setdefault(k, set()).add(lab)
    conflicts = {k for k, labs in by_text.items() if len(labs) > 1}
    report.conflicting_texts = len(conflicts)
    leaked = {}
    for split, other in others.items():
        for k in other.keys():
            leaked.setdefault(k, split)
    seen_exact, seen_norm, keep = set(), set(), []
    for i, k in enumerate(keys):
        row, label, text, extra = rows.row[i], rows.label[i], rows.text[i], {}
        reason = _length_problem(n_char[i], n_tok[i], c)
        if reason is None and c.dedup_train:
            reason = "exact duplicate" if rows.exact[i] in seen_exact else None
            seen_exact.add(rows.exact[i])
        if reason is None and c.dedup_normalized:
            reason = "normalised duplicate" if (k, label) in seen_norm else None
            seen_norm.add((k, label))
        if reason is None and k in conflicts and c.conflicting_labels != "keep":
            counts = {lab: votes[(k, lab)] for lab in by_text[k]}
            top = max(counts.values())
            winners = [lab for lab, n in counts.items() if n == top]
            if c.conflicting_labels == "drop" or len(winners) > 1 or label != winners[0]:
                reason = "conflicting labels"
                extra = {"labels": {str(lab): n for lab, n in counts.items()}}
        if reason is None and k in leaked:  # counted always, dropped with drop_leakage
            if c.drop_leakage:
                reason = f"text also in {leaked[k]}"
            else:
                report.leaked_kept[leaked[k]] = report.leaked_kept.get(leaked[k], 0) + 1
        if reason is not None:
            report.drop(reason, row, text, **extra)
            continue
        keep.append(i)
    return rows.take(keep)


def clean_splits(raw: dict[str, Rows], c, *, num_labels: int | None = None, on_bad_rows: str = "skip",
                 where: dict[str, str] | None = None, tokenizer=None, regression: bool = False
                 ) -> tuple[dict[str, Rows], list[CleanReport]]:
    """Every rule on every split read: `clean` per split, then `clean_train` on train against the others."""
    out, reports = {}, {}
    for split, rows in raw.items():
        out[split], reports[split] = clean(rows, split, c, num_labels=num_labels, on_bad_rows=on_bad_rows,
                                           where=(where or {}).get(split, split), regression=regression)
    if "train" in out:
        others = {s: r for s, r in out.items() if s != "train"}
        out["train"] = clean_train(out["train"], reports["train"], c, others, tokenizer)
    return out, list(reports.values())


@dataclass(frozen=True)
class LabelMap:
    """Labels as written in the data ↔ class indices. Integer labels 0..K-1 map to themselves."""

    names: tuple[str, ...]       # index → label as text (exported as id2label)
    values: tuple               # index → label as found in the data

    @classmethod
    def from_labels(cls, labels: list, num_labels: int | None = None) -> "LabelMap":
        """Sorted distinct labels; with `num_labels` and integer labels in range, exactly 0..num_labels-1."""
        uniq = set(labels)
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in uniq)
        if ints and num_labels is not None and all(0 <= v < num_labels for v in uniq):
            values = tuple(range(num_labels))
        else:
            values = tuple(sorted(uniq, key=lambda v: (str(type(v)), v)))
        return cls(tuple(str(v) for v in values), values)

    def __len__(self) -> int:
        return len(self.values)

    def encode(self, rows: Rows, where: str) -> list[int]:
        index = {v: i for i, v in enumerate(self.values)}
        by_name = {n: i for i, n in enumerate(self.names)}
        out = []
        for label, row in zip(rows.label, rows.row):
            i = index.get(label, by_name.get(str(label)))
            if i is None:
                raise ValueError(f"label {label!r} in row {row} of {where} never appears in the train data "
                                 f"(known labels: {list(self.names)}); the model cannot predict it")
            out.append(i)
        return out

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def to_json(self) -> dict:
        return {"names": list(self.names), "values": list(self.values)}

    @classmethod
    def from_json(cls, d: dict) -> "LabelMap":
        return cls(tuple(d["names"]), tuple(d["values"]))
