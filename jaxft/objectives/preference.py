"""Preference objectives on `{prompt, chosen, rejected}` pairs: DPO, IPO, SimPO and ORPO, as TRL defines them.

For a pair, let `c`, `r` be the policy's log-probabilities of the chosen and rejected responses (summed over
their response tokens, `n_c` and `n_r` of them), `c₀`, `r₀` the reference model's, σ the logistic function,
β = `train.dpo.beta`, ε = `train.dpo.label_smoothing`, γ = `train.dpo.simpo_gamma`:

    dpo     h = (c − c₀) − (r − r₀);   loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)            (Rafailov et al.;
                                        ε > 0: conservative DPO, TRL's sigmoid loss with label smoothing)
    ipo     loss = ((c − c₀)/n_c − (r − r₀)/n_r − 1/(2β))²       (Azar et al. eq. 17, length-normalised as TRL)
    simpo   c̄ = c/n_c, r̄ = r/n_r;  m = c̄ − r̄ − γ/β;  loss = −(1−ε)·log σ(β·m) − ε·log σ(−β·m)   (no reference)
    orpo    log odds = (c̄ − r̄) − (log(1 − e^c̄) − log(1 − e^r̄));  loss = −c̄ − β·log σ(log odds)   (no reference)

The rewards TRL logs are β·(c − c₀) and β·(r − r₀) for dpo/ipo, β·c̄ and β·r̄ for simpo/orpo; `logps/*` are
`c`, `r` (dpo/ipo) or `c̄`, `r̄` (simpo/orpo). ORPO's NLL term here is the chosen response's mean token
negative log-likelihood, averaged over pairs (TRL averages over all tokens of the chosen batch, prompt
included); its odds-ratio term is TRL's.

The reference model is the policy's starting point. A LoRA run computes it with the adapters switched off
(`jaxft.models.lora.adapters_off`): the same weights, no second copy. A full fine-tuning run holds a frozen
copy of the initial parameters beside the train state (`frozen_model`), passed to the jitted step as an
argument, never donated and never in the optimizer. Both reference passes run inside the same jitted step
under `stop_gradient`.

The loss returns sums over pairs and the number of pairs (`weight`), as every jaxft loss does, so gradient
accumulation and evaluation divide once and stay exact; so do the metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft import parallel
from jaxft.config import Config, ConfigError, PreferenceSection
from jaxft.data.batches import to_device
from jaxft.data.preference import SIDES, build_preference_data
from jaxft.models.lora import adapters_off
from jaxft.objectives.base import Objective
from jaxft.train.run import write_json

log = logging.getLogger("jaxft")

NEEDS_REFERENCE = ("dpo", "ipo")
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")   # precomputed reference log-probs, per pair
REFERENCE_FILE = "reference_logps.npz"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


def sequence_logps(model, ids_NT, attention_NT, loss_mask_NT, dropout_rng=None) -> tuple[jax.Array, jax.Array]:
    """`(Σ log p(token), number of tokens)` over each row's response tokens: `[N]` and `[N]`.

    Position t predicts token t+1; a target counts when its `loss_mask` is 1 and it is a real token."""
    logits_NTV = model(ids_NT, attention_mask=attention_NT, segment_ids=attention_NT, dropout_rng=dropout_rng)
    target_ok = ((loss_mask_NT[:, 1:] > 0) & (attention_NT[:, 1:] > 0)).astype(jnp.float32)
    logp_NT = -optax.softmax_cross_entropy_with_integer_labels(logits_NTV[:, :-1].astype(jnp.float32), ids_NT[:, 1:])
    return jnp.sum(logp_NT * target_ok, axis=1), jnp.sum(target_ok, axis=1)


def _log1mexp(x):
    """log(1 − eˣ) for x ≤ 0, stable on both sides of −log 2 (as TRL's ORPO)."""
    return jnp.where(x < -math.log(2), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def pair_losses(kind: str, p: PreferenceSection, c, r, n_c, n_r, c_ref=None, r_ref=None) -> tuple:
    """Per-pair `(loss [P], chosen reward [P], rejected reward [P], chosen logps [P], rejected logps [P],
    extras {name: [P]})` from summed log-probs `c`, `r`, token counts `n_c`, `n_r` and the reference's sums."""
    beta, eps = p.beta, p.label_smoothing
    extras = {}
    if kind in NEEDS_REFERENCE:
        dc, dr = c - c_ref, r - r_ref
        if kind == "dpo":
            h = beta * (dc - dr)
            loss = -(1 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)
        else:
            loss = (dc / jnp.maximum(n_c, 1.0) - dr / jnp.maximum(n_r, 1.0) - 1 / (2 * beta)) ** 2
        return loss, beta * dc, beta * dr, c, r, extras
    # mean log-prob per response token; a padding row (no tokens, weight 0) gets −1, where log(1 − eˣ) is finite
    c_mean = jnp.where(n_c > 0, c / jnp.maximum(n_c, 1.0), -1.0)
    r_mean = jnp.where(n_r > 0, r / jnp.maximum(n_r, 1.0), -1.0)
    if kind == "simpo":
        m = beta * (c_mean - r_mean - p.simpo_gamma / beta)
        loss = -(1 - eps) * jax.nn.log_sigmoid(m) - eps * jax.nn.log_sigmoid(-m)
    elif kind == "orpo":
        log_odds = (c_mean - r_mean) - (_log1mexp(c_mean) - _log1mexp(r_mean))
        ratio = jax.nn.log_sigmoid(log_odds)
        loss = -c_mean - beta * ratio
        extras = {"nll_loss": -c_mean, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
    else:
        raise ValueError(f"unknown preference objective {kind!r}")
    return loss, beta * c_mean, beta * r_mean, c_mean, r_mean, extras


def _both_sides(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chosen and rejected rows interleaved into one `[2B, T]` batch (row 2i chosen, 2i+1 rejected), so that
    one forward pass computes both and each device's rows stay on it."""
    def inter(key):
        return jnp.stack([batch[f"{s}_{key}"] for s in SIDES], axis=1).reshape(-1, batch[f"chosen_{key}"].shape[1])
    return inter("input_ids"), inter("attention_mask"), inter("loss_mask")


def make_preference_loss(kind: str, p: PreferenceSection):
    """The loss of a preference objective: `(model, batch, dropout_rng, reference=None) -> (Σ loss, sums)`.

    `reference` is the frozen reference model of a full fine-tuning run; without one (LoRA) the reference
    is `model` with its adapters off. SimPO and ORPO use none."""

    def preference_loss(model, batch, dropout_rng, reference=None):
        ids, attention, mask = _both_sides(batch)
        logps_2B, tokens_2B = sequence_logps(model, ids, attention, mask, dropout_rng)
        c, r = logps_2B[0::2], logps_2B[1::2]
        n_c, n_r = tokens_2B[0::2], tokens_2B[1::2]
        c_ref = r_ref = None
        if kind in NEEDS_REFERENCE and REFERENCE_COLUMNS[0] in batch:   # train.dpo.precompute_reference
            c_ref, r_ref = (batch[k] for k in REFERENCE_COLUMNS)
        elif kind in NEEDS_REFERENCE:
            with adapters_off() if reference is None else contextlib.nullcontext():
                ref_2B, _ = sequence_logps(model if reference is None else reference, ids, attention, mask)
            ref_2B = jax.lax.stop_gradient(ref_2B)
            c_ref, r_ref = ref_2B[0::2], ref_2B[1::2]
        return pair_sums(kind, p, batch["weights"], c, r, n_c, n_r, c_ref, r_ref)

    return preference_loss


def pair_sums(kind: str, p: PreferenceSection, w, c, r, n_c, n_r, c_ref=None, r_ref=None) -> tuple:
    """`(Σ w·loss, {"weight": Σ w, metric: Σ w·value})` over pairs of weight `w` (0 for padding rows): the
    loss and TRL's metrics as sums, so dividing by the total weight gives TRL's means however pairs are split."""
    loss, rc, rr, lc, lr, extras = pair_losses(kind, p, c, r, n_c, n_r, c_ref, r_ref)
    values = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": (rc > rr).astype(jnp.float32),
              "rewards/margins": rc - rr, "logps/chosen": lc, "logps/rejected": lr, **extras}
    sums = {k: jnp.sum(jax.lax.stop_gradient(v) * w) for k, v in values.items()}
    return jnp.sum(loss * w), {"weight": jnp.sum(w), **sums}


def reference_pass(fn, batches, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The starting model's summed response log-probs of every pair of `batches` (`PairBatches`, one pass in
    order), with any LoRA adapters off: `(chosen [N], rejected [N])`, float32, on every process."""
    def pair_logps(params, frozen, batch):
        with parallel.activate(fn.mesh), adapters_off():
            lp, _ = sequence_logps(fn.module(params, frozen), *_both_sides(batch))
        return lp[0::2], lp[1::2]

    # replicated results: every process reads all pairs' values
    logps = jax.jit(pair_logps) if fn.mesh is None else jax.jit(pair_logps, out_shardings=parallel.replicated(fn.mesh))
    n = len(batches.enc)
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    total, every = -(-n // batches.batch_size), max(1, -(-n // batches.batch_size) // 10)
    for i, batch in enumerate(batches.epoch(), 1):
        rows = batch["example_ids"][batch["example_ids"] >= 0]
        arrays = to_device(batch, fn.mesh) if fn.mesh is not None else \
            {k: jnp.asarray(v) for k, v in batch.items() if k != "example_ids"}
        c, r = logps(fn.params, fn.frozen, arrays)
        chosen[rows], rejected[rows] = np.asarray(c)[:len(rows)], np.asarray(r)[:len(rows)]
        if i % every == 0 or i == total:
            log.info("reference log-probs of the %s pairs: batch %d/%d", split, i, total)
    return chosen, rejected


def pairs_fingerprint(batches) -> str:
    """A digest of a split's pairs as tokenised (ids, response masks, lengths of both sides)."""
    h = hashlib.sha256()
    for enc in (batches.pairs.chosen, batches.pairs.rejected):
        h.update(np.ascontiguousarray(enc.offsets).tobytes())
        for k in sorted(enc.fields):
            h.update(k.encode() + np.ascontiguousarray(enc.fields[k]).tobytes())
    return h.hexdigest()


def reference_copy(fn):
    """A frozen copy of `fn`'s model as it is now (the policy's starting point): a `Functional` whose every
    variable is frozen, its parameters copied in place on their devices (the train step donates the originals)."""
    from jaxft.train.step import Functional

    copied = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(fn.params)
    return Functional(fn.module(copied), trainable=lambda path, v: False)


class PreferenceObjective(Objective):
    """`train.objective` dpo | ipo | simpo | orpo on a causal LM: the task interface of `jaxft.objectives`."""

    model_kwargs: dict = {}

    def __init__(self, cfg: Config, tokenizer, run_dir: Path, resuming: bool, splits):
        self.kind, self.lora = cfg.train.objective, cfg.model.lora.rank is not None
        self.precompute = cfg.train.dpo.precompute_reference
        if self.precompute and self.kind not in NEEDS_REFERENCE:
            raise ConfigError(f"train.dpo.precompute_reference=true needs a reference model (train.objective dpo "
                              f"or ipo); train.objective={self.kind} has none")
        self.run_dir, self.training = Path(run_dir), "train" in splits
        self.loss = make_preference_loss(self.kind, cfg.train.dpo)
        self.splits, reports, template = build_preference_data(cfg, tokenizer, splits)
        if "train" in splits:
            write_json(run_dir / "data_report.json", [vars(r) | {"rows_out": r.rows_out} for r in reports])
        self.export_kwargs = {"chat_template": template} if template else {}
        self.metric_names = METRICS + (ORPO_METRICS if self.kind == "orpo" else ())

    def frozen_model(self, start):
        """The reference model beside the train state: for full fine-tuning with dpo/ipo a frozen copy of the
        starting point (`start()`, a `Functional`); None with LoRA (adapters off) and for simpo/orpo. With
        `precompute_reference`, None: the starting point's log-probs are attached to every split's pairs."""
        if self.kind not in NEEDS_REFERENCE:
            return None
        if self.precompute:
            self.attach_reference(start)
            return None
        return None if self.lora else reference_copy(start())

    def attach_reference(self, start) -> None:
        """Give every split's pairs their reference log-probs: read from `RUN_DIR/reference_logps.npz` where
        its fingerprint matches the split's tokens, else computed by `reference_pass` (and, in a training run,
        saved there by process 0)."""
        path = self.run_dir / REFERENCE_FILE
        saved = {}
        if path.exists():
            try:
                with np.load(path) as z:
                    saved = {k: z[k] for k in z.files}
            except Exception as e:  # noqa: BLE001 - cut, empty or not an npz: computed again, then rewritten
                log.warning("%s is unreadable (%s: %s): computing the reference log-probs again", path,
                            type(e).__name__, e)
        fn, computed = None, False
        for split, batches in self.splits.items():
            digest = pairs_fingerprint(batches)
            if str(saved.get(f"{split}/fingerprint", "")) == digest:
                log.info("reference log-probs of the %s pairs read from %s", split, path)
                values = saved[f"{split}/chosen"], saved[f"{split}/rejected"]
            else:
                fn = fn or start()
                values = reference_pass(fn, batches, split)
                saved.update({f"{split}/fingerprint": np.array(digest), f"{split}/chosen": values[0],
                              f"{split}/rejected": values[1]})
                computed = True
            batches.per_example = dict(batches.per_example, **dict(zip(REFERENCE_COLUMNS, values)))
        if computed and self.training and jax.process_index() == 0:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **saved)
            tmp.replace(path)

    def train_metrics(self, s: dict, n_steps: int) -> dict:
        pairs = max(float(s["weight"]), 1.0)
        return {"loss": s["loss"] / n_steps, "grad_norm": s["grad_norm"] / n_steps,
                **{k: s[k] / pairs for k in self.metric_names}}

    def evaluate(self, eval_step, params, split: str, mesh) -> dict:
        """Pair-mean loss and metrics over the whole split."""
        sums: dict[str, float] = {}
        for batch in self.splits[split].epoch():
            loss_sum, aux = eval_step(params, to_device(batch, mesh))
            for k, v in {"loss": loss_sum, **aux}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        pairs = max(sums["weight"], 1.0)
        return {"loss": sums["loss"] / pairs, **{k: sums[k] / pairs for k in self.metric_names},
                "pairs": int(sums["weight"])}
