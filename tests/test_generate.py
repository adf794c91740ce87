"""KV-cached generation vs `transformers` `generate`, `generate_text`, and `generation_config.json` on export."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxft
from jaxft.generate import generate_text, programs
from causal_helpers import VOCAB, load_hf, save_hf


def _hf_generate(ref, ids, mask, n, eos, pad):
    import torch

    out = ref.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out.numpy()[:, ids.shape[1]:]


def _left_padded(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (3, 14)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "mistral-sliding", "gpt2"])
def test_greedy_matches_transformers(tmp_path, variant):
    """Token for token, on a left-padded batch (Mistral: its 16-token window is shorter than the text)."""
    folder = save_hf(variant, tmp_path / "hf")
    ref, model = load_hf(folder), jaxft.load_model(folder, task="causal-lm")
    ids, mask = _left_padded()
    theirs = _hf_generate(ref, ids, mask, 24, eos=[], pad=0)
    ours = jaxft.generate(model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert ours.shape == (3, 24)
    assert len(set(ours.ravel().tolist())) > 5  # not a degenerate repetition
    np.testing.assert_array_equal(ours, theirs)
    # unpadded single prompt, and the same row inside the padded batch, agree
    alone = jaxft.generate(model, ids[2:, 9:], max_new_tokens=24, eos_token_id=[])
    np.testing.assert_array_equal(alone[0], ours[2])


@pytest.mark.parametrize("variant", ["llama-dynamic", "llama-longrope"])
def test_greedy_across_the_rope_switch(tmp_path, variant):
    """Decoding crosses the length (256) where dynamic NTK / LongRoPE change their frequencies; the
    cached keys keep the angles they were written with, in jaxft as in transformers."""
    folder = save_hf(variant, tmp_path / "hf")
    ref, model = load_hf(folder), jaxft.load_model(folder, task="causal-lm")
    ids = np.random.RandomState(2).randint(3, VOCAB, (2, 250)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    theirs = _hf_generate(ref, ids, mask, 12, eos=[], pad=0)
    ours = jaxft.generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    np.testing.assert_array_equal(ours, theirs)


def test_eos_stops_and_pads_like_transformers(tmp_path):
    """Same shape and every token as `transformers`: a row that ends early is padded while the others run
    on to `max_new_tokens`; once every row has ended, both stop at the same length."""
    folder = save_hf("llama-gqa-tied", tmp_path / "hf")
    ref, model = load_hf(folder), jaxft.load_model(folder, task="causal-lm")
    ids, mask = _left_padded()
    n = 12
    free = jaxft.generate(model, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
    # an id row 1 emits first at some step k > 0 and rows 0 and 2 never emit
    k, eos = next((k, int(t)) for k, t in enumerate(free[1]) if k > 0 and t not in free[1, :k]
                  and t not in free[0] and t not in free[2])
    theirs = _hf_generate(ref, ids, mask, n, eos=eos, pad=1)
    ours = jaxft.generate(model, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=1)
    assert theirs.shape == (3, n)  # rows 0 and 2 run on
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    assert ours[1, k] == eos and (ours[1, k + 1:] == 1).all()
    np.testing.assert_array_equal(ours[[0, 2]], free[[0, 2]])

    # every row ends (each at its own step): both stop after the last row's eos
    stops = [eos] + [int(free[r, 0]) for r in (0, 2)]
    theirs = _hf_generate(ref, ids, mask, n, eos=stops, pad=1)
    ours = jaxft.generate(model, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=stops,
                          pad_token_id=1)
    assert theirs.shape[1] < n
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_no_recompilation_and_sampling(tmp_path):
    model = jaxft.load_model(save_hf("gpt2", tmp_path / "hf"), task="causal-lm")
    ids, mask = _left_padded()
    _, _, prefill, decode = programs(model)
    before = (prefill._cache_size(), decode._cache_size())
    for seed in range(3):
        jaxft.generate(model, ids + seed, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    assert (prefill._cache_size(), decode._cache_size()) == (before[0] + 1, before[1] + 1)

    def sample(seed):
        return jaxft.generate(model, ids, attention_mask=mask, max_new_tokens=16, temperature=1.0, seed=seed,
                              eos_token_id=[])

    a, b, c = sample(7), sample(7), sample(8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = jaxft.generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    nucleus = jaxft.generate(model, ids, attention_mask=mask, max_new_tokens=16, temperature=1.0,
                             top_p=1e-6, seed=3, eos_token_id=[])
    np.testing.assert_array_equal(greedy, nucleus)  # a vanishing nucleus keeps only the top token


def _sampling_distribution(logits, temperature, top_p, top_k=0):
    """softmax(logits / temperature), cut to the `top_k` most likely tokens, then to the smallest set of most
    likely tokens whose mass reaches top_p, and renormalised (`transformers`' temperature, top-k and top-p
    warpers, in that order)."""
    z = logits / temperature
    if top_k:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    q = np.exp(z - z.max())
    q /= q.sum()
    order = np.argsort(-q)
    before = np.cumsum(q[order]) - q[order]
    keep = np.zeros(q.shape, bool)
    keep[order[before < top_p]] = True
    q = np.where(keep, q, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.5, 1.0, 0), (2.0, 0.7, 0), (2.0, 1.0, 12), (2.0, 0.9, 30)])
def test_sampling_follows_the_tempered_nucleus_distribution(tmp_path, temperature, top_p, top_k):
    """First sampled token of N copies of one prompt: no token outside the nucleus, and the empirical
    frequencies pass a chi-square test against the distribution computed from `transformers`' logits
    (ignoring the temperature or top-p gives a statistic several times the bar)."""
    folder = save_hf("gpt2", tmp_path / "hf")
    model = jaxft.load_model(folder, task="causal-lm")
    prompt = _left_padded()[0][:1]  # an unpadded row
    import torch

    with torch.no_grad():
        logits = load_hf(folder)(torch.tensor(prompt, dtype=torch.long)).logits[0, -1].double().numpy()
    expected = _sampling_distribution(logits, temperature, top_p, top_k)
    n = 3000
    out = jaxft.generate(model, np.repeat(prompt, n, 0), max_new_tokens=1, temperature=temperature,
                         top_p=top_p, top_k=top_k, seed=0, eos_token_id=[])
    counts = np.bincount(out[:, 0], minlength=VOCAB)
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled outside the nucleus"
    assert 10 < support.sum() < VOCAB or (top_p == 1.0 and not top_k)  # the nucleus cuts, but not to one token
    assert not top_k or support.sum() <= top_k
    chi2 = float((((counts - n * expected) ** 2)[support] / (n * expected[support])).sum())
    df = int(support.sum()) - 1
    print(f"T={temperature} top_p={top_p}: chi2 {chi2:.1f} over {df} degrees of freedom")
    assert chi2 < df + 6 * np.sqrt(2 * df)


def test_bad_generate_input_is_explained(tmp_path):
    model = jaxft.load_model(save_hf("gpt2", tmp_path / "hf"), task="causal-lm")
    ids = np.ones((2, 6), np.int32)
    right = np.array([[1] * 6, [1] * 4 + [0] * 2])
    with pytest.raises(ValueError, match="left padding"):
        jaxft.generate(model, ids, attention_mask=right)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jaxft.generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="n_positions"):
        jaxft.generate(model, ids, max_new_tokens=1020)


def _tiny_tokenizer(folder):
    """A word-level fast tokenizer over `w0 … w{V-1}` with `<s>`=1, `</s>`=2, `<pad>`=0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


