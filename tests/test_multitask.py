"""Multi-task learning (`tasks:`): the task mix measured over many batches against the configured formula,
exact resume of the mixed stream, per-task metrics and their weighted mean in metrics.jsonl, early stopping
on one task's metric, and one Hugging Face folder per task whose logits match jaxft's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from conftest import forward, save_tiny_bert
from jaxft.cli import main
from jaxft.config import ConfigError, load_config
from jaxft.data.batches import Batches
from jaxft.data.multitask import MultiPosition, MultiTaskBatches, task_probabilities
from jaxft.data.tokenize import Encoded


def toy_batches(n: int, task: int, seed: int = 0) -> Batches:
    ids = [np.arange(1, 2 + i % 5, dtype=np.int32) for i in range(n)]
    enc = Encoded.from_lists({"input_ids": ids, "token_type_ids": [np.zeros_like(x) for x in ids]})
    return Batches(enc, {"task": np.full(n, task, np.int32)}, 4, pad_id=0, max_length=8, shuffle=True,
                   seed=seed, drop_remainder=True)


def toy_stream(sizes, probs, seed=0) -> MultiTaskBatches:
    return MultiTaskBatches({f"t{i}": toy_batches(n, i) for i, n in enumerate(sizes)}, probs, seed)


@pytest.mark.parametrize("strategy, temperature, weights", [
    ("proportional", 1.0, None), ("temperature", 2.0, None), ("temperature", 5.0, None), ("fixed", 1.0, [1, 1, 2])])
def test_task_mix_over_many_batches_follows_the_formula(strategy, temperature, weights):
    sizes = [800, 200, 40]
    n = np.asarray(sizes, float)
    expected = {"proportional": n / n.sum(), "temperature": n ** (1 / temperature) / (n ** (1 / temperature)).sum(),
                "fixed": np.asarray(weights or [1, 1, 1], float) / sum(weights or [1, 1, 1])}[strategy]
    probs = task_probabilities(sizes, strategy, temperature, weights)
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    stream, draws = toy_stream(sizes, probs), 6000
    seen = np.bincount([int(stream.next()["task"][0]) for _ in range(draws)], minlength=3) / draws
    tol = 4 * np.sqrt(expected * (1 - expected) / draws)  # four binomial standard deviations
    assert np.all(np.abs(seen - expected) < tol), (strategy, seen, expected)


def test_mixed_stream_resumes_exactly_and_is_seeded():
    sizes, probs = [50, 30, 9], task_probabilities([50, 30, 9], "temperature", 2.0)
    take = lambda s, k: [(int(b["task"][0]), tuple(b["example_ids"])) for b in (s.next() for _ in range(k))]
    straight = take(toy_stream(sizes, probs), 60)
    first = toy_stream(sizes, probs)
    head = take(first, 23)  # several epochs of the smallest task pass in 60 batches
    saved = json.loads(json.dumps(first.position.to_json()))  # as a checkpoint's meta holds it
    resumed = toy_stream(sizes, probs)
    resumed.position = MultiPosition.from_json(saved)
    assert head + take(resumed, 37) == straight
    assert take(toy_stream(sizes, probs, seed=1), 60) != straight


def test_loss_is_each_task_head_alone_weighted():
    """The shared head's loss equals separate heads' cross-entropies (each task's own columns), times its
    loss_weight; no gradient reaches another task's columns."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxft.objectives.multitask import make_multitask_loss

    sizes, lw = [3, 2, 4], [2.0, 1.0, 0.5]
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 9)) * 3, jnp.float32)
    task = np.array([0, 1, 2, 1, 0, 2], np.int32)
    local = np.array([2, 1, 3, 0, 0, 1], np.int32)
    off = np.array([0, 3, 5])
    batch = {"input_ids": None, "attention_mask": None, "token_type_ids": None, "task": jnp.asarray(task),
             "labels": jnp.asarray(local + off[task]), "weights": jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32)}
    loss = make_multitask_loss(sizes, lw)
    total, aux = loss(lambda *a, **k: logits, batch, None)
    want, per = 0.0, np.zeros(3)
    for r in range(5):  # the last row is padding (weight 0)
        t = task[r]
        ce = float(optax.softmax_cross_entropy_with_integer_labels(logits[r, off[t]:off[t] + sizes[t]], local[r]))
        want += lw[t] * ce
        per[t] += ce
    assert float(total) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(np.asarray(aux["task_loss"]), per, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["task_weight"]), [2, 2, 1])
    grad = jax.grad(lambda z: loss(lambda *a, **k: z, batch, None)[0])(logits)
    own = np.zeros((6, 9), bool)
    for r in range(6):
        own[r, off[task[r]]:off[task[r]] + sizes[task[r]]] = True
    assert np.all(np.asarray(grad)[~own] == 0) and np.any(np.asarray(grad)[own] != 0)


