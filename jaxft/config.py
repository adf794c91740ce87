"""The typed run configuration: YAML + `key.sub=value` overrides → a validated `Config`.

YAML files carry only what differs from these defaults. Every error names the key: an unknown key
(with a did-you-mean), a value of the wrong type, or an impossible value. Validation happens before
anything heavy (model, data) is loaded.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# train.loss_chunk_tokens default (see jaxft.train.losses.chunked_cross_entropy)
LOSS_CHUNK_TOKENS = 2048


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


class Section(BaseModel):
    # allow_inf_nan=False: `train.epochs=.inf` or `optim.lr=.nan` is an error naming the key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MoESection(Section):
    """DeepSeekMoE fine-tuning options (ignored by dense models)."""

    aux_loss_coef: float = Field(0.0, ge=0, description="sequence-wise balance loss weight, summed over layers")
    freeze_router: bool = Field(False, description="keep the router (gate) weights fixed")


class LoraSection(Section):
    """LoRA adapters on the frozen base (`jaxft.lora`); on when `rank` is set."""

    rank: int | None = Field(None, ge=1, description="adapter rank r; null = full fine-tuning")
    alpha: float = Field(16.0, gt=0, description="scale = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input, training only")
    targets: str = Field("all-linear", description="regex over HF module names (q_proj|v_proj), or all-linear")
    rslora: bool = False
    train_modules: str | None = Field("default", description="regex over HF module names trained in full "
                                      "(peft's modules_to_save); default: the classifier of "
                                      "sequence-classification, nothing for causal-lm")


class ModelSection(Section):
    name_or_path: str = Field(description="local HF folder or Hub id")
    task: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    num_labels: int | None = Field(None, ge=1, description="default: from the label map of the train data")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype (matmuls, activations)")
    param_dtype: Literal["float32", "bfloat16"] = Field("float32", description="stored parameters (and optimizer state)")
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = Field(
        "none", description="what each block keeps for the backward pass (jaxft.models.layers.REMAT_POLICIES)")
    scan_layers: bool = Field(False, description="stack the blocks' parameters on a leading layer axis and run "
                              "them with jax.lax.scan: compile time independent of depth")
    attention: Literal["auto", "plain", "blockwise"] = Field(
        "auto", description="how attention is computed (jaxft.models.attention): auto = cuDNN on GPU in bfloat16 "
        "where it applies, plain up to 1024x1024 scores, blockwise (O(T) memory) beyond")
    attention_block: int = Field(512, ge=16, description="query/key block of blockwise attention")
    moe: MoESection = MoESection()
    lora: LoraSection = LoraSection()
    quantize: Literal["int8", "nf4"] | None = Field(None, description="QLoRA: store the frozen base quantised "
                                                    "(needs model.lora.rank)")
    hidden_dropout: float | None = Field(None, ge=0, lt=1, description="overrides the checkpoint's hidden "
                                         "dropout (BERT hidden_dropout_prob; GPT-2 resid_pdrop and embd_pdrop); "
                                         "null = the checkpoint's")
    attention_dropout: float | None = Field(None, ge=0, lt=1, description="overrides the checkpoint's attention "
                                            "dropout (BERT attention_probs_dropout_prob, GPT-2 attn_pdrop, "
                                            "Llama/Mistral/Qwen/DeepSeek attention_dropout); null = the checkpoint's")
    freeze_embeddings: bool = Field(False, description="keep the embeddings fixed (with tied embeddings, the "
                                    "output head too)")
    freeze_layers: int = Field(0, ge=0, description="keep the first k blocks fixed")


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


class EarlyStopping(Section):
    metric: str | None = Field(None, description="default: accuracy (classification), loss (causal-lm)")
    mode: Literal["max", "min"] | None = Field(None, description="default: min for loss/perplexity, else max")
    patience: int | None = Field(None, ge=1, description="evals without improvement before stopping")


class OptimSection(Section):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip_norm: float | None = Field(1.0, gt=0)
    schedule: Literal["linear", "cosine", "constant", "cosine_restarts", "polynomial"] = "linear"
    cycles: int = Field(1, ge=1, description="cosine_restarts: cosine decays to 0 after the warmup, each "
                        "restarting at lr (transformers' num_cycles)")
    power: float = Field(1.0, gt=0, description="polynomial: lr decays as (1 − progress)^power")
    end_lr: float = Field(0.0, ge=0, description="polynomial: the lr at the last step")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay d: block l of L gets "
                                      "lr·d^(L−l), the embeddings lr·d^(L+1), the head lr (jaxft.layerwise)")
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps is not None and self.warmup_ratio:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        return self

    @model_validator(mode="after")
    def _schedule_keys(self):
        for key, default, schedule in (("cycles", 1, "cosine_restarts"), ("power", 1.0, "polynomial"),
                                       ("end_lr", 0.0, "polynomial")):
            if getattr(self, key) != default and self.schedule != schedule:
                raise ValueError(f"optim.{key} applies to optim.schedule={schedule}, not {self.schedule}")
        if self.end_lr >= self.lr and self.schedule == "polynomial":
            raise ValueError(f"optim.end_lr={self.end_lr} must be below optim.lr={self.lr}")
        return self


class PreferenceSection(Section):
    """Preference objectives (`jaxft.train.preference`); names and defaults as TRL's DPOConfig/CPOConfig/ORPOConfig."""

    beta: float = Field(0.1, gt=0, description="dpo: β of the implicit reward; ipo: τ; simpo: β; orpo: λ, the "
                        "odds-ratio weight (TRL ORPOConfig.beta)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo, simpo: probability that a pair's "
                                   "preference is flipped (conservative DPO)")
    simpo_gamma: float = Field(0.5, description="simpo: target reward margin γ")


