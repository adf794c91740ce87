"""Scanned layers (`model.scan_layers`): the blocks' parameters stacked on a leading layer axis and run by
`jax.lax.scan`. A scanned model computes what the looped one does (logits vs `transformers` within the
DESIGN.md 1e-4, vs the loop within 1e-5), exports exactly the checkpoint's tensors, bit for bit, generates the same tokens, trains
to the same losses (dropout included), and its compiled program does not grow with depth.
"""

from __future__ import annotations

import numpy as np
import pytest

from causal_helpers import hf_logits, load_hf, save_hf
from conftest import save_tiny_bert
from test_mesh import save_deepseek

TOL = 1e-4
# a per-layer parameter of each family (DeepSeek: one stack for its dense layers, one for its MoE layers)
NORM = {"llama-gqa-tied": "input_layernorm.scale", "qwen2-bias-sliding": "input_layernorm.scale",
        "gpt2": "ln_1.scale", "deepseek": "input_layernorm.scale", "bert": "attn_norm.scale"}


def _folder(variant: str, tmp_path):
    if variant == "bert":
        return save_tiny_bert(tmp_path / "bert", random_init=True), "sequence-classification"
    if variant == "deepseek":
        return save_deepseek(tmp_path / "deepseek"), "causal-lm"   # dense layer 0, MoE layer 1
    return save_hf(variant, tmp_path / variant), "causal-lm"


def _batch(vocab: int):
    rng = np.random.RandomState(0)
    ids = rng.randint(3, vocab, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "qwen2-bias-sliding", "gpt2", "deepseek", "bert"])
def test_scanned_model_matches_transformers_and_the_loop(tmp_path, variant):
    from safetensors.numpy import load_file

    import jaxft
    from jaxft.hf.export import hf_tensors
    from jaxft.hf.load import flat_params

    folder, task = _folder(variant, tmp_path)
    loop = jaxft.load_model(folder, task=task)
    scan = jaxft.load_model(folder, task=task, scan_layers=True)
    ids, mask = _batch(loop.hf_config["vocab_size"])
    ours, looped = np.asarray(scan(ids, mask)), np.asarray(loop(ids, mask))
    np.testing.assert_allclose(ours, looped, atol=1e-5)
    if task == "causal-lm":
        ref = hf_logits(load_hf(folder), ids, mask)
        np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=TOL)
    else:
        import torch
        import transformers

        bert = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            ref = bert(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
        assert np.abs(ref).max() >= 1.0  # every parameter random: logits of a few units
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)

    # One array per block parameter, the layer axis first and named `layers`.
    params = flat_params(scan)
    assert not any(".0." in p for p in params), sorted(params)
    norms = [p for p in params if p.endswith(NORM[variant])]
    assert all(params[p].get_metadata()["logical_axes"][0] == "layers" for p in norms)
    layers = loop.hf_config.get("num_hidden_layers") or loop.hf_config.get("n_layer")
    assert sum(params[p].shape[0] for p in norms) == layers, norms

    # The export is the checkpoint, bit for bit: the same tensors, none left out.
    source, exported = load_file(str(folder / "model.safetensors")), hf_tensors(scan)
    assert sorted(exported) == sorted(source)
    for name, t in exported.items():
        assert t.dtype == source[name].dtype and np.array_equal(t, source[name]), name
    jaxft.save_pretrained(scan, tmp_path / "out")
    written = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(str(f)))
    assert sorted(written) == sorted(source)
    for name, t in written.items():
        assert t.tobytes() == source[name].tobytes(), name


@pytest.mark.parametrize("variant", ["qwen2-bias-sliding", "deepseek"])
def test_scanned_generation_equals_looped(tmp_path, variant):
    import jaxft

    folder, task = _folder(variant, tmp_path)
    prompts = np.array([[5, 9, 11, 4], [0, 0, 7, 3]], np.int32)   # the second row left-padded
    mask = prompts != 0
    outs = [jaxft.generate(jaxft.load_model(folder, task=task, scan_layers=s), prompts, max_new_tokens=6,
                           attention_mask=mask, eos_token_id=[]) for s in (False, True)]
    assert outs[0].shape == (2, 6)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_scanned_training_equals_looped_with_dropout(tmp_path):
    """A BERT with dropout 0.1 trains 4 steps looped and scanned (with remat): the per-layer dropout keys
    come from the layer index, so both draw the same masks and give the same losses."""
    from mesh_helpers import run_one

    folder = save_tiny_bert(tmp_path / "bert")
    run = {"model": str(folder), "task": "sequence-classification", "mesh": None, "steps": 4, "batch": 6}
    looped = run_one(run)
    scanned = run_one(dict(run, scan_layers=True, remat="full"))
    np.testing.assert_allclose(scanned["losses"], looped["losses"], rtol=1e-5)
    assert scanned["params"]["bert.layers.query.kernel"]["shape"] == [2, 32, 4, 8]


def test_compiled_program_does_not_grow_with_depth(tmp_path):
    """The lowered forward of a scanned model is the same size at 2 and 8 layers; a looped one grows."""
    import jax

    import jaxft

    sizes = {}
    for layers in (2, 8):
        folder = save_hf("llama-mha", tmp_path / f"l{layers}", num_hidden_layers=layers)
        for scan in (False, True):
            model = jaxft.load_model(folder, task="causal-lm", scan_layers=scan)
            ids = np.zeros((2, 8), np.int32)
            sizes[layers, scan] = len(jax.jit(lambda m, x: m(x)).lower(model, ids).as_text())
    assert sizes[8, True] < 1.1 * sizes[2, True], sizes
    assert sizes[8, False] > 2.5 * sizes[2, False], sizes


def test_stacked_layers_must_share_a_structure():
    from flax import nnx

    from jaxft.models.layers import Dense, stack_layers

    rngs = nnx.Rngs(0)
    same = [Dense("BD,DF->BF", (4, 6), ("embed", "mlp"), rngs=rngs) for _ in range(3)]
    assert stack_layers(same).kernel.shape == (3, 4, 6)
    with pytest.raises(ValueError, match="layer 1 differs in structure from layer 0"):
        stack_layers([Dense("BD,DF->BF", (4, 6), ("embed", "mlp"), rngs=rngs),
                      Dense("BD,DF->BF", (4, 6), ("embed", "mlp"), use_bias=False, rngs=rngs)])


@pytest.mark.parametrize("transform, shape", [
    ("Linear(1)", (6, 4, 5)), ("Linear(2)", (4, 5, 6)), ("Conv1D(1)", (6, 3, 4, 5)), ("Conv1D(2)", (4, 5, 6)),
    ("Flatten()", (4, 6)), ("IDENTITY", (6, 8)),
])
def test_slice_reads_equal_the_full_transform(transform, shape):
    """`read_block` reads only a range of the HF tensor and gives `to_jax(full)[index]` for any slices."""
    from jaxft.hf import table

    t = eval(transform, vars(table))
    full = np.arange(np.prod(shape), dtype=np.float32).reshape(t.hf_shape(shape))
    expect = t.to_jax(full, shape)
    rng = np.random.RandomState(0)
    for _ in range(20):
        index = []
        for n in shape:
            a, b = sorted(rng.choice(n + 1, 2, replace=False))
            index.append(slice(int(a), int(b)))
        read = []
        got = table.read_block(t, shape, tuple(index), lambda hf: read.append(hf) or full[hf])
        np.testing.assert_array_equal(got, expect[tuple(index)])
        assert len(read) == 1 and full[read[0]].size <= full.size
