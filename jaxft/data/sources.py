"""Where rows come from: local files (tsv, csv, jsonl, json, parquet), `hf:NAME[/CONFIG]:SPLIT` or
`tfds:NAME[/CONFIG]:SPLIT`.

Files and Hub sets are read through `datasets` (Arrow-backed, cached); TSV is read without quote processing,
since real TSV corpora (SST-2, AG News) contain unbalanced quotes that CSV quoting would swallow.
TFDS sets are read with `tfds.data_source` (random access over ArrayRecord files, no TensorFlow) from a
prepared copy in `data.tfds_data_dir`; see `jaxft.data.tfds_source`.
"""

from __future__ import annotations

import csv
from pathlib import Path

BUILDERS = {
    # undecodable bytes become U+FFFD, so that cleaning can count and drop those rows
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False,
                     "encoding_errors": "replace"}),
    ".csv": ("csv", {"keep_default_na": False, "encoding_errors": "replace"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


class DataError(ValueError):
    """A data problem; the message names the file, key, row or field."""


def load_table(spec: str, key: str, limit: int | None = None, tfds_data_dir: str | None = None) -> dict[str, list]:
    """Read a data spec into columns `{name: [values]}`. `key` (e.g. `data.train`) names it in errors;
    `tfds_data_dir` is where `tfds:` specs are read from (None: TFDS's default, ~/tensorflow_datasets)."""
    if spec.startswith("tfds:"):
        from jaxft.data.tfds_source import load_tfds

        return load_tfds(spec, key, limit, tfds_data_dir)
    import datasets

    datasets.disable_progress_bars()
    if spec.startswith("hf:"):
        parts = spec[3:].rsplit(":", 1)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise DataError(f"{key}={spec!r}: Hub sources are written hf:NAME[/CONFIG]:SPLIT")
        name, split = parts
        config = None
        if name.count("/") == 2:  # ORG/NAME/CONFIG; a single slash is a Hub repo id (ORG/NAME)
            name, config = name.rsplit("/", 1)
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # offline, unknown repo or split, no access: say which key and spec
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            offline = " (Hugging Face offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if \
                datasets.config.HF_HUB_OFFLINE else ""
            raise DataError(f"{key}={spec!r}: cannot load the Hub data set {name!r}{offline}: {first}") from None
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"{key}: data file {path} does not exist")
        if path.is_dir():
            raise DataError(f"{key}: {path} is a folder; give a data file")
        suffix = path.suffix.lower()
        if suffix not in BUILDERS:
            raise DataError(f"{key}: cannot read {path}: supported file types are {sorted(BUILDERS)}")
        builder, kwargs = BUILDERS[suffix]
        try:
            ds = datasets.load_dataset(builder, data_files={"rows": str(path)}, split="rows", **kwargs)
        except Exception as e:
            raise DataError(f"{key}: cannot read {path}: {_why(e, path)}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_dict()


def _why(e: Exception, path: Path) -> str:
    """What `datasets` could not read: the first line that is not JSON of a JSON-lines file, else the
    innermost cause (its wrapper says only "An error occurred while generating the dataset")."""
    if path.suffix.lower() == ".jsonl":
        import json

        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as bad:
                        return f"line {i} is not valid JSON ({bad})"
    causes, seen = [], e
    while seen is not None and len(causes) < 10:
        causes.append(f"{type(seen).__name__}: {seen}".strip().splitlines()[0][:300])
        seen = seen.__cause__ or seen.__context__
    return causes[0] if len(causes) == 1 else f"{causes[0]} ({causes[-1]})"


def require_column(table: dict[str, list], field: str, key: str, spec: str) -> list:
    if field not in table:
        raise DataError(f"{key}={field!r} is not a column of {spec} (columns: {', '.join(table)})")
    return table[field]