class DistillSection(Section):
    """Knowledge distillation (`jaxft.train.distill`): the student trains on
    alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · task loss."""

    teacher: str | None = Field(None, description="the teacher: a model folder, package:PKG/SUBDIR, a Hub id, or "
                                "a jaxft run directory (its best, else latest, checkpoint)")
    temperature: float = Field(2.0, gt=0, description="T: both distributions are softmax(logits / T)")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term; 1 − alpha weighs the task loss")


class SamplesSection(Section):
    """Greedy generations of fixed prompts during training (causal LMs; `jaxft.train.samples`)."""

    prompts: list[str] = Field(default_factory=list, description="the prompts, as text")
    file: str | None = Field(None, description="or a text file of prompts, one per line")
    every: int = Field(100, ge=1, description="steps between samples (and at the last step)")
    max_new_tokens: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.prompts) == bool(self.file):
            raise ValueError("train.samples needs prompts or file (one of them)")
        return self


OBJECTIVES = ("supervised", "distill", "dpo", "ipo", "simpo", "orpo")


class TrainSection(Section):
    batch_size: int = Field(32, ge=1, description="global batch (all devices, all micro-batches)")
    eval_batch_size: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1, description="total optimizer steps (wins over epochs)")
    epochs: float = Field(1.0, gt=0)
    eval_every: int | None = Field(None, ge=1, description="steps between evals; default: end only")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    early_stopping: EarlyStopping = EarlyStopping()
    max_bad_steps: int = Field(10, ge=1, description="non-finite steps in a row before the run stops")
    spike_factor: float | None = Field(3.0, gt=1, description="warn when loss > factor × running median")
    stop_at_step: int | None = Field(None, ge=1, description="checkpoint and exit at this step (resumable)")
    log_batches: bool = Field(False, description="write the example ids of every step to batches.jsonl")
    loss_chunk_tokens: int = Field(LOSS_CHUNK_TOKENS, ge=0, description="causal LM: the head and the loss are "
                                   "computed over chunks of about this many tokens (rows x positions), never "
                                   "holding [batch, length, vocab] logits; 0 = all at once")
    objective: Literal[OBJECTIVES] = Field("supervised", description="what the loss is (the model's head is "
                                           "model.task): supervised, distill (from train.distill.teacher), "
                                           "or a preference objective on {prompt, chosen, rejected} rows")
    dpo: PreferenceSection = PreferenceSection()
    distill: DistillSection = DistillSection()
    samples: SamplesSection | None = Field(None, description="greedy generations of fixed prompts in samples.jsonl "
                                           "and TensorBoard (causal LMs)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="supervised training loss (1−ε)·CE + ε·mean over "
                                   "classes (vocabulary) of −log p; evaluation reports the plain CE")

    @model_validator(mode="after")
    def _accum_divides(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                             f"train.grad_accum={self.grad_accum}")
        return self


