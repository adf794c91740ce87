"""`jaxft train`: the training loop.

One jitted step per batch, no host sync between logs: step metrics stay on the device until
`train.log_every`, when they are reduced and written. Evaluation every `train.eval_every` steps and
at the end; checkpoints every `checkpoint.every` steps (default: at each eval) and at the end; early
stopping on `train.early_stopping`.

Re-running the same command in the same run directory resumes from its latest checkpoint with the
data iterator where it was, so the resumed run sees exactly the batches the uninterrupted one would
have; a config that changes the math is refused (see `faults.config_changes`). SIGTERM/SIGINT
checkpoint at the next step boundary and exit with code 75; non-finite steps are skipped, and too
many in a row stop the run with a checkpoint of the last good state (exit code 3).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxft import parallel
from jaxft.compilation import CompileCounter, enable_persistent_cache
from jaxft.config import Config, ConfigError, save_config
from jaxft.data.batches import to_device
from jaxft.hf.load import read_hf_config, resolve
from jaxft.optim import make_optimizer
from jaxft.plan import preflight
from jaxft.train.faults import Diverged, Preempted, PreemptionGuard, SpikeDetector, config_changes
from jaxft.train.logger import RunLogger
from jaxft.train.model import base_record, check_base, load_run_model
from jaxft.train.run import checkpoints_of, claim_run_dir, setup_logging, start_run_log
from jaxft.train.step import Functional, init_state, make_eval_step, make_train_step
from jaxft.train.samples import Sampler
from jaxft.objectives import make_task

log = logging.getLogger("jaxft")


class EarlyStopper:
    """Tracks the best value of one eval metric and the evals since it last improved."""

    def __init__(self, metric: str, mode: str, patience: int | None, best=None, best_step=None, waited=0):
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best, self.best_step, self.waited = best, best_step, waited

    def update(self, step: int, metrics: dict) -> bool:
        """Record an eval; True when patience is exhausted."""
        if self.metric not in metrics:
            raise ConfigError(f"train.early_stopping.metric={self.metric!r} is not an eval metric "
                              f"(available: {sorted(metrics)})")
        v = metrics[self.metric]
        if self.best is None or (v > self.best if self.mode == "max" else v < self.best):
            self.best, self.best_step, self.waited = v, step, 0
        else:
            # A tie moves the best step forward (as checkpoint retention does) without resetting patience.
            self.best_step = step if v == self.best else self.best_step
            self.waited += 1
        return self.patience is not None and self.waited >= self.patience

    def to_json(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "waited": self.waited}


def check_batch(cfg: Config, mesh) -> None:
    dp = parallel.data_parallel_size(mesh)
    per = dp * cfg.train.grad_accum
    if cfg.train.batch_size % per:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the data-parallel "
                          f"devices ({dp}) × train.grad_accum ({cfg.train.grad_accum}) = {per}")
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    if eval_bs % dp:
        raise ConfigError(f"train.eval_batch_size={eval_bs} must be divisible by the data-parallel devices ({dp})")
    sp = parallel.sequence_parallel_size(mesh)
    for key, value in (("data.max_length", cfg.data.max_length), ("data.pad_to_multiple_of", cfg.data.pad_to_multiple_of)):
        if value % sp:
            raise ConfigError(f"{key}={value} must be divisible by mesh.sequence={sp}: every batch's length is "
                              f"split evenly over the sequence-parallel devices")
    log.info("mesh %s: global batch %d = %d device(s) × %d micro-batch(es) × %d per device%s",
             dict(mesh.shape), cfg.train.batch_size, dp, cfg.train.grad_accum, cfg.train.batch_size // per,
             f", each row's tokens split over {sp} devices" if sp > 1 else "")


def _fault_steps() -> set[int]:
    """Test hook: `JAXFT_FAULT_NAN_STEPS=3,4` poisons those steps' batches (their weights become NaN)."""
    return {int(s) for s in os.environ.get("JAXFT_FAULT_NAN_STEPS", "").split(",") if s.strip()}