def test_generate_text_and_generation_config(tmp_path):
    folder = save_hf("gpt2", tmp_path / "hf")  # bos 1, eos 2
    tok = _tiny_tokenizer(folder)
    ref = load_hf(folder)
    prompt = "w5 w17 w33 w8 w60"
    ids = tok(prompt, return_tensors="np")["input_ids"]
    expected = _hf_generate(ref, ids, np.ones_like(ids), 10, eos=2, pad=0)[0]
    text = generate_text(str(folder), prompt, max_new_tokens=10)
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert text.split()[0].startswith("w")

    # export: the source folder's generation_config.json is kept, pad filled from the tokenizer
    model = jaxft.load_model(folder)
    jaxft.save_pretrained(model, tmp_path / "out", tokenizer=tok)
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1 and gen["pad_token_id"] == 0
    # a chat template's end-of-turn token can be added as a stop id
    jaxft.save_pretrained(model, tmp_path / "chat", generation={"eos_token_id": [2, 7]})
    gen = json.loads((tmp_path / "chat" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 7] and gen["pad_token_id"] == 2
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(str(tmp_path / "chat")).eos_token_id == [2, 7]


def test_generation_config_without_source_file(tmp_path):
    folder = save_hf("llama-mha", tmp_path / "hf", eos_token_id=2, bos_token_id=1)
    (folder / "generation_config.json").unlink()
    jaxft.save_pretrained(jaxft.load_model(folder), tmp_path / "out")
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 2
