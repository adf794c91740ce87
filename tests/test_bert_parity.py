"""BERT parity with `transformers` PyTorch: logits, bit-identical round trips, exports torch loads."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxft
from conftest import forward, random_batch, save_tiny_bert

TOL = 1e-4  # DESIGN.md: float32 logits vs PyTorch


def torch_logits(folder, ids, mask, types, **config):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, **config).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                     token_type_ids=torch.tensor(types).long()).logits.numpy()


VARIANTS = {
    "base": {},
    "one-token-type": dict(type_vocab_size=1),
    "two-labels": dict(num_labels=2),
    "five-labels-relu": dict(num_labels=5, hidden_act="relu"),
    "gelu-new-classifier-dropout": dict(hidden_act="gelu_new", classifier_dropout=0.3),
    "wide-heads": dict(hidden_size=48, num_attention_heads=2, intermediate_size=64, num_hidden_layers=3),
}
OTHER_GELU = {"gelu": "gelu_new", "gelu_new": "gelu"}


def check_logits(ours, ref):
    """Within 1e-4 of logits of order 1 (so a relative error ≤ 1e-4)."""
    assert np.abs(ref).max() >= 1.0, "logits too small for the bar to mean anything"
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_pytorch(tmp_path, name):
    """Every parameter random (logits of order 1). The bar can see the attention mask and exact vs tanh
    GELU: PyTorch itself moves by over 5× the bar when either is changed."""
    kw = VARIANTS[name]
    folder = save_tiny_bert(tmp_path / "hf", seed=len(name), random_init=True, **kw)
    ids, mask, types = random_batch(99, type_vocab=kw.get("type_vocab_size", 2))
    model = jaxft.load_model(folder, task="sequence-classification")
    ours = np.asarray(forward(model, ids, attention_mask=mask, token_type_ids=types))
    ref = torch_logits(folder, ids, mask, types)
    assert ours.shape == ref.shape == (3, kw.get("num_labels", 3))
    check_logits(ours, ref)
    assert np.abs(torch_logits(folder, ids, np.ones_like(mask), types) - ref).max() > 100 * TOL
    act = kw.get("hidden_act", "gelu")
    if act in OTHER_GELU:
        assert np.abs(torch_logits(folder, ids, mask, types, hidden_act=OTHER_GELU[act]) - ref).max() > 5 * TOL


def test_untouched_round_trip_is_bit_identical(tmp_path):
    src = save_tiny_bert(tmp_path / "hf")
    model = jaxft.load_model(src, task="sequence-classification")
    out = jaxft.save_pretrained(model, tmp_path / "out")
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name


def perturb(model, seed=0):
    """Change every parameter a little, as fine-tuning would."""
    from flax import nnx

    rng = np.random.RandomState(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = np.asarray(var.get_value())
        var.set_value(v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype))


def test_modified_export_loads_in_pytorch(tmp_path):
    src = save_tiny_bert(tmp_path / "hf", num_labels=2, random_init=True)
    model = jaxft.load_model(src, task="sequence-classification")
    perturb(model)
    out = jaxft.save_pretrained(model, tmp_path / "out", id2label={0: "neg", 1: "pos"})
    torch_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch_model.config.id2label == {0: "neg", 1: "pos"}
    assert torch_model.config.architectures == ["BertForSequenceClassification"]
    ids, mask, types = random_batch(99, seed=1)
    check_logits(np.asarray(forward(model, ids, attention_mask=mask, token_type_ids=types)),
                 torch_logits(out, ids, mask, types))


def test_real_minilm_encoder_matches_pytorch(minilm_dir, tmp_path, caplog):
    """The packaged all-MiniLM-L6-v2 is a bare `BertModel` (no `bert.` prefix, no classifier)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = tok(["a gripping, beautifully made film", "dull.", "I did not expect to like it, but I did"],
              padding=True, return_tensors="np")
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        model = jaxft.load_model(minilm_dir, task="sequence-classification", num_labels=2)
    assert "classifier.kernel" in caplog.text and "classifier.bias" in caplog.text  # new head reported
    hidden, pooled = model.bert(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    ref = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in enc.items()})
    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=TOL, rtol=0)

    # Full classifier: give PyTorch's the same (random) head through an export, then compare logits.
    exported = jaxft.save_pretrained(model, tmp_path / "cls")
    np.testing.assert_allclose(np.asarray(forward(model, enc["input_ids"], attention_mask=enc["attention_mask"],
                                                token_type_ids=enc["token_type_ids"])),
                               torch_logits(exported, enc["input_ids"], enc["attention_mask"],
                                            enc["token_type_ids"]), atol=TOL, rtol=0)


def test_folder_without_weights_is_a_clear_error(tmp_path):
    src = save_tiny_bert(tmp_path / "hf")
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        jaxft.load_model(src, task="sequence-classification")


def test_unexpected_and_missing_tensors_are_named(tmp_path):
    from safetensors.numpy import save_file

    src = save_tiny_bert(tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    save_file({**tensors, "bert.encoder.layer.0.extra.weight": np.zeros(3, np.float32)},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="bert.encoder.layer.0.extra.weight"):
        jaxft.load_model(src, task="sequence-classification")
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="bert.encoder.layer.1.output.dense.weight"):
        jaxft.load_model(src, task="sequence-classification")


def test_shape_mismatch_names_the_tensor(tmp_path):
    src = save_tiny_bert(tmp_path / "hf")
    cfg = (src / "config.json").read_text().replace('"intermediate_size": 37', '"intermediate_size": 40')
    (src / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"intermediate\.dense\.(weight|bias).*model\.safetensors has shape"):
        jaxft.load_model(src, task="sequence-classification")


def test_unsupported_config_field_raises(tmp_path):
    src = save_tiny_bert(tmp_path / "hf", is_decoder=True)
    with pytest.raises(ValueError, match="is_decoder"):
        jaxft.load_model(src, task="sequence-classification")


def test_sharded_export_with_index_reloads(tmp_path):
    src = save_tiny_bert(tmp_path / "hf")
    model = jaxft.load_model(src, task="sequence-classification")
    out = jaxft.save_pretrained(model, tmp_path / "out", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    again = jaxft.load_model(out, task="sequence-classification")
    ids, mask, types = random_batch(99)
    np.testing.assert_array_equal(np.asarray(forward(model, ids, attention_mask=mask, token_type_ids=types)),
                                  np.asarray(forward(again, ids, attention_mask=mask, token_type_ids=types)))