WORDS = {"topic": {"sport": "goal match team score", "tech": "chip code data robot", "vote": "law vote senate poll"},
         "senti": {"pos": "great lovely good fine", "neg": "awful bad dull poor"}}


def test_regression_rows_are_squared_error_of_their_column():
    """A regression task's rows: loss (z[o_i] − target)², weighted by loss_weight, no accuracy; the gradient
    reaches only that column. Classification rows in the same batch keep their cross-entropy."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxft.objectives.multitask import make_multitask_loss

    sizes, lw, reg = [3, 1, 2], [1.0, 3.0, 0.5], [False, True, False]
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(5, 6)) * 2, jnp.float32)
    task = np.array([0, 1, 2, 1, 1], np.int32)
    local = np.array([2, 0, 1, 0, 0], np.int32)
    off = np.array([0, 3, 4])
    targets = np.array([0.0, 0.7, 0.0, -1.3, 2.0], np.float32)
    batch = {"input_ids": None, "attention_mask": None, "token_type_ids": None, "task": jnp.asarray(task),
             "labels": jnp.asarray(local + off[task]), "targets": jnp.asarray(targets),
             "weights": jnp.asarray([1, 1, 1, 1, 0], jnp.float32)}
    loss = make_multitask_loss(sizes, lw, reg)
    total, aux = loss(lambda *a, **k: logits, batch, None)
    z = np.asarray(logits)
    se = [(z[r, 3] - targets[r]) ** 2 for r in (1, 3)]
    ce0 = float(optax.softmax_cross_entropy_with_integer_labels(logits[0, 0:3], 2))
    ce2 = float(optax.softmax_cross_entropy_with_integer_labels(logits[2, 4:6], 1))
    assert float(total) == pytest.approx(ce0 + 3.0 * sum(se) + 0.5 * ce2, rel=1e-5)
    np.testing.assert_allclose(np.asarray(aux["task_loss"]), [ce0, sum(se), ce2], rtol=1e-5)
    assert float(aux["task_correct"][1]) == 0.0  # regression rows are never "correct"
    grad = np.asarray(jax.grad(lambda x: loss(lambda *a, **k: x, batch, None)[0])(logits))
    np.testing.assert_allclose(grad[[1, 3]][:, 3], [6.0 * (z[r, 3] - targets[r]) for r in (1, 3)], rtol=1e-5)
    assert np.all(np.delete(grad[[1, 3]], 3, axis=1) == 0) and np.all(grad[4] == 0)  # row 4 is padding


def write_scores(folder, n, seed, bad_rows=0):
    """A regression task: four sentiment words, target (#positive − #negative) / 4; `bad_rows` rows whose
    label is not a number (cleaning drops them)."""
    rng = np.random.default_rng(seed)
    pos, neg = WORDS["senti"]["pos"].split(), WORDS["senti"]["neg"].split()
    lines = ["text\tscore"]
    for i in range(n):
        k = int(rng.integers(0, 5))
        words = rng.choice(pos, k).tolist() + rng.choice(neg, 4 - k).tolist() + ["it"]
        lines.append(" ".join(rng.permutation(words)) + f"\t{(2 * k - 4) / 4:.2f}")
    lines += [f"good it bad\tn/a{i}" for i in range(bad_rows)]
    path = folder / f"score_{seed}.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_task(folder, task, n, seed):
    rng = np.random.default_rng(seed)
    labels = list(WORDS[task])
    lines = ["text\tlabel"]
    for _ in range(n):
        lab = labels[rng.integers(len(labels))]
        words = rng.choice(WORDS[task][lab].split(), 3).tolist() + rng.choice(["the", "a", "it", "so"], 2).tolist()
        lines.append(" ".join(rng.permutation(words)) + f"\t{lab}")
    path = folder / f"{task}_{seed}.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def mt_config(tmp_path, minilm_dir):
    # every weight random (random_init); the classifier's 6 columns are the three tasks' 3 + 2 + 1
    model = save_tiny_bert(tmp_path / "tiny", vocab_size=30522, num_labels=6, random_init=True,
                           tokenizer_from=minilm_dir)
    split = lambda task, seed: {"train": write_task(tmp_path, task, 48, seed), "validation":
                                write_task(tmp_path, task, 10, seed + 1), "test": write_task(tmp_path, task, 9, seed + 2)}
    t, s = split("topic", 0), split("senti", 10)
    r = {"train": write_scores(tmp_path, 40, 20, bad_rows=2), "validation": write_scores(tmp_path, 10, 21),
         "test": write_scores(tmp_path, 11, 22)}
    cfg = tmp_path / "mt.yaml"
    cfg.write_text(f"""
model: {{name_or_path: {model}}}
data: {{max_length: 16, cache_dir: {tmp_path / 'cache'}}}
tasks:
  - {{name: topic, train: {t['train']}, validation: {t['validation']}, test: {t['test']}, loss_weight: 2.0}}
  - {{name: senti, train: {s['train']}, validation: {s['validation']}, test: {s['test']}}}
  - {{name: score, kind: regression, label_field: score, train: {r['train']}, validation: {r['validation']},
      test: {r['test']}, loss_weight: 0.5}}
sampling: {{strategy: temperature, temperature: 2.0}}
optim: {{lr: 1.0e-3}}
train: {{batch_size: 4, steps: 12, eval_every: 4, log_every: 4, early_stopping: {{metric: score/mse}}}}
checkpoint: {{keep: 1}}
output_dir: {tmp_path / 'run'}
""")
    return cfg


@pytest.mark.slow  # one tiny training run: ~30 s, most of it compiling
def test_multitask_run_metrics_early_stopping_and_per_task_export(mt_config, tmp_path, capsys):
    from jaxft.train.loop import train
    from jaxft.train.run import restore_model

    summary = train(load_config(mt_config))
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(sum(r.get(f"{t}/examples", 0) for t in ("topic", "senti", "score")) == 16 for r in train_rows)
    assert any("senti/accuracy" in r for r in train_rows) and any("topic/accuracy" in r for r in train_rows)
    assert any("score/mse" in r for r in train_rows) and not any("score/accuracy" in r for r in train_rows)
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    tests = [r for r in rows if r["split"] == "test"]
    for r in evals + tests:
        assert r["topic/examples"] == 10 or r["topic/examples"] == 9
        assert r["score/examples"] == (11 if r in tests else 10)
        for k in ("accuracy", "macro_f1"):  # the mean weighted by loss_weight (topic 2, senti 1), classification only
            assert r[k] == pytest.approx((2 * r[f"topic/{k}"] + r[f"senti/{k}"]) / 3, abs=3e-6)  # metrics.jsonl rounds to 6 decimals
        assert r["loss"] == pytest.approx((2 * r["topic/loss"] + r["senti/loss"] + 0.5 * r["score/loss"]) / 3.5, abs=3e-6)
        assert r["mse"] == r["score/mse"] == pytest.approx(r["score/loss"], abs=2e-6)
    report = json.loads((run_dir / "data_report.json").read_text())
    score_train = next(x for x in report if x["task"] == "score" and x["split"] == "train")
    assert score_train["dropped"]["label not a finite number"] == 2, score_train
    # early stopping watches one task's metric; an MSE (like a loss) is better lower
    best = min(evals, key=lambda r: (r["score/mse"], -r["step"]))
    assert summary["best"]["best_step"] == best["step"] and summary["best"]["best"] == pytest.approx(best["score/mse"], abs=1e-6)
    tasks = json.loads((run_dir / "tasks.json").read_text())
    assert {k: v["offset"] for k, v in tasks.items()} == {"topic": 0, "senti": 3, "score": 5}

    capsys.readouterr()
    assert main(["eval", str(mt_config), f"checkpoint={run_dir}"]) == 0  # the best checkpoint, as the test split was
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["checkpoint_step"] == best["step"]
    for k in ("accuracy", "topic/accuracy", "senti/loss", "score/mse", "score/spearman"):
        assert evaluated["test"][k] == pytest.approx(summary["test"][k], abs=1e-6)
    # the same tasks listed in another order would read other columns of the shared head: refused, exit 2
    text = mt_config.read_text()
    lines = text.splitlines()
    i = next(j for j, x in enumerate(lines) if "name: topic" in x)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text("\n".join(lines) + "\n")
    assert main(["eval", str(swapped), f"checkpoint={run_dir}"]) == 2
    assert "tasks: are listed as senti, topic, score but" in capsys.readouterr().err

    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0, capsys.readouterr().err
    model, _, step = restore_model(run_dir)
    assert step == best["step"]
    tok = transformers.AutoTokenizer.from_pretrained(out / "topic")
    enc = tok(["goal team the score", "awful dull it", "law code a poll robot"], padding=True, return_tensors="np")
    ours = np.asarray(forward(model, enc["input_ids"], attention_mask=enc["attention_mask"],
                            token_type_ids=enc["token_type_ids"]))
    for name, labels in (("topic", ["sport", "tech", "vote"]), ("senti", ["neg", "pos"])):
        torch_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            out / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch_model.config.id2label == dict(enumerate(labels))
        with torch.no_grad():
            ref = torch_model.eval()(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
        off = tasks[name]["offset"]
        assert ref.shape == (3, len(labels))
        np.testing.assert_allclose(ours[:, off:off + len(labels)], ref, atol=1e-4, rtol=0)

    # the regression task: a 1-output head that transformers scores as regression (MSE against float labels);
    # on the test split its loss is jaxft's score/mse, and Pearson/Spearman are scipy's
    import csv
    import scipy.stats

    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "score").eval()
    assert torch_model.config.problem_type == "regression" and torch_model.config.num_labels == 1
    test_rows = list(csv.DictReader(open(tmp_path / "score_22.tsv"), delimiter="\t"))
    enc = tok([x["text"] for x in test_rows], padding=True, return_tensors="pt")
    gold = torch.tensor([float(x["score"]) for x in test_rows])
    with torch.no_grad():
        result = torch_model(**enc, labels=gold)
    pred = result.logits[:, 0].numpy()
    np.testing.assert_allclose(pred, np.asarray(model(**{k: v.numpy() for k, v in enc.items()}))[:, 5], atol=1e-4)
    assert summary["test"]["score/mse"] == pytest.approx(float(result.loss), abs=1e-4)
    assert summary["test"]["score/pearson"] == pytest.approx(scipy.stats.pearsonr(pred, gold).statistic, abs=1e-4)
    assert summary["test"]["score/spearman"] == pytest.approx(scipy.stats.spearmanr(pred, gold).statistic, abs=1e-4)


@pytest.mark.parametrize("extra, message", [
    ("data: {train: x.tsv}", "data.train and tasks: both set"),
    ("sampling: {strategy: fixed}", "needs tasks[i].weight for every task (missing: ['a'])"),
    ("model: {name_or_path: m, task: causal-lm}", "trains sequence-classification heads"),
    ("tasks: [{name: '..', train: a.tsv}]", "tasks: name '..' names a folder, not a task"),
    ("tasks: [{name: '.', train: a.tsv}]", "tasks: name '.' names a folder, not a task"),
])
def test_bad_task_configs_name_the_key(tmp_path, extra, message):
    import yaml

    tree = {"model": {"name_or_path": "m"}, "tasks": [{"name": "a", "train": "a.tsv"}]}
    tree.update(yaml.safe_load(extra))
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config(base=tree)
