"""`jaxft train`: the training loop.

One jitted step per batch, no host sync between logs: step metrics stay on the device until
`train.log_every`, when they are averaged and written. Evaluation every `train.eval_every` steps and
at the end; checkpoints every `checkpoint.every` steps (default: at each eval) and at the end; early
stopping on `train.early_stopping`. Re-running the same command in the same run directory resumes
from its latest checkpoint, with the data iterator where it was.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxft import parallel
from jaxft.config import Config, ConfigError, save_config
from jaxft.data.batches import Position, to_device
from jaxft.hf.load import load_model, resolve
from jaxft.optim import make_optimizer
from jaxft.train.logger import RunLogger
from jaxft.train.run import checkpoints_of, setup_logging
from jaxft.train.tasks import make_task, param_count
from jaxft.train.step import Functional, init_state, make_eval_step, make_train_step

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
    log.info("mesh %s: global batch %d = %d device(s) × %d micro-batch(es) × %d per device",
             dict(mesh.shape), cfg.train.batch_size, dp, cfg.train.grad_accum, cfg.train.batch_size // per)


def train(cfg: Config) -> dict:
    """Run (or resume) a fine-tuning run; returns the final eval/test metrics."""
    if cfg.data.train is None:
        raise ConfigError("data.train is required for training")
    run_dir = Path(cfg.output_dir)
    setup_logging(run_dir)
    mesh = parallel.make_mesh(cfg.mesh.model_dump())
    check_batch(cfg, mesh)

    from transformers import AutoTokenizer

    model_dir = resolve(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ckpts = checkpoints_of(run_dir, cfg)
    resume_step = ckpts.latest_step() if cfg.checkpoint.resume else None
    task = make_task(cfg, tokenizer, run_dir, resuming=resume_step is not None)
    if jax.process_index() == 0:
        save_config(cfg, run_dir / "config.yaml")

    batches = task.splits["train"]
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * len(batches)))
    model = load_model(model_dir, cfg.model.task, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                       mesh=mesh, seed=cfg.train.seed, **task.model_kwargs)
    fn = Functional(model)
    tx, lr = make_optimizer(cfg.optim, total)
    state = init_state(fn, tx, cfg.train.seed)
    metric, mode = cfg.early_stopping()
    patience = cfg.train.early_stopping.patience
    stopper = EarlyStopper(metric, mode, patience)
    if resume_step is not None:
        restored, meta = ckpts.restore(resume_step, {"params": state["params"],
                                                     "train": {k: v for k, v in state.items() if k != "params"}})
        state = {"params": restored["params"], **restored["train"]}
        batches.position = Position(**meta["data"])
        stopper = EarlyStopper(metric, mode, patience, **meta["early_stopping"])
        log.info("resumed from step %d of %s", resume_step, run_dir)

    train_step = make_train_step(fn, task.loss, tx, lr, cfg.train.grad_accum)
    eval_step = make_eval_step(fn, task.loss)
    logger = RunLogger(run_dir)

    def evaluate(split: str, params) -> dict:
        m = task.evaluate(eval_step, params, split, mesh)
        logger.write(step, "eval" if split == "validation" else split, m)
        log.info("step %d %s: %s", step, split, _fmt(m))
        return m

    def checkpoint(metrics: dict | None) -> None:
        meta = {"data": batches.position.to_json(), "metrics": metrics, "early_stopping": stopper.to_json(),
                "total_steps": total}
        ckpts.save(step, state, meta, metrics)

    step = int(resume_step or 0)
    log.info("training %d steps (%.2f epochs of %d batches), %d parameters", total - step,
             (total - step) / len(batches), len(batches), param_count(fn.params))
    pending, t0, seen = [], time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if jax.process_index() == 0 else True)
    stop, last_eval = False, None
    every_ckpt = cfg.checkpoint.every
    while step < total and not stop:
        batch = batches.next()
        seen += int(batch["weights"].sum())
        state, metrics = train_step(state, to_device(batch, mesh))
        step += 1
        pending.append(metrics)
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total:
            host = jax.device_get(pending)  # the only host sync between logs
            sums = {k: float(np.sum([m[k] for m in host])) for k in host[0]}
            row = {**task.train_metrics(sums, len(host)), "lr": float(host[-1]["lr"]),
                   "examples_per_s": seen / (time.perf_counter() - t0)}
            logger.write(step, "train", row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", ex_s=f"{row['examples_per_s']:.1f}")
            if bar.disable:
                log.info("step %d/%d train: %s", step, total, _fmt(row))
            pending = []
        eval_now = "validation" in task.splits and (
            step == total or (cfg.train.eval_every and step % cfg.train.eval_every == 0))
        last_eval = evaluate("validation", state["params"]) if eval_now else None
        if last_eval is not None:
            stop = stopper.update(step, last_eval)
            if stop:
                log.info("early stopping at step %d: %s has not improved for %d evals (best %.4f at step %d)",
                         step, metric, stopper.waited, stopper.best, stopper.best_step)
        if step == total or stop or (every_ckpt and step % every_ckpt == 0) or (not every_ckpt and eval_now):
            checkpoint(last_eval)
    bar.close()
    ckpts.wait()

    summary = {"step": step, "run_dir": str(run_dir)}
    if last_eval is not None or stopper.best is not None:
        summary["eval"] = last_eval
        summary["best"] = stopper.to_json()
    if "test" in task.splits:
        params = state["params"]
        if stopper.best_step is not None and stopper.best_step != step:
            params = ckpts.restore(stopper.best_step, {"params": params})[0]["params"]
            log.info("testing the best checkpoint (step %d)", stopper.best_step)
        summary["test"] = evaluate("test", params)
    ckpts.close()
    logger.close()
    return summary


def _fmt(m: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
