"""Data for fine-tuning: source → clean → split → tokenize (cached) → deterministic padded batches."""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np

from jaxft.config import Config
from jaxft.data.augment import AugmentReport, augment_batches
from jaxft.data.batches import Batches
from jaxft.data.clean import CleanReport, LabelMap, Rows, clean_splits
from jaxft.data.sft import SFTReport, build_sft, pack
from jaxft.data.sources import DataError, load_table, require_column
from jaxft.data.tokenize import cache_dir, encode

log = logging.getLogger("jaxft")
SPLITS = ("train", "validation", "test")


@dataclass
class ClassificationData:
    label_map: LabelMap
    splits: dict[str, Batches] = field(default_factory=dict)
    reports: list[CleanReport] = field(default_factory=list)
    augment: AugmentReport | None = None  # data.augment: the EDA copies added to train


def _read_rows(cfg: Config, split: str) -> Rows:
    d = cfg.data
    spec = getattr(d, split)
    key = f"data.{split}"
    table = load_table(spec, key, d.max_train_rows if split == "train" else None, d.tfds_data_dir)
    text = require_column(table, d.text_field, "data.text_field", spec)
    pair = require_column(table, d.text_pair_field, "data.text_pair_field", spec) if d.text_pair_field else None
    label = require_column(table, d.label_field, "data.label_field", spec)
    as_text = lambda col: [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in col]
    return Rows(as_text(text), None if pair is None else as_text(pair), list(label),
                list(range(1, len(text) + 1)))


def carve_validation(splits: dict, cfg: Config) -> None:
    """`data.validation_fraction`: move a seeded random share of train (≥ 1 example) to validation.

    `splits` maps split names to anything with `len` and `take(indices)` (rows or encoded examples).
    """
    d = cfg.data
    if not d.validation_fraction or "train" not in splits:
        return
    if d.validation is not None:
        raise DataError("set data.validation or data.validation_fraction, not both")
    train = splits["train"]
    perm = np.random.default_rng(cfg.train.seed).permutation(len(train))
    n_val = max(1, int(round(len(train) * d.validation_fraction)))
    splits["validation"], splits["train"] = train.take(perm[:n_val]), train.take(perm[n_val:])


def read_clean_rows(cfg: Config, tokenizer, splits: tuple[str, ...] = SPLITS, regression: bool = False
                    ) -> tuple[dict[str, Rows], list[CleanReport]]:
    """Read every configured split and apply the `data.clean` rules (jaxft.data.clean), logging each report.
    The tokenizer is used only for `data.clean.min_tokens`/`max_tokens`; `regression`: numeric labels."""
    d = cfg.data
    where = {split: getattr(d, split) for split in splits if getattr(d, split) is not None}
    raw = {split: _read_rows(cfg, split) for split in where}
    rows, reports = clean_splits(raw, d.clean, num_labels=cfg.model.num_labels, on_bad_rows=d.on_bad_rows,
                                 where=where, tokenizer=tokenizer, regression=regression)
    for report in reports:
        log.info("clean %s", report.summary())
        for split, n in report.leaked_kept.items():
            log.warning("%d train rows have a text that is also in %s (data.%s): evaluation there partly "
                        "measures memorisation; data.clean.drop_leakage=true drops them", n, split, split)
        if report.rows_out == 0:
            raise DataError(f"data.{report.split} ({where[report.split]}) has no usable rows after cleaning: "
                            f"{report.summary()}")
    return rows, reports