class MeshSection(Section):
    data: int = -1
    fsdp: int = 1
    sequence: int = Field(1, description="split every row's tokens over this many devices (long context)")
    tensor: int = 1
    expert: int = 1
    # multi-host start-up (jaxft.parallel.initialize_distributed)
    distributed: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: join when a coordinator is known (here or JAXFT_COORDINATOR) or under SLURM/MPI")
    coordinator: str | None = Field(None, description="host:port of process 0")
    num_processes: int | None = Field(None, ge=1)
    process_id: int | None = Field(None, ge=0)
    init_timeout: int = Field(300, ge=1, description="seconds to wait for every process to join")

    @model_validator(mode="after")
    def _sizes(self):
        for k in ("data", "fsdp", "sequence", "tensor", "expert"):
            v = getattr(self, k)
            if v == 0 or v < -1:
                raise ValueError(f"mesh.{k}={v}: use a positive size or -1 (the remaining devices)")
        return self


class CheckpointSection(Section):
    every: int | None = Field(None, ge=1, description="steps between checkpoints; default: each eval")
    keep: int = Field(2, ge=1, description="latest checkpoints kept (the best is kept as well)")
    resume: bool = True
    allow_changes: bool = Field(False, description="resume even if math-changing settings differ")
    overwrite: Literal["refuse", "move"] = Field(
        "refuse", description="resume=false into an output_dir that holds a run: refuse (exit 2), or move the old "
                              "run aside to OUTPUT_DIR.old-TIMESTAMP and start over")


