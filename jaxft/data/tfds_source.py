"""TFDS data sets as a source: `tfds:NAME[/CONFIG][:VERSION]:SPLIT` read with `tfds.data_source`.

`tfds.data_source` gives random access over a data set prepared in the ArrayRecord format, with no
TensorFlow installed (`tfds.load` would need it). The data set must already be prepared in
`data.tfds_data_dir` (a local folder or a bucket path; None: TFDS's default), e.g. by
`tfds build NAME --file_format=array_record --data_dir=DIR`: nothing is downloaded or built at train time,
where every host of a pod would race to build the same files.

The rows come back as the same columns as every other source (`{feature: [values]}`), so cleaning,
splitting, shuffling, per-host sharding and exact resume are those of the rest of the pipeline. Text
features come back from ArrayRecord as bytes and are decoded as UTF-8 (undecodable bytes become U+FFFD,
which cleaning counts and drops, as for files); ClassLabel features are their integer class ids.
"""

from __future__ import annotations

import numpy as np

from jaxft.data.sources import DataError

EXTRA = "pip install 'jaxft[tfds]'"
READ_CHUNK = 1024  # records per `__getitems__` call


def parse_spec(spec: str, key: str) -> tuple[str, str]:
    """`tfds:NAME[/CONFIG][:VERSION]:SPLIT` → (NAME[/CONFIG][:VERSION], SPLIT). The split is what follows the
    last colon outside brackets, so TFDS slices such as `train[:10%]` or `train[10:20]` are kept whole."""
    body, depth, cut = spec[len("tfds:"):], 0, -1
    for i, ch in enumerate(body):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == ":" and depth == 0:
            cut = i
    name, split = (body[:cut], body[cut + 1:]) if cut >= 0 else (body, "")
    if not name or not split:
        raise DataError(f"{key}={spec!r}: TFDS sources are written tfds:NAME[/CONFIG]:SPLIT "
                        "(e.g. tfds:imdb_reviews:train or tfds:imdb_reviews:train[:90%])")
    return name, split


def _import_tfds(spec: str, key: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{key}={spec!r}: TFDS sources need the optional tensorflow-datasets package "
                        f"({e}); install it with: {EXTRA}") from None
    return tfds


def _plain(value):
    """A decoded TFDS value as plain Python: bytes → str (UTF-8), numpy scalars and arrays → numbers and
    lists, nested dicts and sequences converted the same way."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _open(tfds, name: str, split: str, data_dir: str | None, spec: str, key: str):
    where = f"data.tfds_data_dir={data_dir}" if data_dir else "TFDS's default data dir (data.tfds_data_dir unset)"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError:  # its message goes on to list the whole TFDS catalog
        raise DataError(f"{key}={spec!r}: no TFDS data set {name!r} is prepared in {where}, and the TFDS catalog "
                        "has none of that name") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        try:
            prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
        except Exception:
            prepared = True  # then say only what TFDS said
        if not prepared:  # a catalog name with nothing prepared: TFDS would speak of TFRecord files
            raise DataError(f"{key}={spec!r}: the TFDS data set {name!r} is not prepared in {where}; prepare it "
                            f"there first, in the ArrayRecord format: tfds build {name.split(':')[0]} "
                            "--file_format=array_record --data_dir=DIR") from None
        raise DataError(f"{key}={spec!r}: cannot read split {split!r} of the TFDS data set {name!r} from "
                        f"{where}: {first}") from None


def _records(source, keys: list[int]) -> list:
    """The records at `keys`: one `__getitems__` call, or one read each where that call does not work
    (the mock source of `tfds.testing.mock_data` in tensorflow-datasets 4.9 raises a TypeError)."""
    try:
        return source.__getitems__(keys)
    except TypeError:
        return [source[k] for k in keys]


def load_tfds(spec: str, key: str, limit: int | None = None, data_dir: str | None = None) -> dict[str, list]:
    """Read a `tfds:` spec into columns `{feature: [values]}` (the first `limit` records when given)."""
    tfds = _import_tfds(spec, key)
    name, split = parse_spec(spec, key)
    source = _open(tfds, name, split, data_dir, spec, key)
    features = source.dataset_info.features
    if not hasattr(features, "keys"):
        raise DataError(f"{key}={spec!r}: the TFDS data set's features are a single {type(features).__name__}, "
                        "not named features; jaxft needs named fields (data.text_field, data.label_field)")
    columns: dict[str, list] = {f: [] for f in features.keys()}
    n = len(source) if limit is None else min(limit, len(source))
    for start in range(0, n, READ_CHUNK):
        for record in _records(source, list(range(start, min(start + READ_CHUNK, n)))):
            for f, col in columns.items():
                col.append(_plain(record[f]))
    return columns
