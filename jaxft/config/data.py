"""`data:`, `tasks:` and `sampling:` — sources, cleaning, augmentation, padding, multi-task data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jaxft.config.base import Section


class CleanSection(Section):
    """Cleaning rules of classification data (jaxft/data/clean.py), each switchable; counts per rule and split
    go to the log, RUN_DIR/data_report.json and data_report.md."""
    drop_empty: bool = Field(True, description="drop rows whose text is empty (after the repairs)")
    drop_bad_labels: bool = Field(True, description="drop rows whose label is missing, of the wrong type or "
                                  "outside 0..model.num_labels-1")
    repair_escapes: bool = Field(True, description="every split: HTML entities (also with the & lost: ' #39;', "
                                 "' quot;'), tags, doubled quotes and backslash escapes → plain text")
    normalize_unicode: bool = Field(True, description="every split: Unicode NFKC")
    collapse_whitespace: bool = Field(True, description="every split: runs of whitespace → one space, trimmed")
    min_chars: int | None = Field(None, ge=0, description="train: drop rows of fewer characters (text + pair)")
    max_chars: int | None = Field(None, ge=1, description="train: drop rows of more characters")
    min_tokens: int | None = Field(None, ge=0, description="train: drop rows of fewer tokens (untruncated)")
    max_tokens: int | None = Field(None, ge=1, description="train: drop rows of more tokens (untruncated)")
    dedup_train: bool = Field(True, description="train: drop exact duplicate rows (text, pair, label)")
    dedup_normalized: bool = Field(True, description="train: drop rows equal after normalisation (repaired, "
                                   "NFKC, case-folded, whitespace collapsed) with the same label")
    conflicting_labels: Literal["drop", "majority", "keep"] = Field(
        "drop", description="train: a text found with different labels: drop all its rows, keep the majority "
        "label's (a tie drops all), or keep them")
    drop_leakage: bool = Field(False, description="train: drop rows whose normalised text is also in validation "
                               "or test (always counted and warned about)")


class AugmentSection(Section):
    """EDA augmentation of the train split (`jaxft.data.augment`); on when `copies` > 0. Each copy applies one
    operation, chosen uniformly among those with a non-zero rate, and is made anew every epoch, seeded."""

    copies: int = Field(0, ge=0, description="augmented copies per train example, besides the original; 0 = off")
    synonym_replacement: float = Field(0.1, ge=0, le=1, description="alpha: share of words replaced by a synonym")
    random_insertion: float = Field(0.1, ge=0, le=1, description="alpha: synonyms inserted, as a share of the words")
    random_swap: float = Field(0.1, ge=0, le=1, description="alpha: word-pair swaps, as a share of the words")
    random_deletion: float = Field(0.1, ge=0, lt=1, description="p: probability that each word is deleted")
    synonyms: str | None = Field(None, description="synonym file: TSV word<TAB>syn1,syn2 or JSON {word: [synonyms]}; "
                                 "default: WordNet when nltk and its database are installed")
    cjk_words: Literal["auto", "jieba", "chars"] = Field(
        "auto", description="how runs of Chinese/Japanese characters are cut into words: jieba, single characters, "
        "or auto (jieba when installed)")

    @model_validator(mode="after")
    def _some_operation(self):
        if self.copies and not any((self.synonym_replacement, self.random_insertion, self.random_swap,
                                    self.random_deletion)):
            raise ValueError(f"data.augment.copies={self.copies} with every operation's rate at 0")
        return self


class DataSection(Section):
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    max_length: int = Field(128, ge=2)
    padding: Literal["longest", "max_length"] = "longest"
    pad_to_multiple_of: int = Field(16, ge=1, description="round `longest` padding up to limit recompiles")
    group_by_length: int = Field(0, ge=0, description="sort each window of N shuffled train batches by length "
                                 "before batching, then shuffle the batches (less padding); 0: off")
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="carve validation from train")
    max_train_rows: int | None = Field(None, ge=1, description="use only the first N rows of train")
    clean: CleanSection = CleanSection()
    augment: AugmentSection = AugmentSection()
    on_bad_rows: Literal["skip", "error"] = "skip"
    cache_dir: str | None = Field(None, description="tokenization cache; default ~/.cache/jaxft")
    tfds_data_dir: str | None = Field(None, description="where tfds:NAME[/CONFIG]:SPLIT sources are prepared "
                                      "(ArrayRecord; a folder or a bucket path); default: TFDS's own")
    # causal-LM supervised fine-tuning (see jaxft/data/sft.py)
    format: Literal["auto", "text", "prompt_completion", "chat"] = "auto"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    chat_template: str | None = Field(None, description="Jinja template, or a path to a file holding one")
    # preference pairs (train.objective dpo | ipo | simpo | orpo; see jaxft/data/preference.py)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    packing: bool = False
    truncation: Literal["right", "drop"] = "right"


class TaskSpec(Section):
    """One task of a multi-task run (`tasks:`; `jaxft.objectives.multitask`): its data and its share of the shared head."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the task's metrics (NAME/accuracy) and "
                      "its export folder (so not . or ..)")
    train: str = Field(description="the task's train source (as data.train)")
    validation: str | None = None
    test: str | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    kind: Literal["classification", "regression"] = Field(
        "classification", description="classification: CE over the task's own labels; regression: one output "
        "column fitted to a numeric label by squared error (exported with problem_type=regression)")
    num_labels: int | None = Field(None, ge=1, description="default: from the label map of the task's train data "
                                   "(regression: 1)")
    max_train_rows: int | None = Field(None, ge=1, description="use only the first N train rows of this task")
    loss_weight: float = Field(1.0, gt=0, description="multiplies this task's loss; also its weight in the mean "
                               "eval metrics")
    weight: float | None = Field(None, gt=0, description="sampling.strategy=fixed: this task's share of the "
                                 "batches (normalised over the tasks)")

    @model_validator(mode="after")
    def _not_a_path(self):
        if set(self.name) == {"."}:
            raise ValueError(f"tasks: name {self.name!r} names a folder, not a task (export writes OUT_DIR/NAME)")
        return self


class SamplingSection(Section):
    """Which task each training batch comes from (multi-task runs)."""

    strategy: Literal["proportional", "temperature", "fixed"] = Field(
        "proportional", description="p_i ∝ n_i (train examples), ∝ n_i^(1/temperature), or ∝ tasks[i].weight")
    temperature: float = Field(2.0, gt=0, description="strategy=temperature: T (1 = proportional, ∞ → uniform)")