class TaskSpec(Section):
    """One task of a multi-task run (`tasks:`; `jaxft.train.multitask`): its data and its share of the shared head."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the task's metrics (NAME/accuracy) and "
                      "its export folder")
    train: str = Field(description="the task's train source (as data.train)")
    validation: str | None = None
    test: str | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    num_labels: int | None = Field(None, ge=1, description="default: from the label map of the task's train data")
    max_train_rows: int | None = Field(None, ge=1, description="use only the first N train rows of this task")
    loss_weight: float = Field(1.0, gt=0, description="multiplies this task's loss; also its weight in the mean "
                               "eval metrics")
    weight: float | None = Field(None, gt=0, description="sampling.strategy=fixed: this task's share of the "
                                 "batches (normalised over the tasks)")


class SamplingSection(Section):
    """Which task each training batch comes from (multi-task runs)."""

    strategy: Literal["proportional", "temperature", "fixed"] = Field(
        "proportional", description="p_i ∝ n_i (train examples), ∝ n_i^(1/temperature), or ∝ tasks[i].weight")
    temperature: float = Field(2.0, gt=0, description="strategy=temperature: T (1 = proportional, ∞ → uniform)")


class Config(Section):
    model: ModelSection
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()
    output_dir: str = "runs/default"
    tasks: list[TaskSpec] | None = Field(None, description="multi-task learning: tasks sharing one encoder, "
                                         "each with its own data and labels (replaces data.train/validation/test)")
    sampling: SamplingSection = SamplingSection()

    @model_validator(mode="after")
    def _tasks_fit(self):
        if not self.tasks:
            if self.tasks is not None:
                raise ValueError("tasks: is an empty list; give at least one task or drop the key")
            return self
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be distinct (got {names})")
        if self.model.task != "sequence-classification" or self.train.objective != "supervised":
            raise ValueError("tasks: multi-task learning trains sequence-classification heads with "
                             "train.objective=supervised")
        for key in ("train", "validation", "test"):
            if getattr(self.data, key) is not None:
                raise ValueError(f"data.{key} and tasks: both set; with tasks each task names its own splits")
        if self.model.num_labels is not None:
            raise ValueError("model.num_labels with tasks: set tasks[i].num_labels per task instead")
        if self.sampling.strategy == "fixed":
            unset = [t.name for t in self.tasks if t.weight is None]
            if unset:
                raise ValueError(f"sampling.strategy=fixed needs tasks[i].weight for every task (missing: {unset})")
        return self

    @model_validator(mode="after")
    def _quantize_needs_lora(self):
        if self.model.quantize and self.model.lora.rank is None:
            raise ValueError(f"model.quantize={self.model.quantize} stores a frozen base, which only LoRA "
                             f"training has: set model.lora.rank too")
        return self

    @model_validator(mode="after")
    def _task_fields(self):
        if self.model.task == "causal-lm":
            for key, value in (("model.num_labels", self.model.num_labels),
                               ("data.text_pair_field", self.data.text_pair_field)):
                if value is not None:
                    raise ValueError(f"{key} applies to sequence-classification, not model.task=causal-lm")
        elif self.data.packing:
            raise ValueError("data.packing applies to model.task=causal-lm")
        return self

    @model_validator(mode="after")
    def _samples_need_a_causal_lm(self):
        if self.train.samples is not None and self.model.task != "causal-lm":
            raise ValueError("train.samples generates text: it applies to model.task=causal-lm")
        return self

    @model_validator(mode="after")
    def _augment_needs_classification(self):
        if self.data.augment.copies and self.model.task != "sequence-classification":
            raise ValueError("data.augment applies to model.task=sequence-classification")
        if self.data.augment.copies and self.tasks:
            raise ValueError("data.augment applies to the data.train split, not to tasks: (multi-task runs)")
        return self

    @model_validator(mode="after")
    def _objective_fits(self):
        obj, p = self.train.objective, self.train.dpo
        if self.train.label_smoothing and obj != "supervised":
            raise ValueError(f"train.label_smoothing applies to train.objective=supervised, not {obj}"
                             + (" (see train.dpo.label_smoothing)" if obj in ("dpo", "simpo") else ""))
        if self.train.label_smoothing and self.tasks:
            raise ValueError("train.label_smoothing is not applied by multi-task runs (tasks:)")
        if obj == "supervised":
            return self
        if obj == "distill":
            if not self.train.distill.teacher:
                raise ValueError("train.objective=distill needs train.distill.teacher (a model folder or run directory)")
            return self
        if self.model.task != "causal-lm":
            raise ValueError(f"train.objective={obj} trains a causal LM on preference pairs: set model.task=causal-lm")
        if self.data.packing:
            raise ValueError(f"data.packing does not apply to train.objective={obj} (each row is one pair)")
        if p.label_smoothing and obj in ("ipo", "orpo"):
            raise ValueError(f"train.dpo.label_smoothing applies to dpo and simpo, not train.objective={obj}")
        if obj in ("dpo", "ipo") and self.model.lora.rank is not None and self.model.lora.train_modules not in (
                None, "default"):
            raise ValueError(f"model.lora.train_modules with train.objective={obj}: the reference model is the base "
                             f"with adapters off, which modules trained in full would move; drop train_modules")
        return self

    def early_stopping(self) -> tuple[str, str]:
        """The (metric, mode) that picks the best checkpoint, with the task's defaults filled in."""
        es = self.train.early_stopping
        metric = es.metric or ("accuracy" if self.model.task == "sequence-classification" else "loss")
        # a multi-task metric is TASK/NAME (jaxft.train.multitask): its mode follows NAME
        return metric, es.mode or ("min" if metric.rsplit("/", 1)[-1] in ("loss", "perplexity") else "max")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _format(e: ValidationError, model=Config) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key{_did_you_mean(err['loc'], model)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        lines.append(f"config key {key!r}: {msg}" if key else f"config: {msg}")
    return "\n".join(lines)


def _did_you_mean(loc: tuple, model) -> str:
    """Walk the schema along `loc` and suggest the closest known key."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?" if close else \
        f"; known keys here: {', '.join(model.model_fields)}"


def _field(parts: list[str]):
    """The schema field at a dotted key (`['data', 'train']`), or None when there is none."""
    model = Config
    for p in parts[:-1]:
        field = model.model_fields.get(p)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model.model_fields.get(parts[-1])


def _is_string(field) -> bool:
    """A `str` or `str | None` field: its override value is taken as written, not parsed as YAML."""
    args = typing.get_args(field.annotation) or (field.annotation,)
    return str in args and all(a in (str, type(None)) for a in args)


def apply_override(tree: dict, item: str) -> None:
    """`optim.lr=3e-5` → tree['optim']['lr'] = 3e-5 (the value is parsed as YAML).

    A string key (`data.train=*.tsv`, `data.text_field=@x`, a Jinja `data.chat_template={% ... %}`) keeps the
    value as written unless YAML reads it as a string or null (`data.validation=null`); any other key whose
    value is not valid YAML (`train.steps=[1`) is a `ConfigError` naming the key.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: the key {key!r} has an empty part")
    field = _field(parts)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as e:
        if field is not None and not _is_string(field):
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config key {key.strip()!r}: {raw!r} is not valid YAML ({problem})") from None
        value = raw  # a string key keeps it; an unknown key is reported as such by validation
    if field is not None and _is_string(field):
        if not isinstance(value, str) and not (value is None and raw.strip() in ("", "~", "null", "Null", "NULL")):
            value = raw
    elif isinstance(value, str) and _SCI.fullmatch(value):  # YAML 1.1 reads 3e-5 as a string
        value = float(value)
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read YAML (or start from `base`), apply overrides, validate. Raises `ConfigError` naming the key."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; give the path of a YAML file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides:
        apply_override(tree, item)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (a temporary file renamed over `path`): a crash mid-write
    leaves the previous file, never a cut one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
