"""The whole run configuration: its sections, and the checks that span sections (a key that only makes
sense with another section's setting is an error naming both)."""

from __future__ import annotations

from pydantic import Field, model_validator

from jaxft.config.base import Section
from jaxft.config.data import DataSection, SamplingSection, TaskSpec
from jaxft.config.model import ModelSection
from jaxft.config.train import CheckpointSection, MeshSection, OptimSection, TrainSection


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
        for i, t in enumerate(self.tasks):
            if t.kind == "regression" and t.num_labels not in (None, 1):
                raise ValueError(f"tasks[{i}] ({t.name}): kind=regression has one output; "
                                 f"num_labels={t.num_labels} is not 1")
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
            what = "with sampled completions" if obj == "grpo" else "on preference pairs"
            raise ValueError(f"train.objective={obj} trains a causal LM {what}: set model.task=causal-lm")
        if obj == "grpo":
            g = self.train.grpo
            if not g.rewards:
                raise ValueError("train.objective=grpo needs train.grpo.rewards (at least one)")
            if self.train.batch_size % g.num_generations:
                raise ValueError(f"train.batch_size={self.train.batch_size} counts completions and must be a multiple "
                                 f"of train.grpo.num_generations={g.num_generations}")
            if self.data.packing:
                raise ValueError("data.packing does not apply to train.objective=grpo (each row is one completion)")
            return self
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
        classifies = self.model.task == "sequence-classification" and not (
            self.tasks and all(t.kind == "regression" for t in self.tasks))  # regression tasks only: loss
        metric = es.metric or ("accuracy" if classifies else "reward" if self.train.objective == "grpo" else "loss")
        # a multi-task metric is TASK/NAME (jaxft.objectives.multitask): its mode follows NAME
        return metric, es.mode or ("min" if metric.rsplit("/", 1)[-1] in ("loss", "perplexity", "mse") else "max")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")