class Window:
    """Throughput of one logging window: examples and real (non-padding) tokens per second of the time
    spent outside compilation, with the compilation seconds reported apart."""

    def __init__(self, compiles: CompileCounter):
        self.compiles, self.t0, self.c0 = compiles, time.perf_counter(), compiles.read()["seconds"]
        self.examples = self.tokens = 0

    def add(self, batch: dict) -> None:
        real = batch["weights"] > 0
        self.examples += int(batch["weights"].sum())
        if "attention_mask" in batch:
            self.tokens += int(batch["attention_mask"][real].sum())

    def close(self) -> dict:
        compile_s = self.compiles.read()["seconds"] - self.c0
        busy = max(time.perf_counter() - self.t0 - compile_s, 1e-9)
        row = {"examples_per_s": self.examples / busy}
        if self.tokens:
            row["tokens_per_s"] = self.tokens / busy
        if compile_s > 0:
            row["compile_s"] = compile_s
        return row


class Trainer:
    def __init__(self, cfg: Config):
        if cfg.data.train is None and not cfg.tasks:
            raise ConfigError("data.train (or tasks:) is required for training")
        self.cfg, self.run_dir = cfg, Path(cfg.output_dir)
        parallel.initialize_from_config(cfg.mesh)  # jax.distributed on multi-host runs; before JAX starts
        self.xla_cache = enable_persistent_cache()  # before the first compilation
        setup_logging(self.run_dir, defer=True)  # train.log is written from start_run_log on
        self.mesh = parallel.make_mesh(cfg.mesh.model_dump())
        check_batch(cfg, self.mesh)

        from transformers import AutoTokenizer

        model_dir = resolve(cfg.model.name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        vocab = getattr(read_hf_config(model_dir), "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ConfigError(f"the tokenizer of {model_dir} has {len(tokenizer)} tokens but the model's "
                              f"vocab_size is {vocab}: ids past the embedding table would be out of range")
        self.ckpts = checkpoints_of(self.run_dir, cfg)
        resume = self.ckpts.latest_step() if cfg.checkpoint.resume else None
        if resume is not None:
            resume_meta = self.ckpts.meta(resume)
            self._check_resume_config(resume_meta)
        self.task = make_task(cfg, tokenizer, self.run_dir, resuming=resume is not None)

        self.total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * self.task.steps_per_epoch))
        run_model = load_run_model(cfg, model_dir, self.mesh, **self.task.model_kwargs)
        self.adapters = run_model.adapters
        self.base = base_record(cfg, model_dir)  # what a LoRA checkpoint was trained on
        self.fn = Functional(run_model.model, run_model.trainable)
        tx, lr = make_optimizer(cfg.optim, self.total, run_model.layers, run_model.slice_masks(self.fn.params))
        self.state = init_state(self.fn, tx, cfg.train.seed)
        self.metric, mode = cfg.early_stopping()
        patience = cfg.train.early_stopping.patience
        self.stopper = EarlyStopper(self.metric, mode, patience)
        if resume is not None:
            target = {"params": self.state["params"], "train": {k: v for k, v in self.state.items() if k != "params"}}
            check_base(resume_meta.get("base"), cfg, model_dir)
            restored, meta = self.ckpts.restore(resume, target)
            self.state = {"params": restored["params"], **restored["train"]}
            self.task.restore_data_state(meta["data"])
            self.stopper = EarlyStopper(self.metric, mode, patience, **meta["early_stopping"])
            log.info("resumed from step %d of %s", resume, self.run_dir)
        self.step = int(resume or 0)
        # a frozen second model beside the train state (a preference objective's reference), or None
        self.frozen_model = second = self.task.frozen_model(lambda: self.fn)  # fn still holds the starting point
        preflight(cfg, self.fn, self.state, self.mesh, self.task.loss, frozen_model=second)  # warns before an OOM
        self.train_step = make_train_step(self.fn, self.task.loss, tx, lr, cfg.train.grad_accum, second)
        # evaluation without the training-only loss terms (label smoothing) where the task has such a loss
        self.eval_step = make_eval_step(self.fn, getattr(self.task, "eval_loss", self.task.loss), second)
        if jax.process_index() == 0:  # every refusal comes before this point: the run directory is written from here
            start_run_log(self.run_dir)
            save_config(cfg, self.run_dir / "config.yaml")
            if not (self.run_dir / "tokenizer").exists():
                tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        self.logger = RunLogger(self.run_dir)
        self.sampler = None if cfg.train.samples is None else Sampler(  # greedy generations of fixed prompts
            cfg.train.samples, tokenizer, self.run_dir, run_model.model, self.total)
        self.spikes = SpikeDetector(cfg.train.spike_factor)

    def _check_resume_config(self, meta: dict) -> None:
        saved = meta.get("config")
        changes = config_changes(saved, self.cfg.to_dict()) if saved else []
        if not changes:
            return
        if not self.cfg.checkpoint.allow_changes:
            raise ConfigError(f"{self.run_dir} holds a run whose config differs in settings that change the "
                              f"math: {'; '.join(changes)}. Use another output_dir, restore the settings, or "
                              f"pass checkpoint.allow_changes=true to resume anyway")
        log.warning("resuming with changed settings (checkpoint.allow_changes): %s", "; ".join(changes))

    def evaluate(self, split: str, params) -> dict:
        m = self.task.evaluate(self.eval_step, params, split, self.mesh)
        self.logger.write(self.step, "eval" if split == "validation" else split, m)
        log.info("step %d %s: %s", self.step, split, _fmt(m))
        return m

    def checkpoint(self, metrics: dict | None) -> None:
        meta = {"data": self.task.data_state(), "metrics": metrics, "total_steps": self.total,
                "early_stopping": self.stopper.to_json(), "config": self.cfg.to_dict(), "base": self.base}
        self.ckpts.save(self.step, self.state, meta, metrics)

    def next_batch(self) -> dict:
        """The objective's batch for the next step. If making it fails (an online objective's reward function
        raising, say), the state trained so far is checkpointed before the error propagates: a re-run resumes."""
        try:
            return self.task.train_batch(self.step, self.fn, self.state["params"])
        except Exception:
            self.ckpts.wait()
            if self.step and self.ckpts.latest_step() != self.step:
                self.checkpoint(None)
                self.ckpts.wait()
                log.error("step %d could not be prepared: the %d steps trained so far are checkpointed; fix the "
                          "cause and re-run the same command to resume", self.step + 1, self.step)
            raise

    def log_window(self, pending: list, ids: list, window: "Window") -> None:
        """Reduce the window's step metrics (one host sync), write them, react to bad steps."""
        host = jax.device_get(pending)
        skipped = [(s, i) for (s, i), m in zip(ids, host) if not m["finite"]]
        for s, i in skipped:
            log.warning("step %d: non-finite loss or gradient, update skipped (example ids %s)", s, i[:16])
        good = [m for m in host if m["finite"]]
        row = {}
        if good:  # metrics of the steps that updated; skipped steps are only counted
            sums = {k: np.sum([m[k] for m in good], axis=0) for k in good[0]}  # arrays (MoE counts) too
            row = self.task.train_metrics(sums, len(good))
            self.spikes.check(self.step, row["loss"])
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{float(host[-1]['lr']):.2e}")
        row.update(lr=float(host[-1]["lr"]), **window.close())
        if skipped:
            row["skipped_steps"] = len(skipped)
        self.logger.write(self.step, "train", row)
        self.task.on_log(self.step, self.logger)
        if self.bar.disable:
            log.info("step %d/%d train: %s", self.step, self.total, _fmt(row))
        if int(host[-1]["bad_steps"]) >= self.cfg.train.max_bad_steps:
            self.checkpoint(None)  # bad steps never updated the params: this is the last good state
            self.ckpts.wait()
            raise Diverged(
                f"{int(host[-1]['bad_steps'])} non-finite steps in a row (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); stopped at step {self.step} with a checkpoint of the last "
                f"good parameters. Usual remedies: lower optim.lr, keep optim.clip_norm on, use "
                f"model.dtype=float32 instead of bfloat16, check the data of the example ids logged above")

    def run(self) -> dict:
        cfg, total = self.cfg, self.total
        trained, frozen = param_count(self.fn.params), param_count(self.fn.frozen)
        per_epoch = self.task.steps_per_epoch
        log.info("training %d steps (%.2f epochs of %d steps), %d trainable parameters%s", total - self.step,
                 (total - self.step) / per_epoch, per_epoch, trained,
                 f" ({trained / (trained + frozen):.2%} of {trained + frozen})" if frozen else "")
        guard, poison = PreemptionGuard(), _fault_steps()
        self.compiles = CompileCounter()  # train and eval programs compiled (or read from the cache) from here on
        batch_log = open(self.run_dir / "batches.jsonl", "a") if cfg.train.log_batches and \
            jax.process_index() == 0 else None
        self.bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None if jax.process_index() == 0 else True)
        pending, ids, window = [], [], Window(self.compiles)
        stop, last_eval, every = False, None, cfg.checkpoint.every
        try:
            while self.step < total and not stop:
                batch = self.next_batch()
                window.add(batch)
                if self.step + 1 in poison:
                    batch["weights"] = np.full_like(batch["weights"], np.nan)
                self.state, metrics = self.train_step(self.state, to_device(batch, self.mesh))
                self.step += 1
                pending.append(metrics)
                ids.append((self.step, batch["example_ids"][batch["example_ids"] >= 0].tolist()))
                if batch_log:
                    batch_log.write(json.dumps({"step": self.step, "example_ids": ids[-1][1]}) + "\n")
                    batch_log.flush()
                self.bar.update(1)
                if self.sampler and self.sampler.due(self.step):
                    self.sampler.sample(self.step, self.fn, self.state["params"], self.logger)
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    self.log_window(pending, ids, window)
                    pending, ids, window = [], [], Window(self.compiles)
                eval_now = "validation" in self.task.splits and (
                    self.step == total or (cfg.train.eval_every and self.step % cfg.train.eval_every == 0))
                last_eval = self.evaluate("validation", self.state["params"]) if eval_now else None
                if last_eval is not None and self.stopper.update(self.step, last_eval):
                    stop = True
                    log.info("early stopping at step %d: %s has not improved for %d evals (best %.4g at step %d)",
                             self.step, self.metric, self.stopper.waited, self.stopper.best, self.stopper.best_step)
                preempted = guard.should_stop(self.step)
                halt = preempted or self.step == cfg.train.stop_at_step
                if self.step == total or stop or halt or (every and self.step % every == 0) or (not every and eval_now):
                    self.checkpoint(last_eval)
                if halt:
                    if pending:
                        self.log_window(pending, ids, window)
                    self.ckpts.wait()
                    if preempted:
                        raise Preempted(f"preempted at step {self.step}: checkpoint written to "
                                        f"{self.run_dir / 'checkpoints'}; re-run the same command to resume")
                    log.info("stopped at train.stop_at_step=%d with a checkpoint; re-run to continue", self.step)
                    return {"step": self.step, "run_dir": str(self.run_dir), "stopped": True}
            self.ckpts.wait()
            return self.summary(last_eval)
        finally:
            guard.close()
            self.bar.close()
            if batch_log:
                batch_log.close()
            self.ckpts.wait()
            self.ckpts.close()
            self.logger.close()

    def summary(self, last_eval: dict | None) -> dict:
        c = self.compiles.read()
        log.info("compiled %d program(s) %s and read %d from the persistent compilation cache (%s) in %.1f s",
                 c["compiles"], c["by_program"] or "", c["cache_hits"], self.xla_cache or "off", c["seconds"])
        out = {"step": self.step, "run_dir": str(self.run_dir), "compilation": c}
        if last_eval is not None or self.stopper.best is not None:
            out["eval"] = last_eval
            out["best"] = self.stopper.to_json()
        if "test" in self.task.splits:
            params = self.state["params"]
            if self.stopper.best_step is not None and self.stopper.best_step != self.step:
                params = self.ckpts.restore(self.stopper.best_step, {"params": params})[0]["params"]
                log.info("testing the best checkpoint (step %d)", self.stopper.best_step)
            out["test"] = self.evaluate("test", params)
        return out


def train(cfg: Config) -> dict:
    """Run (or resume) a fine-tuning run; returns the final eval/test metrics. The run directory is held
    (`claim_run_dir`: locked, refused or moved aside as `checkpoint.resume`/`overwrite` say) throughout."""
    parallel.initialize_from_config(cfg.mesh)  # before claim_run_dir asks which process this is
    with claim_run_dir(cfg):
        return Trainer(cfg).run()


def _fmt(m: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, (float, np.floating)) else f"{k}={v}" for k, v in m.items())


def param_count(params: dict) -> int:
    return sum(int(np.prod(p.shape)) for p in params.values())
