"""Preference losses and metrics equal TRL's own (fixed log-prob arrays), and jaxft's sequence log-probs of a
tiny random Llama chat batch equal those from the `transformers` model's logits. With unequal pair weights and
padding rows (weight 0), the loss and every metric, summed and divided by the weight, are the weight-means.

TRL is the reference only: its trainers' loss methods are called directly on the arrays, on minimal trainer
objects (`object.__new__`, with just the attributes those methods read), so no model or data set is built.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.config import PreferenceSection
from jaxft.objectives.preference import pair_sums

B, T = 5, 12
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def fixed_logps(seed: int = 0):
    """Per-token log-probs `[2B, T-1]` (rows: B chosen then B rejected, as TRL batches them), zero outside the
    completion, their completion mask `[2B, T]` (prompts of 2-5 tokens, completions of 1-6, then padding), and
    reference sums `[2B]`."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((2 * B, T), np.float32)
    for i in range(2 * B):
        start = rng.integers(2, 6)
        mask[i, start:start + rng.integers(1, 7)] = 1
    per_token = (-rng.uniform(0.05, 1.5, (2 * B, T - 1)) * mask[:, 1:]).astype(np.float32)
    ref = (per_token.sum(1) + rng.normal(0, 0.8, 2 * B)).astype(np.float32)
    return per_token, mask, ref


def jaxft_means(kind, p, per_token, mask, ref):
    sums, counts = per_token.sum(1), mask[:, 1:].sum(1)
    args = [jnp.asarray(x) for x in (sums[:B], sums[B:], counts[:B], counts[B:])]
    refs = [jnp.asarray(ref[:B]), jnp.asarray(ref[B:])] if ref is not None else []
    loss_sum, aux = pair_sums(kind, p, jnp.ones(B), *args, *refs)
    w = float(aux["weight"])
    assert w == B
    return float(loss_sum) / w, {k: float(v) / w for k, v in aux.items() if k != "weight"}


def fake_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def trl_dpo(loss_type: str, beta: float, per_token, mask, ref):
    """TRL's DPOTrainer._compute_loss with precomputed reference log-probs and a stand-in model whose output
    holds the fixed per-token log-probs."""
    from trl import DPOTrainer

    per_token, mask = torch.tensor(per_token), torch.tensor(mask)
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                          mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=model, accelerator=fake_accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list)})
    inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": torch.tensor(ref[:B]),
              "ref_rejected_logps": torch.tensor(ref[B:])}
    loss = trainer._compute_loss(lambda **kw: out, inputs, return_outputs=False)
    return float(loss), {k: trainer._metrics["train"][k][0] for k in METRICS}


def trl_cpo(loss_type: str, beta: float, label_smoothing: float, gamma: float, chosen, rejected):
    from trl.experimental.cpo import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                            simpo_gamma=gamma, accelerator=fake_accelerator())
    losses, rc, rr = trainer.cpo_loss(torch.tensor(chosen), torch.tensor(rejected))
    return losses.numpy(), rc.numpy(), rr.numpy()


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl_dpo_trainer(loss_type):
    per_token, mask, ref = fixed_logps()
    beta = 0.3
    loss, metrics = jaxft_means({"sigmoid": "dpo", "ipo": "ipo"}[loss_type], PreferenceSection(beta=beta),
                                per_token, mask, ref)
    want_loss, want = trl_dpo(loss_type, beta, per_token, mask, ref)
    assert 0 < want["rewards/accuracies"] < 1  # both outcomes occur in the fixed pairs
    close(loss, want_loss)
    for k in METRICS:
        close(metrics[k], want[k])


def test_dpo_label_smoothing_equals_trl_conservative_sigmoid():
    """Conservative DPO: TRL's sigmoid loss with label smoothing (CPOTrainer.cpo_loss; TRL's DPOTrainer keeps
    label smoothing for its robust/EXO losses) on the policy−reference log-ratios."""
    per_token, mask, ref = fixed_logps(1)
    p = PreferenceSection(beta=0.5, label_smoothing=0.2)
    loss, metrics = jaxft_means("dpo", p, per_token, mask, ref)
    sums = per_token.sum(1)
    losses, rc, rr = trl_cpo("sigmoid", p.beta, p.label_smoothing, 0.0, sums[:B] - ref[:B], sums[B:] - ref[B:])
    close(loss, losses.mean())
    close(metrics["rewards/chosen"], rc.mean())
    close(metrics["rewards/margins"], (rc - rr).mean())
    close(metrics["rewards/accuracies"], (rc > rr).mean())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_trainer(label_smoothing):
    per_token, mask, _ = fixed_logps(2)
    p = PreferenceSection(beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing)
    loss, metrics = jaxft_means("simpo", p, per_token, mask, None)
    mean = per_token.sum(1) / mask[:, 1:].sum(1)  # TRL's get_batch_logps(average_log_prob=True)
    losses, rc, rr = trl_cpo("simpo", p.beta, label_smoothing, p.simpo_gamma, mean[:B], mean[B:])
    close(loss, losses.mean())
    close(metrics["rewards/chosen"], rc.mean())
    close(metrics["rewards/rejected"], rr.mean())
    close(metrics["rewards/accuracies"], (rc > rr).mean())
    close(metrics["rewards/margins"], (rc - rr).mean())
    close(metrics["logps/chosen"], mean[:B].mean())
    close(metrics["logps/rejected"], mean[B:].mean())


