"""Distillation (`train.objective: distill`): the loss is the formula (numpy, fixed logits), the teacher inside it
sees the batch's padding, token types and packed documents (its logits equal the teacher run on each example or
document alone), the teacher is frozen (no gradient, not in the train state, unchanged), a teacher of another
label set or tokenizer is refused, a tiny student distilled from a larger random teacher through `jaxft train`
gets closer to it, and causal-LM distillation runs through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.config import ConfigError, DistillSection, load_config
from jaxft.objectives.distill import make_causal_lm_distill_loss, make_classification_distill_loss
from jaxft.train.loop import Trainer

from conftest import save_tiny_bert
from sft_helpers import make_tokenizer

D = DistillSection(teacher="unused", temperature=2.5, alpha=0.3)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_distill(s, t, label, T, alpha):
    """One example or token: (α·T²·KL + (1−α)·CE, KL, CE) in float64."""
    log_p, log_q = np_log_softmax(t / T), np_log_softmax(s / T)
    kl = float(np.sum(np.exp(log_p) * (log_p - log_q)))
    ce = float(-np_log_softmax(s)[label])
    return alpha * T * T * kl + (1 - alpha) * ce, kl, ce


def fixed(logits):
    """A stand-in model: returns these logits whatever it is given."""
    return lambda *args, **kwargs: jnp.asarray(logits)


def test_classification_loss_is_the_formula():
    rng = np.random.RandomState(0)
    s, t = rng.randn(4, 3).astype(np.float32) * 3, rng.randn(4, 3).astype(np.float32) * 3
    labels, weights = np.array([0, 2, 1, 1]), np.array([1.0, 1.0, 0.0, 1.0], np.float32)  # row 2 is padding
    batch = {"input_ids": np.zeros((4, 5), np.int32), "attention_mask": np.ones((4, 5), np.int32),
             "token_type_ids": np.zeros((4, 5), np.int32), "labels": labels, "weights": weights}
    loss, aux = make_classification_distill_loss(D)(fixed(s), batch, None, fixed(t))
    want = np.sum([np.array(np_distill(s[i], t[i], labels[i], D.temperature, D.alpha)) * weights[i]
                   for i in range(4)], axis=0)
    np.testing.assert_allclose([float(loss), float(aux["kl"]), float(aux["task_loss"])], want, rtol=1e-6, atol=1e-6)
    assert float(aux["weight"]) == 3.0
    # the teacher's logits get no gradient (they are soft labels), the student's do
    grad_t, grad_s = jax.grad(lambda t_, s_: make_classification_distill_loss(D)(fixed(s_), batch, None,
                                                                               lambda *a, **k: t_)[0],
                              argnums=(0, 1))(jnp.asarray(t), jnp.asarray(s))
    assert float(jnp.max(jnp.abs(grad_t))) == 0.0 and float(jnp.max(jnp.abs(grad_s))) > 0.0


def test_causal_lm_loss_is_the_formula_on_trained_tokens_only():
    rng = np.random.RandomState(1)
    B, T, V = 3, 6, 7
    s, t = rng.randn(B, T, V).astype(np.float32) * 3, rng.randn(B, T, V).astype(np.float32) * 3
    ids = rng.randint(0, V, (B, T)).astype(np.int32)
    attention = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 6], np.int32)             # row 1 padded on the right
    loss_mask = np.array([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], np.int32)  # prompts: 0
    segments = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0], [1] * 6], np.int32)   # row 0: two packed documents
    weights = np.array([1.0, 1.0, 0.5], np.float32)
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "segment_ids": segments,
             "weights": weights}
    loss, aux = make_causal_lm_distill_loss(D)(fixed(s), batch, None, fixed(t))
    want, weight = np.zeros(3), 0.0
    for b in range(B):
        for pos in range(T - 1):  # position pos predicts token pos+1
            nxt = pos + 1
            if loss_mask[b, nxt] and segments[b, nxt] > 0 and segments[b, nxt] == segments[b, pos]:
                want += weights[b] * np.array(np_distill(s[b, pos], t[b, pos], ids[b, nxt], D.temperature, D.alpha))
                weight += weights[b]
    np.testing.assert_allclose([float(loss), float(aux["kl"]), float(aux["task_loss"])], want, rtol=1e-6, atol=1e-6)
    assert float(aux["weight"]) == weight == 3 + 3 + 0.5 * 3  # row 0: 4 trained targets but one crosses documents


def kl_sums_against(teacher_rows, weights, T):
    """Σ w·KL(p_T(teacher) ‖ p_T(student)) over the listed `(row, teacher logits [V], student logits [V])`."""
    total = 0.0
    for b, t_row, s_row in teacher_rows:
        log_p, log_q = np_log_softmax(np.float64(t_row) / T), np_log_softmax(np.float64(s_row) / T)
        total += weights[b] * float(np.sum(np.exp(log_p) * (log_p - log_q)))
    return total


def test_classification_teacher_sees_the_attention_mask_and_token_types(tmp_path):
    """The teacher's logits inside the loss are those of the teacher run on its own on each example, unpadded,
    with its token types: on a batch with padded rows and a second segment (token type 1), the KL sum the loss
    returns equals the KL from per-example teacher logits computed here (a teacher given the input ids alone
    attends to the padding and reads every token as segment A: the KL moves by far more than the bar)."""
    import jaxft
    from conftest import forward, random_batch, save_tiny_bert
    from flax import nnx

    teacher = jaxft.load_model(save_tiny_bert(tmp_path / "teacher", seed=3, random_init=True, num_labels=3),
                               task="sequence-classification")
    ids, mask, types = random_batch(99, batch=4, length=12, seed=2)
    mask[2, 5:] = 0                                    # three padded rows of four, pad tokens not 0
    lengths = mask.sum(1)
    rng = np.random.RandomState(4)
    s = rng.randn(4, 3).astype(np.float32) * 2
    labels, weights = np.array([0, 2, 1, 1]), np.array([1.0, 0.5, 2.0, 1.0], np.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels, "weights": weights}
    loss = nnx.jit(lambda model, batch: make_classification_distill_loss(D)(fixed(s), batch, None, model))
    _, aux = loss(teacher, batch)
    alone = [np.asarray(forward(teacher, ids[b:b + 1, :n], attention_mask=np.ones((1, n), np.int32),
                                token_type_ids=types[b:b + 1, :n]))[0] for b, n in enumerate(lengths)]
    want = kl_sums_against([(b, alone[b], s[b]) for b in range(4)], weights, D.temperature)
    assert want > 0.1
    np.testing.assert_allclose(float(aux["kl"]), want, rtol=1e-4)


def test_causal_lm_teacher_sees_the_padding_and_the_packed_documents(tmp_path):
    """The causal-LM teacher's logits inside the loss are those of the teacher run on each document alone: on a
    packed batch (`segment_ids`: two documents in a row, a right-padded row) and on an unpacked one (the
    attention mask as the single segment, a left-padded row), the KL sum the loss returns equals the KL from
    teacher logits computed here document by document, unpadded (a teacher given the input ids alone lets the
    second document attend to the first and the left-padded row attend to its padding)."""
    import jaxft
    from causal_helpers import save_hf
    from conftest import forward
    from flax import nnx

    teacher = jaxft.load_model(save_hf("llama-gqa-tied", tmp_path / "teacher", seed=5), task="causal-lm")
    rng = np.random.RandomState(6)
    B, T, V = 3, 10, 96
    ids = rng.randint(3, V, (B, T)).astype(np.int32)
    s = rng.randn(B, T, V).astype(np.float32) * 2
    weights = np.array([1.0, 0.5, 2.0], np.float32)
    packed = {"segment_ids": np.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3, [1] * 3 + [2] * 5 + [0] * 2], np.int32)}
    packed["attention_mask"] = (packed["segment_ids"] > 0).astype(np.int32)
    unpacked = {"attention_mask": np.array([[1] * 10, [0] * 4 + [1] * 6, [1] * 8 + [0] * 2], np.int32)}
    loss = nnx.jit(lambda model, batch: make_causal_lm_distill_loss(D)(fixed(s), batch, None, model))
    for extra in (packed, unpacked):
        seg = extra.get("segment_ids", extra["attention_mask"])
        loss_mask = (seg > 0).astype(np.int32)
        loss_mask[:, :2] = 0                                        # a two-token prompt: not trained
        batch = {"input_ids": ids, "loss_mask": loss_mask, "weights": weights, **extra}
        _, aux = loss(teacher, batch)
        # every document on its own row from position 0, right-padded (which a causal model's real tokens never
        # see), in one call
        docs = [(b, np.flatnonzero(seg[b] == d)) for b in range(B) for d in sorted(set(seg[b].tolist()) - {0})]
        alone_ids, alone_mask = np.zeros((len(docs), T), np.int32), np.zeros((len(docs), T), np.int32)
        for i, (b, at) in enumerate(docs):
            alone_ids[i, :len(at)], alone_mask[i, :len(at)] = ids[b, at], 1
        alone = np.asarray(forward(teacher, alone_ids, attention_mask=alone_mask))
        rows = []
        for i, (b, at) in enumerate(docs):
            for k, pos in enumerate(at[:-1]):                       # position pos predicts pos + 1, same document
                if loss_mask[b, pos + 1]:
                    rows.append((b, alone[i, k], s[b, pos]))
        assert len(rows) >= 12
        want = kl_sums_against(rows, weights, D.temperature)
        np.testing.assert_allclose(float(aux["kl"]), want, rtol=1e-4, err_msg=str(sorted(extra)))


ROWS = [("good film", "pos"), ("bad film", "neg"), ("fine acting", "pos"), ("awful plot", "neg"),
        ("great fun", "pos"), ("dull mess", "neg"), ("lovely story", "pos"), ("boring show", "neg")]
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_dir):
    """A 2-layer random student and a larger 3-layer random teacher (other width), one tokenizer, two labels."""
    tmp = tmp_path_factory.mktemp("distill")
    student = save_tiny_bert(tmp / "student", seed=0, tokenizer_from=minilm_dir, random_init=True,
                             vocab_size=30522, num_labels=2, **NO_DROPOUT)
    teacher = save_tiny_bert(tmp / "teacher", seed=1, tokenizer_from=minilm_dir, random_init=True, vocab_size=30522,
                             num_labels=2, hidden_size=48, num_hidden_layers=3, intermediate_size=40, **NO_DROPOUT)
    (tmp / "train.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in ROWS))
    return tmp, student, teacher


def config(tmp, student, teacher, out, *overrides):
    return load_config(None, [f"model.name_or_path={student}", f"data.train={tmp / 'train.tsv'}",
                              f"data.cache_dir={tmp / 'cache'}", "train.objective=distill",
                              f"train.distill.teacher={teacher}", "train.batch_size=4", f"output_dir={out}",
                              *overrides])


def test_other_label_set_or_tokenizer_refused_naming_both(models, tmp_path, minilm_dir):
    tmp, student, _ = models
    three = save_tiny_bert(tmp_path / "three", tokenizer_from=minilm_dir, vocab_size=30522, num_labels=3)
    with pytest.raises(ConfigError, match="labels") as e:
        Trainer(config(tmp, student, three, tmp_path / "a"))
    assert str(three) in str(e.value) and str(student) in str(e.value) and "['neg', 'pos']" in str(e.value)

    words = save_tiny_bert(tmp_path / "words", vocab_size=30522, num_labels=2)
    make_tokenizer().save_pretrained(words)  # same vocab_size, another tokenizer
    with pytest.raises(ConfigError, match="another tokenizer") as e:
        Trainer(config(tmp, student, words, tmp_path / "b"))
    assert str(words) in str(e.value) and str(student) in str(e.value)

    small_vocab = save_tiny_bert(tmp_path / "small_vocab", vocab_size=99, num_labels=2, tokenizer_from=minilm_dir)
    with pytest.raises(ConfigError, match="vocab_size 99") as e:
        Trainer(config(tmp, student, small_vocab, tmp_path / "c"))
    assert str(small_vocab) in str(e.value) and str(student) in str(e.value)


@pytest.mark.slow
def test_distill_pipeline_student_approaches_teacher_which_stays_frozen(models, tmp_path):
    """`train(cfg)` (the Trainer) distils: loss and KL fall; the teacher is in no leaf of the train state (the
    student's parameters and Adam's two moments of each) and its arrays are bitwise unchanged. The finished run
    then serves as a teacher from its run directory."""
    tmp, student, teacher = models
    out = tmp_path / "run"
    trainer = Trainer(config(tmp, student, teacher, out, "train.batch_size=8", "train.steps=24", "train.log_every=4",
                             "optim.lr=2e-3", "optim.warmup_ratio=0", "train.distill.alpha=0.8",
                             "train.distill.temperature=2.0"))
    held = trainer.frozen_model
    before = {k: np.array(v) for k, v in held.frozen.items()}
    student_n = sum(v.size for v in trainer.fn.params.values())
    assert sum(v.size for v in before.values()) > student_n  # a larger teacher: another width and depth
    trainer.run()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 6 and all("kl" in r and "task_loss" in r and "accuracy" in r for r in train), rows
    first, last = train[0], train[-1]
    assert last["kl"] < 0.5 * first["kl"] and last["loss"] < 0.5 * first["loss"], (first, last)

    state_n = sum(x.size for x in jax.tree.leaves(trainer.state))
    assert 3 * student_n <= state_n < 3 * student_n + 100, (state_n, student_n)
    assert set(trainer.state["params"]) == set(trainer.fn.params)
    for k, v in held.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)

    # a jaxft run directory as the teacher: its latest checkpoint (this run's last parameters) and its labels
    again = Trainer(config(tmp, student, out, tmp_path / "run2"))
    assert again.task.teacher.labels == ["neg", "pos"]
    assert set(again.frozen_model.frozen) == set(trainer.state["params"])
    for k, v in again.frozen_model.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(trainer.state["params"][k]), err_msg=k)


def test_make_student_keeps_the_first_layers(tmp_path, minilm_dir):
    """scripts/make_student.py: the student's weights are the source's embeddings and first N layers, with its
    tokenizer (so the distillation tokenizer check passes)."""
    import sys

    from safetensors.numpy import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_student import make_student

    src = save_tiny_bert(tmp_path / "src", num_hidden_layers=3, random_init=True, tokenizer_from=minilm_dir)
    out = make_student(str(src), tmp_path / "student", layers=2)
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    b = {k.removeprefix("bert."): v for k, v in b.items()}
    a = {k.removeprefix("bert."): v for k, v in a.items() if not k.startswith("classifier")}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert set(b) == {k for k in a if "layer.2." not in k}
    for k, v in b.items():
        np.testing.assert_array_equal(v, a[k], err_msg=k)
    assert (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_distillation_composes_with_grad_accumulation_and_exact_resume(models, tmp_path):
    """The distillation loss returns sums like every jaxft loss, so 2 micro-batches of 4 log the same loss, KL,
    task loss and grad norm as one batch of 8 (within 1e-5 relative; the small KL also 1e-5 absolute); a run
    stopped at step 2 and resumed to 4 (the teacher loaded again, the data position restored) ends with the
    same student parameters bit for bit; the student exports as a plain transformers classifier."""
    tmp, student, teacher = models
    common = ("train.batch_size=8", "train.steps=4", "train.log_every=1", "optim.lr=2e-3", "optim.warmup_ratio=0",
              "train.distill.alpha=0.6")

    def run(out, *extra):
        trainer = Trainer(config(tmp, student, teacher, out, *common, *extra))
        trainer.run()
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return trainer, [r for r in rows if r["split"] == "train"]

    straight, rows = run(tmp_path / "straight")
    _, accum_rows = run(tmp_path / "accum", "train.grad_accum=2")
    keys = ("loss", "kl", "task_loss", "grad_norm")
    assert len(rows) == 4 and len(accum_rows) == 4
    # float32 sums in another order: 1e-5 of each value, and 1e-5 absolute for the KL, a small difference of
    # O(1) log-probabilities (0.04 here); a per-micro-batch mean is off by ~1e-2 and fails either way
    for a, b in zip(rows, accum_rows):
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5 if k == "kl" else 0, err_msg=k)

    # the student exports as a plain transformers classifier (no teacher in it): logits equal jaxft's
    import torch
    from transformers import AutoModelForSequenceClassification

    from jaxft.cli import main
    from jaxft.train.run import restore_run

    assert main(["export", str(tmp_path / "straight"), str(tmp_path / "export")]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    ids = np.random.RandomState(0).randint(1000, 20000, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
    got = np.asarray(restore_run(tmp_path / "straight").model(ids, attention_mask=mask, token_type_ids=0 * ids))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert sum(q.numel() for q in hf.parameters()) == sum(v.size for v in straight.fn.params.values())

    run(tmp_path / "resumed", "train.stop_at_step=2")
    resumed, resumed_rows = run(tmp_path / "resumed")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4] and resumed_rows[-1]["loss"] == rows[-1]["loss"]
    for k, v in straight.state["params"].items():
        np.testing.assert_array_equal(np.asarray(resumed.state["params"][k]), np.asarray(v), err_msg=k)


def test_causal_lm_distillation_through_the_cli(tmp_path, capsys):
    """`jaxft train` with train.objective=distill on a causal LM (a tiny random Llama student, a wider random
    Llama teacher with the same tokenizer, packed chat rows): exits 0 and logs the KL and the task loss at each
    train log and in the evaluation (with the perplexity)."""
    from jaxft.cli import main
    from sft_helpers import save_tiny_llama

    student = save_tiny_llama(tmp_path / "student", seed=0, hidden_size=32, intermediate_size=48)
    teacher = save_tiny_llama(tmp_path / "teacher", seed=1)
    rows = [{"messages": [{"role": "user", "content": f"map w{i}"}, {"role": "assistant", "content": f"d{i}"}]}
            for i in range(16)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code = main(["train", str(Path(__file__).resolve().parents[1] / "configs" / "sft_tiny.yaml"),
                 f"model.name_or_path={student}", f"data.train={tmp_path / 'rows.jsonl'}",
                 "data.validation_fraction=0.25", f"data.cache_dir={tmp_path / 'cache'}", "train.objective=distill",
                 f"train.distill.teacher={teacher}", "train.batch_size=2", "train.steps=4", "train.log_every=2",
                 "train.eval_every=4", f"output_dir={run}"])
    assert code == 0, capsys.readouterr().err
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["split"] == "train"]
    evals = [r for r in logged if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4] and len(evals) >= 1, logged
    for r in train + evals:
        assert np.isfinite(r["kl"]) and r["kl"] > 0 and np.isfinite(r["task_loss"]) and r["task_loss"] > 0, r
    assert "perplexity" in evals[-1]
