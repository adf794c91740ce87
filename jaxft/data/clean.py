"""Basic cleaning for classification rows and the label map, each with counts a user can read.

Cleaning (on by default, `data.clean.*`): drop rows with empty text, drop rows whose label is missing
(or outside `num_labels`), drop exact duplicate rows (train only: duplicates in eval splits are real
test cases). A label in validation/test that train never had is an error: the model cannot predict it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Rows:
    """Aligned columns of one split, plus the original row numbers (1-based, header excluded)."""

    text: list[str]
    pair: list[str] | None
    label: list
    row: list[int]

    def __len__(self) -> int:
        return len(self.text)

    def take(self, idx) -> "Rows":
        return Rows([self.text[i] for i in idx], None if self.pair is None else [self.pair[i] for i in idx],
                    [self.label[i] for i in idx], [self.row[i] for i in idx])


@dataclass
class CleanReport:
    split: str
    rows_in: int
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)  # a few row numbers per reason

    @property
    def rows_out(self) -> int:
        return self.rows_in - sum(self.dropped.values())

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(row)

    def summary(self) -> str:
        if not self.dropped:
            return f"{self.split}: {self.rows_in} rows, none dropped"
        parts = ", ".join(f"{n} {reason} (e.g. rows {self.examples[reason]})"
                          for reason, n in self.dropped.items())
        return f"{self.split}: {self.rows_in} rows → {self.rows_out} kept; dropped {parts}"


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def _problem(text, pair, label, has_pair: bool, num_labels: int | None, drop_empty: bool,
             drop_bad_labels: bool) -> str | None:
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
    if isinstance(label, float) and not label.is_integer() or not isinstance(label, (str, int, float)):
        return "label of the wrong type"
    if num_labels is not None and isinstance(label, int) and not 0 <= label < num_labels:
        return f"label outside 0..{num_labels - 1}"
    return None


def clean(rows: Rows, split: str, *, drop_empty: bool, drop_bad_labels: bool, dedup: bool,
          num_labels: int | None = None, on_bad_rows: str = "skip", where: str = "") -> tuple[Rows, CleanReport]:
    """Drop unusable rows (counted per reason), or raise on the first with `on_bad_rows="error"`."""
    report = CleanReport(split, len(rows))
    keep, seen = [], set()
    for i in range(len(rows)):
        text, pair, label = rows.text[i], None if rows.pair is None else rows.pair[i], rows.label[i]
        reason = _problem(text, pair, label, rows.pair is not None, num_labels, drop_empty, drop_bad_labels)
        if reason is not None and on_bad_rows == "error":
            raise ValueError(f"row {rows.row[i]} of {where or split}: {reason} (text={text!r}, label={label!r}); "
                             f"set data.on_bad_rows=skip to drop such rows")
        if reason is None and dedup:
            k = (text, pair, label)
            reason = "exact duplicate" if k in seen else None
            seen.add(k)
        if reason is not None:
            report.drop(reason, rows.row[i])
            continue
        keep.append(i)
    return rows.take(keep), report


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