def test_orpo_equals_trl_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    per_token, mask, _ = fixed_logps(3)
    p = PreferenceSection(beta=0.25)
    loss, metrics = jaxft_means("orpo", p, per_token, mask, None)
    mean = per_token.sum(1) / mask[:, 1:].sum(1)
    trainer = object.__new__(ORPOTrainer)
    trainer.__dict__.update(beta=p.beta, accelerator=fake_accelerator())
    losses, rc, rr, ratio, log_odds = trainer.odds_ratio_loss(torch.tensor(mean[:B]), torch.tensor(mean[B:]))
    nll = -mean[:B].mean()  # jaxft's NLL: the chosen responses' mean token NLL, averaged over pairs
    close(loss, nll - losses.numpy().mean())  # TRL: loss = policy_nll_loss - losses.mean()
    close(metrics["nll_loss"], nll)
    close(metrics["log_odds_ratio"], float(ratio))
    close(metrics["log_odds_chosen"], float(log_odds))
    close(metrics["rewards/chosen"], rc.numpy().mean())
    close(metrics["rewards/margins"], (rc - rr).numpy().mean())
    close(metrics["rewards/accuracies"], (rc > rr).numpy().mean())


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def hand_pair_values(kind, p, c, r, n_c, n_r, c_ref, r_ref):
    """Per-pair loss and metrics in float64 from the formulas (TRL's definitions), for real pairs only."""
    beta, eps = p.beta, p.label_smoothing
    if kind in ("dpo", "ipo"):
        dc, dr = c - c_ref, r - r_ref
        if kind == "dpo":
            h = beta * (dc - dr)
            loss = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
        else:
            loss = (dc / n_c - dr / n_r - 1 / (2 * beta)) ** 2
        rc, rr, lc, lr, extras = beta * dc, beta * dr, c, r, {}
    else:
        cm, rm = c / n_c, r / n_r
        if kind == "simpo":
            m = beta * (cm - rm) - p.simpo_gamma
            loss, extras = -(1 - eps) * _log_sigmoid(m) - eps * _log_sigmoid(-m), {}
        else:
            log_odds = (cm - rm) - (np.log1p(-np.exp(cm)) - np.log1p(-np.exp(rm)))
            ratio = _log_sigmoid(log_odds)
            loss = -cm - beta * ratio
            extras = {"nll_loss": -cm, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
        rc, rr, lc, lr = beta * cm, beta * rm, cm, rm
    return loss, {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": (rc > rr).astype(np.float64),
                  "rewards/margins": rc - rr, "logps/chosen": lc, "logps/rejected": lr, **extras}


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo", "orpo"])
def test_sums_are_weighted_by_the_pair_weights(kind):
    """`pair_sums` on a batch of 5 pairs of unequal weight and 2 padding rows (weight 0, no response token, zero
    log-probs, as `sequence_logps` gives them): the loss and every metric summed and divided by the weight equal
    the weight-mean of the per-pair values computed here from the formulas on the real pairs only. Unweighted
    metric sums count the padding rows and weigh every pair alike: off by far more than the bar."""
    rng = np.random.default_rng(7)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.5, 0.25, 0.0])
    real = w > 0
    n_c, n_r = rng.integers(1, 7, 7).astype(np.float64), rng.integers(1, 7, 7).astype(np.float64)
    c, r = -rng.uniform(0.05, 1.5, 7) * n_c, -rng.uniform(0.05, 1.5, 7) * n_r
    c_ref, r_ref = c + rng.normal(0, 0.8, 7), r + rng.normal(0, 0.8, 7)
    c[~real] = r[~real] = n_c[~real] = n_r[~real] = 0.0
    p = PreferenceSection(beta=0.4, label_smoothing=0.1 if kind in ("dpo", "simpo") else 0.0, simpo_gamma=0.3)
    refs = (c_ref, r_ref) if kind in ("dpo", "ipo") else ()
    loss_sum, aux = pair_sums(kind, p, jnp.asarray(w, jnp.float32),
                              *(jnp.asarray(x, jnp.float32) for x in (c, r, n_c, n_r, *refs)))
    loss, values = hand_pair_values(kind, p, *(x[real] for x in (c, r, n_c, n_r, c_ref, r_ref)))
    wr = w[real]
    assert float(aux["weight"]) == wr.sum() == 5.25
    assert 0 < values["rewards/accuracies"].mean() < 1  # both outcomes among the real pairs
    want = {"loss": np.sum(loss * wr) / wr.sum(), **{k: np.sum(v * wr) / wr.sum() for k, v in values.items()}}
    got = {"loss": float(loss_sum) / float(aux["weight"]),
           **{k: float(v) / float(aux["weight"]) for k, v in aux.items() if k != "weight"}}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
