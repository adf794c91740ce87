"""GRPO's advantages and loss against TRL 1.16's own code, and the per-token log-probs jaxft trains on against
the `transformers` model (TRL and torch only on the reference side)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.config import GRPOSection
from jaxft.objectives.grpo import completion_spans, train_rows
from jaxft.objectives.grpo_loss import advantages, grpo_sums, sequence_token_logps

B, T = 6, 9


def fixed_tensors(seed: int = 0) -> dict:
    """Per-token log-probs of a policy near its old self and a reference, ragged completion masks (one row
    empty), advantages of both signs and large enough to leave the clip range."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 4.0, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    lengths = np.array([9, 4, 1, 7, 0, 3])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(0, 1.5, B).astype(np.float32)
    return {"logp": logp, "old": old, "ref": ref, "mask": mask, "adv": adv}


def trl_loss(g: GRPOSection, x: dict, with_old: bool) -> tuple[float, dict, np.ndarray]:
    """TRL's `GRPOTrainer._compute_loss` driven with fixed tensors: `(loss, logged metrics, d loss / d logp)`."""
    import torch
    from trl import GRPOTrainer

    logp = torch.tensor(x["logp"], requires_grad=True)
    metrics: dict = {}

    class Acc:
        num_processes = 1

        @staticmethod
        def reduce(t, reduction="sum"):
            return t

        @staticmethod
        def gather(t):
            return t

        gather_for_metrics = gather

    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=g.beta, loss_type=g.loss_type, epsilon_low=g.epsilon,
        epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        max_completion_length=g.max_completion_length, accelerator=Acc(), aux_loss_enabled=False,
        _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics={"train": types.SimpleNamespace()})
    fake._metrics = {"train": _Recorder(metrics)}
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros((B, 1), dtype=torch.long), "prompt_mask": torch.ones((B, 1)),
              "completion_ids": torch.zeros((B, T), dtype=torch.long), "completion_mask": torch.tensor(x["mask"]),
              "advantages": torch.tensor(x["adv"]), "num_items_in_batch": torch.tensor(x["mask"].sum())}
    if with_old:
        inputs["old_per_token_logps"] = torch.tensor(x["old"])
    if g.beta:
        inputs["ref_per_token_logps"] = torch.tensor(x["ref"])
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return float(loss.detach()), metrics, logp.grad.numpy()


class _Recorder(dict):
    """Stands in for TRL's metrics dict of lists: keeps the last value appended to each name."""

    def __init__(self, out: dict):
        super().__init__()
        self.out = out

    def __getitem__(self, name):
        out = self.out

        class Slot:
            @staticmethod
            def append(v):
                out[name] = float(v)

        return Slot()


def jaxft_loss(g: GRPOSection, x: dict, with_old: bool) -> tuple[float, dict, np.ndarray]:
    rows = jnp.ones(B)

    def f(logp):
        old = jnp.asarray(x["old"]) if with_old else jax.lax.stop_gradient(logp)
        total, aux = grpo_sums(g, logp, old, jnp.asarray(x["adv"]), jnp.asarray(x["mask"]), rows,
                               jnp.asarray(x["ref"]) if g.beta else None)
        return total / aux["weight"], aux

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["logp"]))
    tokens = float(aux["completion_tokens"])
    metrics = {k: float(v) / tokens for k, v in aux.items() if k.startswith("clip_ratio") or k == "kl"}
    return float(loss), metrics, np.asarray(grad)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [False, True], ids=["mu1", "mu2"])
def test_loss_equals_trl(loss_type, beta, with_old):
    """Loss, its gradient per token and the logged KL / clip ratios equal TRL's for every aggregation, with and
    without the KL term, for one use of a rollout (old = current, detached) and several (stored old log-probs);
    an asymmetric clip (epsilon_high) too."""
    g = GRPOSection(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, max_completion_length=T)
    x = fixed_tensors()
    ref_loss, ref_metrics, ref_grad = trl_loss(g, x, with_old)
    loss, metrics, grad = jaxft_loss(g, x, with_old)
    assert abs(loss - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss)), (loss, ref_loss)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-6)
    assert np.abs(ref_grad).max() > 1e-3    # the comparison sees a gradient
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert abs(metrics[k] - ref_metrics[k]) <= 1e-6, (k, metrics[k], ref_metrics[k])
    if with_old:
        assert ref_metrics["clip_ratio/region_mean"] > 0   # the fixture leaves the clip range somewhere


