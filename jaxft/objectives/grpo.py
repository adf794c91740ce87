"""`train.objective: grpo`: reinforcement learning with verifiable rewards (GRPO; Shao et al. 2024, DeepSeek-R1).

Every `train.grpo.num_iterations` (μ) steps the objective rolls out: it draws `batch_size / num_generations`
prompts, samples `num_generations` completions of each with the current parameters (`jaxft.generate`'s
prefill + decode as one jitted program on the training mesh: one compile per bucket of prompt length),
scores them on the host (`jaxft.objectives.rewards`), turns the rewards into group-relative advantages and
hands the loop a batch of right-padded prompt + completion rows. The next μ steps train on it
(`jaxft.objectives.grpo_loss`); with μ > 1 the log-probabilities at rollout time are the old policy's.

Rollouts are a pure function of the seed, the rollout's index and the parameters, so a stopped and resumed run
equals the straight one bit for bit; a checkpoint in the middle of a rollout's μ steps stores that rollout's
batch in its metadata. Evaluation samples one greedy completion per validation prompt and reports its mean
reward. A sample of each window's completions goes to RUN_DIR/rollouts.jsonl and TensorBoard, and the run log
splits each rollout's wall time into waiting for the update, sampling and scoring.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

from jaxft import parallel
from jaxft.config import Config
from jaxft.data import pad_token_id
from jaxft.data.batches import to_device
from jaxft.data.prompts import build_prompt_data
from jaxft.generate import rollout_program
from jaxft.objectives.base import Objective
from jaxft.objectives.grpo_loss import CLIP_METRICS, advantages, make_grpo_loss, sequence_token_logps
from jaxft.objectives.preference import reference_copy
from jaxft.objectives.rewards import completion_text, make_rewards, score
from jaxft.train.run import write_json

log = logging.getLogger("jaxft")
ROLLOUT_KEY = 0x5EED   # folded into the run's seed: rollout keys never meet the dropout keys of the step


def completion_spans(tokens: np.ndarray, eos: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """`(lengths [B], truncated [B])` of sampled `tokens [B, N]`: each row up to and including its first eos id
    (all N where there is none, which is a truncated completion)."""
    N = tokens.shape[1]
    is_eos = np.isin(tokens, eos) if eos else np.zeros(tokens.shape, bool)
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), N)
    truncated = first == N
    return np.where(truncated, N, first + 1).astype(np.int32), truncated


def train_rows(prompt_ids, prompt_mask, tokens, lengths, keep, pad: int) -> dict[str, np.ndarray]:
    """Right-padded `[B, W + N]` rows: each prompt's real tokens, then its completion's `lengths` tokens;
    `loss_mask` 1 on the completion tokens of rows that `keep`."""
    B, W = prompt_ids.shape
    N = tokens.shape[1]
    ids = np.full((B, W + N), pad, np.int32)
    attention = np.zeros((B, W + N), np.int32)
    loss = np.zeros((B, W + N), np.int32)
    for r in range(B):
        p = prompt_ids[r][prompt_mask[r]]
        n = int(lengths[r])
        ids[r, :len(p)], ids[r, len(p):len(p) + n] = p, tokens[r, :n]
        attention[r, :len(p) + n] = 1
        loss[r, len(p):len(p) + n] = int(keep[r])
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def _pack(batch: dict) -> str:
    buf = io.BytesIO()
    np.savez(buf, **batch)
    return base64.b64encode(buf.getvalue()).decode()


def _unpack(text: str) -> dict:
    with np.load(io.BytesIO(base64.b64decode(text))) as z:
        return {k: z[k] for k in z.files}


class GRPOObjective(Objective):
    """`train.objective: grpo` on a causal LM: the objective interface of `jaxft.objectives.base`."""

    model_kwargs: dict = {}

    def __init__(self, cfg: Config, tokenizer, run_dir: Path, resuming: bool, splits):
        self.cfg, self.g, self.tokenizer, self.run_dir = cfg, cfg.train.grpo, tokenizer, Path(run_dir)
        g = self.g
        self.prompts_per_step = cfg.train.batch_size // g.num_generations
        self.splits, reports, template = build_prompt_data(cfg, tokenizer, splits, self.prompts_per_step)
        if "train" in splits:
            write_json(run_dir / "data_report.json", [vars(r) | {"rows_out": r.rows_out} for r in reports])
        self.export_kwargs = {"chat_template": template} if template else {}
        self.rewards = make_rewards(g.rewards, g.max_completion_length)
        self.loss = make_grpo_loss(g, cfg.train.loss_chunk_tokens)
        self.lora = cfg.model.lora.rank is not None
        self.pad = pad_token_id(tokenizer)
        self.eos = self._eos(cfg)
        self.buffer: dict | None = None       # the batch of the current rollout, reused for μ steps
        self.served = -1                       # the last step (0-based) a batch was handed out for
        self.window: list[dict] = []           # per-rollout host metrics since the last log
        self.last_window: list[dict] = []      # the latest rollout's, for a window that made none
        self.shown: list[dict] = []            # rows for rollouts.jsonl since the last log
        self.programs: dict = {}

    def _eos(self, cfg: Config) -> list[int]:
        from jaxft.generate import _eos_from
        from jaxft.hf.load import resolve

        folder = resolve(cfg.model.name_or_path)
        gen = Path(folder) / "generation_config.json"
        eos = _eos_from(json.loads(gen.read_text())) if gen.exists() else []
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = [self.tokenizer.eos_token_id]
        if not eos:
            log.warning("neither generation_config.json nor the tokenizer names an eos token: every completion "
                        "runs to train.grpo.max_completion_length=%d tokens", self.g.max_completion_length)
        return eos

    # -- what the loop asks -------------------------------------------------------------------------------------

    def frozen_model(self, start):
        """The reference model: for β > 0 with full fine-tuning a frozen copy of the starting point; None with
        LoRA (the base with adapters off) and for β = 0 (no KL term, nothing held)."""
        return reference_copy(start()) if self.g.beta and not self.lora else None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.splits["train"]) * self.g.num_iterations

    def train_batch(self, step: int, fn, params) -> dict:
        if step % self.g.num_iterations == 0 or self.buffer is None:
            if step % self.g.num_iterations:
                raise RuntimeError(f"step {step + 1} reuses a rollout that neither this process made nor the "
                                   f"checkpoint holds")
            self.buffer = self.rollout(step // self.g.num_iterations, fn, params)
        self.served = step
        return dict(self.buffer)

    def data_state(self) -> dict:
        state = {"prompts": self.splits["train"].position.to_json(), "rollout": None}
        if (self.served + 1) % self.g.num_iterations and self.buffer is not None:
            state["rollout"] = _pack(self.buffer)   # a checkpoint inside a rollout's μ steps keeps its batch
            state["rollout_metrics"] = (self.window or self.last_window)[-1:]   # and what its steps log
        return state

    def restore_data_state(self, saved: dict) -> None:
        train = self.splits["train"]
        train.position = train.position.from_json(saved["prompts"])
        self.buffer = _unpack(saved["rollout"]) if saved.get("rollout") else None
        self.last_window = saved.get("rollout_metrics") or []

    # -- rollouts -----------------------------------------------------------------------------------------------

    def program(self, fn, greedy: bool):
        key = (id(fn), greedy)
        if key not in self.programs:
            g = self.g
            self.programs[key] = rollout_program(fn, g.max_completion_length, 0.0 if greedy else g.temperature,
                                                 g.top_p, g.top_k)
        return self.programs[key]

    def _sample(self, fn, params, prompts: dict, key, greedy: bool) -> np.ndarray:
        arrays = {"ids": prompts["prompt_ids"], "mask": prompts["prompt_mask"]}
        if fn.mesh is not None:
            arrays = to_device(arrays, fn.mesh)   # rows split over the data-parallel devices
        return np.asarray(self.program(fn, greedy)(params, arrays["ids"], arrays["mask"], key, self.eos, self.pad))

    def _score(self, source, idx: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> tuple:
        """`(per-reward [N, R], prompts, texts)` of completions `tokens` of the prompt rows `idx` of `source`."""
        prompts = [source.prompts[int(i)] for i in idx]
        ids = [tokens[r, :int(n)].tolist() for r, n in enumerate(lengths)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        chat = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        columns = {k: [v[int(i)] for i in idx] for k, v in source.columns.items()}
        columns.update(completion_ids=ids, completion_lengths=[int(n) for n in lengths])
        return score(self.rewards, prompts, completions, columns), prompts, texts

    def rollout(self, index: int, fn, params) -> dict:
        """Sample, score and batch rollout `index` (its key: the seed and the index). If it fails (a reward
        function raising), the prompts it drew are put back, so a checkpoint then resumes exactly."""
        position = self.splits["train"].position
        try:
            return self._rollout(index, fn, params)
        except BaseException:
            self.splits["train"].position = position
            raise

    def _rollout(self, index: int, fn, params) -> dict:
        g, G = self.g, self.g.num_generations
        t0 = time.perf_counter()
        jax.block_until_ready(params)   # the previous steps' updates: timed apart from sampling
        t1 = time.perf_counter()
        batch = self.splits["train"].next()
        rows = {k: np.repeat(v, G, axis=0) for k, v in batch.items()}   # group i: rows iG … iG + G − 1
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed ^ ROLLOUT_KEY), index)
        tokens = self._sample(fn, params, rows, key, greedy=False)
        lengths, truncated = completion_spans(tokens, self.eos)
        t2 = time.perf_counter()
        per_reward, prompts, texts = self._score(self.splits["train"].prompts, rows["example_ids"], tokens, lengths)
        total = per_reward @ np.asarray([r.weight for r in self.rewards], np.float32)
        adv, std = advantages(total, G, g.scale_rewards)
        t3 = time.perf_counter()
        keep = ~truncated if g.mask_truncated_completions else np.ones_like(truncated)
        out = train_rows(rows["prompt_ids"], rows["prompt_mask"], tokens, lengths, keep, self.pad)
        out.update(advantages=adv, weights=rows["weights"], example_ids=rows["example_ids"])
        if g.num_iterations > 1:   # the old policy: the parameters that sampled these completions
            out["old_logps"] = self._logps(fn, params, out)
        self.window.append({
            "reward": float(total.mean()), "reward_std": float(std.mean()),
            **{f"rewards/{r.name}/mean": float(per_reward[:, j].mean()) for j, r in enumerate(self.rewards)},
            **{f"rewards/{r.name}/std": float(per_reward[:, j].std(ddof=1)) for j, r in enumerate(self.rewards)},
            "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.mean()),
            "frac_reward_zero_std": float(np.isclose(std, 0.0).mean()),
            "time/update_s": t1 - t0, "time/rollout_s": t2 - t1, "time/reward_s": t3 - t2})
        self.shown = [{"step": index * g.num_iterations + 1, "prompt": completion_text(p) if isinstance(p, list) else p,
                       "completion": t, "reward": float(r), "advantage": float(a),
                       **{f"rewards/{x.name}": float(v) for x, v in zip(self.rewards, per)}}
                      for p, t, r, a, per in zip(prompts, texts, total, adv, per_reward)][:g.log_completions]
        log.debug("rollout %d: update %.2f s, sampling %.2f s, rewards %.2f s", index, t1 - t0, t2 - t1, t3 - t2)
        return out

    def _logps(self, fn, params, batch: dict) -> np.ndarray:
        if "logps" not in self.programs:
            chunk = self.cfg.train.loss_chunk_tokens

            def logps(params, frozen, b):
                with parallel.activate(fn.mesh):
                    return sequence_token_logps(fn.module(params, frozen), b, chunk)

            out = {} if fn.mesh is None else {"out_shardings": parallel.replicated(fn.mesh)}
            self.programs["logps"] = jax.jit(logps, **out)
        arrays = {k: batch[k] for k in ("input_ids", "attention_mask")}
        arrays = to_device(arrays, fn.mesh) if fn.mesh is not None else arrays
        return np.asarray(self.programs["logps"](params, fn.frozen, arrays))

    # -- logging and evaluation ---------------------------------------------------------------------------------

    def train_metrics(self, s: dict, n_steps: int) -> dict:
        tokens = max(float(s["completion_tokens"]), 1.0)
        out = {"loss": s["loss"] / n_steps, "grad_norm": s["grad_norm"] / n_steps,
               **{k: s[k] / tokens for k in CLIP_METRICS + (("kl",) if self.g.beta else ())}}
        # rollout metrics: the mean over the window's rollouts, else (μ > 1) those of the rollout trained on
        window = self.window or self.last_window
        if window:
            out.update({k: float(np.mean([w[k] for w in window])) for k in window[0]})
        out["rollouts"] = len(self.window)
        self.last_window, self.window = window[-1:], []
        return out

    def on_log(self, step: int, logger) -> None:
        """Write the latest rollout's sampled rows to rollouts.jsonl and TensorBoard (process 0)."""
        rows, self.shown = self.shown, []
        if not rows or jax.process_index() != 0:
            return
        with open(self.run_dir / "rollouts.jsonl", "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        if logger.tb is not None:
            for i, r in enumerate(rows):
                logger.tb.add_text(f"rollouts/{i}", f"{r['prompt']} → {r['completion']} (reward {r['reward']:.3g})",
                                   step)
            logger.tb.flush()

    def evaluate(self, eval_step, params, split: str, mesh) -> dict:
        """Mean reward (total and per reward) and length of one greedy completion per prompt of the split."""
        fn, source = eval_step.fn, self.splits[split]
        totals, per, lengths, n = [], [], [], 0
        limit = self.g.eval_prompts
        for batch in source.epoch():
            real = batch["weights"] > 0
            tokens = self._sample(fn, params, batch, jax.random.key(0), greedy=True)
            length, _ = completion_spans(tokens, self.eos)
            idx = batch["example_ids"][real]
            r, _, _ = self._score(source.prompts, idx, tokens[real], length[real])
            per.append(r)
            totals.append(r @ np.asarray([x.weight for x in self.rewards], np.float32))
            lengths.append(length[real])
            n += int(real.sum())
            if limit and n >= limit:
                break
        per_all, total, length = np.concatenate(per)[:limit], np.concatenate(totals)[:limit], np.concatenate(lengths)[:limit]
        return {"reward": float(total.mean()),
                **{f"rewards/{x.name}/mean": float(per_all[:, j].mean()) for j, x in enumerate(self.rewards)},
                "completions/mean_length": float(length.mean()), "prompts": int(len(total))}
