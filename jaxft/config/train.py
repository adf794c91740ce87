"""`optim:`, `train:`, `mesh:` and `checkpoint:` — the optimiser, the loop, the objectives, the device mesh."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jaxft.config.base import Section

# train.loss_chunk_tokens default (see jaxft.train.losses.chunked_cross_entropy)
LOSS_CHUNK_TOKENS = 512


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
    """Preference objectives (`jaxft.objectives.preference`); names and defaults as TRL's DPOConfig/CPOConfig/ORPOConfig."""

    beta: float = Field(0.1, gt=0, description="dpo: β of the implicit reward; ipo: τ; simpo: β; orpo: λ, the "
                        "odds-ratio weight (TRL ORPOConfig.beta)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo, simpo: probability that a pair's "
                                   "preference is flipped (conservative DPO)")
    simpo_gamma: float = Field(0.5, description="simpo: target reward margin γ")
    precompute_reference: bool = Field(False, description="dpo, ipo: compute the reference model's log-probs "
                                       "of every pair in one pass before training (and before evaluation) "
                                       "instead of in every step: full fine-tuning then holds no reference "
                                       "copy, LoRA skips the adapters-off forward pass (TRL's "
                                       "precompute_ref_log_probs)")


class DistillSection(Section):
    """Knowledge distillation (`jaxft.objectives.distill`): the student trains on
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


class RewardSpec(Section):
    """One reward of `train.grpo.rewards` (`jaxft.objectives.rewards`); the total reward is Σ weight · reward."""

    name: str | None = Field(None, description="names the logged rewards/NAME/mean; default: the kind, or the "
                             "function's name")
    weight: float = Field(1.0, description="its weight in the total reward")
    kind: Literal["exact_match", "contains", "regex", "length", "function"] = Field(
        "function", description="exact_match / contains: the completion equals / contains a column of the data "
        "(after `extract` and `normalize`); regex: 1 where `pattern` is found, else 0; length: −|tokens − target| "
        "/ max_completion_length (target 0: −tokens / max_completion_length); function: `function`")
    function: str | None = Field(None, description="kind=function: 'module:function', imported from the working "
                                 "directory or PYTHONPATH, called as f(prompts, completions, **columns) -> list of "
                                 "floats (TRL's reward-function signature)")
    column: str = Field("answer", description="exact_match / contains: the column holding the answer")
    extract: str | None = Field(None, description="exact_match / contains: a regex; its first group (else the "
                                "whole match) of the completion is compared, no match scores 0")
    normalize: list[Literal["strip", "lower", "last_number"]] = Field(
        default_factory=lambda: ["strip"], description="exact_match / contains: applied in order to both sides: "
        "strip spaces, lower-case, keep the last number of the text (commas dropped; none: no match)")
    pattern: str | None = Field(None, description="regex: searched in the completion (re.DOTALL); anchor it "
                                "with ^…$ for a whole-completion format")
    target: int = Field(0, ge=0, description="length: the completion length (tokens) that costs nothing")

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "function" and not self.function:
            raise ValueError("a reward of kind function needs function: 'module:function'")
        if self.kind != "function" and self.function:
            raise ValueError(f"function={self.function!r} is given but kind={self.kind}: drop one")
        if self.kind == "regex" and not self.pattern:
            raise ValueError("a reward of kind regex needs pattern")
        for key in ("pattern", "extract"):
            value = getattr(self, key)
            if value is not None:
                import re

                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(f"{key}={value!r} is not a valid regular expression: {e}") from None
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function={self.function!r}: write 'module:function'")
        return self


class GRPOSection(Section):
    """Group relative policy optimisation (`train.objective: grpo`, `jaxft.objectives.grpo`); names and defaults
    as TRL 1.16's GRPOConfig."""

    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (a group); train.batch_size "
                                 "counts completions, so a step takes batch_size / num_generations prompts")
    max_completion_length: int = Field(256, ge=1, description="new tokens per completion at most")
    max_prompt_length: int | None = Field(None, ge=1, description="longer prompts are dropped (counted); default "
                                          "data.max_length")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens; 0: all")
    beta: float = Field(0.0, ge=0, description="weight of the KL to the reference model (the starting point; with "
                        "LoRA the base with adapters off); 0: no reference is held or computed")
    epsilon: float = Field(0.2, gt=0, lt=1, description="ratio clip: [1 − epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip; default epsilon (DAPO: 0.28)")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="how per-token losses are averaged: grpo per sequence then over sequences; bnpo and "
        "dapo over the batch's completion tokens; dr_grpo over batch rows × max_completion_length")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantages (r − group mean) divided by the group's std, the batch's, or nothing")
    num_iterations: int = Field(1, ge=1, description="μ: optimizer steps per rollout (each on the same completions, "
                                "with the log-probs at rollout time as the old policy)")
    mask_truncated_completions: bool = Field(False, description="completions that reach max_completion_length "
                                             "without an end-of-sequence token get no loss")
    rewards: list[RewardSpec] = Field(default_factory=list, description="the rewards, summed with their weights")
    log_completions: int = Field(4, ge=0, description="(prompt, completion, reward) rows per logging window "
                                 "written to RUN_DIR/rollouts.jsonl and TensorBoard")
    eval_prompts: int | None = Field(None, ge=1, description="evaluate on the first N validation prompts only")

    @model_validator(mode="after")
    def _reward_names(self):
        names = [r.name or (r.function.rsplit(":", 1)[-1] if r.function else r.kind) for r in self.rewards]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two rewards are named {dup[0]!r}: give each a distinct name")
        return self


OBJECTIVES = ("supervised", "distill", "dpo", "ipo", "simpo", "orpo", "grpo")


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
                                           "a preference objective on {prompt, chosen, rejected} rows, or grpo "
                                           "(rewards of sampled completions of {prompt} rows)")
    dpo: PreferenceSection = PreferenceSection()
    distill: DistillSection = DistillSection()
    grpo: GRPOSection = GRPOSection()
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