def build_classification_data(cfg: Config, tokenizer, label_map: LabelMap | None = None,
                              splits: tuple[str, ...] = SPLITS, regression: bool = False) -> ClassificationData:
    """Read, clean, label-encode, tokenize and batch every configured split.

    `label_map` is given when resuming or evaluating a run (the run's own map, saved at its start);
    otherwise it is built from the cleaned train split. With `regression` the label is a number: the
    batches carry it as float32 `targets` (and `labels` 0, the one output column), and the label map is
    that one column, named after `data.label_field`.
    """
    d = cfg.data
    rows, reports = read_clean_rows(cfg, tokenizer, splits, regression)

    if regression:
        label_map = LabelMap((d.label_field,), (d.label_field,))
    elif label_map is None:
        if "train" not in rows:
            raise DataError("data.train is needed to build the label map")
        label_map = LabelMap.from_labels(rows["train"].label, cfg.model.num_labels)
    if cfg.model.num_labels is not None and len(label_map) > cfg.model.num_labels:
        raise DataError(f"model.num_labels={cfg.model.num_labels}, but train has {len(label_map)} labels: "
                        f"{list(label_map.names)}")

    carve_validation(rows, cfg)

    out = ClassificationData(label_map, reports=reports)
    cache = cache_dir(d.cache_dir)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    for split, r in rows.items():
        where = getattr(d, split) or f"data.train (validation_fraction={d.validation_fraction})"
        if regression:
            fields = {"labels": np.zeros(len(r), np.int32), "targets": np.asarray(r.label, np.float32)}
        else:
            fields = {"labels": np.asarray(label_map.encode(r, str(where)), np.int32)}
        enc = encode(tokenizer, r.text, r.pair, d.max_length, cache, desc=f"tokenize {split}")
        is_train = split == "train"
        out.splits[split] = Batches(
            enc, fields, cfg.train.batch_size if is_train else eval_bs, pad_id=tokenizer.pad_token_id or 0,
            max_length=d.max_length, padding=d.padding, pad_to_multiple_of=d.pad_to_multiple_of,
            shuffle=is_train, seed=cfg.train.seed, drop_remainder=is_train,
            group_by_length=d.group_by_length)
        if is_train and d.augment.copies:  # EDA copies, made per batch and seeded (jaxft/data/augment.py)
            out.splits[split], out.augment = augment_batches(out.splits[split], r.text, r.pair, d.augment, tokenizer)
    return out


def chat_template(cfg: Config) -> str | None:
    """`data.chat_template` as given, or the contents of the file it names."""
    t = cfg.data.chat_template
    where = "data.chat_template"
    if t is not None and "{" not in t:
        path = Path(t).expanduser()
        if not path.exists():
            raise DataError(f"data.chat_template={t!r} is neither a Jinja template nor an existing file")
        if not path.is_file():
            raise DataError(f"data.chat_template={t!r} is a folder, not a template file")
        t, where = path.read_text(), f"data.chat_template (file {path})"
    if t is not None:
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:  # a syntax error here, naming the key, rather than a traceback from the first rendered row
            _compile_jinja_template(t)  # transformers' environment ({% generation %} markers and all)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{where} is not a valid Jinja template: {e.message} (line {e.lineno})") from None
    return t


def encode_chat_splits(cfg: Config, tokenizer, splits: tuple[str, ...], build, kind: str):
    """The causal-LM data path shared by SFT and preference rows: resolve the chat template, read each
    configured split, encode it with `build(table, tokenizer, data_section, split) -> (encoded, report)`,
    log the report and carve the validation split. → `(data section, encoded {split: ...}, reports, template)`."""
    template = chat_template(cfg)
    d = cfg.data.model_copy(update={"chat_template": template})
    encoded, reports = {}, []
    for split in splits:
        spec = getattr(d, split)
        if spec is None:
            continue
        table = load_table(spec, f"data.{split}", d.max_train_rows if split == "train" else None, d.tfds_data_dir)
        encoded[split], report = build(table, tokenizer, d, split)
        log.info("%s %s", kind, report.summary())
        reports.append(report)
    carve_validation(encoded, cfg)
    return d, encoded, reports, template


def pad_token_id(tokenizer) -> int:
    """The id batches pad with: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def build_sft_data(cfg: Config, tokenizer, splits: tuple[str, ...] = SPLITS,
                   ) -> tuple[dict[str, Batches], list[SFTReport], str | None]:
    """Causal-LM splits: tokenized with loss masks, carved, optionally packed, batched."""
    d, encoded, reports, template = encode_chat_splits(cfg, tokenizer, splits, build_sft, "sft")
    pad_id = pad_token_id(tokenizer)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    splits = {}
    for split, enc in encoded.items():
        if d.packing:
            n = len(enc)
            enc = pack(enc, d.max_length, cfg.train.seed)
            log.info("packed %d %s examples into %d rows of ≤ %d tokens", n, split, len(enc), d.max_length)
        is_train = split == "train"
        splits[split] = Batches(enc, None, cfg.train.batch_size if is_train else eval_bs, pad_id=pad_id,
                                max_length=d.max_length, padding=d.padding, pad_to_multiple_of=d.pad_to_multiple_of,
                                shuffle=is_train, seed=cfg.train.seed, drop_remainder=is_train,
                                group_by_length=d.group_by_length)
    return splits, reports, template