def trl_advantages(rewards: np.ndarray, G: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """The advantage lines of TRL 1.16's `_generate_and_score_completions` (sum_then_normalize, one reward
    already weighted and summed), with TRL's own `nanstd`."""
    import torch
    from trl.trainer.utils import nanstd

    r = torch.tensor(rewards)
    mean = torch.nanmean(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ("group", "none"):
        std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(r).expand_as(r)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv.numpy(), std.numpy()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    """Group-relative advantages (a group of equal rewards included: zero std, zero advantage) equal TRL's."""
    rng = np.random.default_rng(1)
    G = 4
    rewards = rng.normal(0.5, 1.0, 4 * G).astype(np.float32)
    rewards[G:2 * G] = 0.75                                      # a group with nothing to learn from
    rewards[2 * G:3 * G] = rng.integers(0, 2, G).astype(np.float32)
    adv, std = advantages(rewards, G, scale)
    ref_adv, ref_std = trl_advantages(rewards, G, scale)
    np.testing.assert_allclose(adv, ref_adv, rtol=0, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=0, atol=1e-6)
    assert np.all(adv[G:2 * G] == 0)


def test_train_rows_and_spans():
    """Completions end at their first eos (kept, trained); a row with no eos is truncated at N and, with
    mask_truncated_completions, trains nothing; prompt padding moves to the right."""
    tokens = np.array([[5, 6, 2, 7], [8, 9, 10, 11], [2, 3, 3, 3]], np.int32)
    lengths, truncated = completion_spans(tokens, [2])
    assert lengths.tolist() == [3, 4, 1] and truncated.tolist() == [False, True, False]
    prompt = np.array([[0, 0, 4], [0, 12, 13], [14, 15, 16]], np.int32)
    mask = prompt > 0
    rows = train_rows(prompt, mask, tokens, lengths, ~truncated, pad=0)
    assert rows["input_ids"].tolist() == [[4, 5, 6, 2, 0, 0, 0], [12, 13, 8, 9, 10, 11, 0], [14, 15, 16, 2, 0, 0, 0]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]]
    assert rows["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0, 0], [0] * 7, [0, 0, 0, 1, 0, 0, 0]]


@pytest.mark.parametrize("chunk", [0, 8])
def test_token_logps_equal_transformers(tmp_path, chunk):
    """The per-token log-probs the loss trains on equal those of the `transformers` model run on each row
    alone (no padding), on every completion token, within 1e-5: prompts of different lengths, completions
    ending early, head in chunks or whole."""
    import torch

    import jaxft
    from causal_helpers import load_hf, save_hf

    src = save_hf("llama-gqa-tied", tmp_path / "llama", seed=3)
    rng = np.random.default_rng(0)
    V = 96
    prompt_lengths, completion_lengths, W, N = [5, 2, 7, 3], [6, 1, 4, 6], 8, 6
    prompt = np.zeros((4, W), np.int32)
    for r, n in enumerate(prompt_lengths):
        prompt[r, W - n:] = rng.integers(3, V, n)
    tokens = rng.integers(3, V, (4, N)).astype(np.int32)
    rows = train_rows(prompt, prompt > 0, tokens, np.asarray(completion_lengths), np.ones(4, bool), pad=0)
    model = jaxft.load_model(src, task="causal-lm")
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    ours = np.asarray(jax.jit(lambda b: sequence_token_logps(model, b, chunk))(batch))
    hf = load_hf(src)
    worst = 0.0
    for r in range(4):
        p, n = prompt_lengths[r], completion_lengths[r]
        ids = rows["input_ids"][r, :p + n]
        with torch.no_grad():
            logits = hf(torch.tensor(ids[None], dtype=torch.long)).logits[0].float()
        ref = torch.log_softmax(logits, -1)[torch.arange(p - 1, p + n - 1), torch.tensor(ids[p:p + n])].numpy()
        worst = max(worst, float(np.abs(ours[r, p - 1:p + n - 1] - ref).max()))
    assert worst <= 1e-5, worst
