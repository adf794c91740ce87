"""KV-cached decoding for causal LMs: `jaxft.generate` and `generate_text`.

Two compiled programs per (batch, prompt length, max_new_tokens) shape:

* **prefill** runs the whole (left-padded) prompt through `model.decode`, filling key/value buffers of a
  fixed size `S = prompt + max_new_tokens`, and picks the first new token;
* **decode** is a `lax.while_loop` of one-token `model.decode` steps over the same buffers. Nothing
  changes shape between tokens, so nothing recompiles; the loop stops early once every row has emitted
  an end-of-sequence token.

Positions follow `transformers` `generate`: `cumsum(attention_mask) - 1`, so a left-padded prompt sees
the positions it would see unpadded. Greedy decoding (`temperature=0`) takes the argmax; otherwise
logits are divided by the temperature, optionally cut to the `top_k` most likely tokens and to the nucleus
of mass `top_p` (in that order, as `transformers`' logits processors), and sampled.

`rollout_program(fn, ...)` is the same prefill + decode as one jitted program over a policy's parameters
(`jaxft.train.step.Functional`): online objectives (GRPO) sample with the current parameters between train
steps, on the training mesh, with one compiled program per prompt shape and nothing recompiled per step.
"""

from __future__ import annotations

import json
import weakref
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


def _eos_from(obj: dict) -> list[int]:
    eos = obj.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def default_eos(model: nnx.Module) -> list[int]:
    """The end-of-sequence ids `transformers` would stop at: the source folder's `generation_config.json`,
    else `config.json`."""
    source = getattr(model, "source_dir", None)
    gen = Path(source) / "generation_config.json" if source else None
    if gen is not None and gen.exists():
        eos = _eos_from(json.loads(gen.read_text()))
        if eos:
            return eos
    return _eos_from(getattr(model, "hf_config", {}))


def _pick(logits: Array, key: Array, temperature: Array, top_p: Array, greedy: bool, nucleus: bool,
          top_k: int = 0) -> Array:
    """Next token `[B]` from `logits [B, V]`: argmax, or a sample from softmax(logits / temperature)
    restricted to the `top_k` most likely tokens (0: all) and then to the smallest set of most likely tokens
    whose probability reaches `top_p`."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if nucleus:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs       # mass of the strictly more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    # inverse CDF: one uniform number per row. jax.random.categorical draws a Gumbel number per vocabulary
    # entry, and on CPU those threefry bits cost more than the model's head (SmolLM2's 49k entries × 64 rows:
    # 102 vs 23 ms per token, measured)
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.random.uniform(key, (logits.shape[0], 1), jnp.float32) * cdf[:, -1:]
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


def _prefill(graphdef, state, ids, mask, positions, key, temperature, top_p, *, max_new_tokens, greedy,
             nucleus, top_k=0):
    return _prefill_on(nnx.merge(graphdef, state), ids, mask, positions, key, temperature, top_p,
                       max_new_tokens=max_new_tokens, greedy=greedy, nucleus=nucleus, top_k=top_k)


def _prefill_on(model, ids, mask, positions, key, temperature, top_p, *, max_new_tokens, greedy, nucleus, top_k):
    cache = model.init_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    logits, cache = model.decode(ids, positions, mask, cache)
    token = _pick(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p, greedy, nucleus, top_k)
    return token, cache


def _decode(graphdef, state, cache, token, position, key, temperature, top_p, eos, pad, *, max_new_tokens,
            greedy, nucleus, top_k=0):
    return _decode_on(nnx.merge(graphdef, state), cache, token, position, key, temperature, top_p, eos, pad,
                      max_new_tokens=max_new_tokens, greedy=greedy, nucleus=nucleus, top_k=top_k)


def _decode_on(model, cache, token, position, key, temperature, top_p, eos, pad, *, max_new_tokens, greedy,
               nucleus, top_k):
    """Tokens `[B, max_new_tokens]` after `token` (the prefill's pick), and how many steps ran."""
    B = token.shape[0]
    out = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, token, position, done, out = carry
        logits, cache = model.decode(token[:, None], position[:, None], jnp.ones((B, 1), bool), cache)
        nxt = _pick(logits[:, -1], jax.random.fold_in(key, i), temperature, top_p, greedy, nucleus, top_k)
        nxt = jnp.where(done, pad, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, cache, nxt, position + 1, done | jnp.isin(nxt, eos), out

    carry = (jnp.ones((), jnp.int32), cache, token, position + 1, done, out)
    steps, *_, out = jax.lax.while_loop(cond, body, carry)
    return out, steps


_STATIC = ("max_new_tokens", "greedy", "nucleus", "top_k")
_PROGRAMS: "weakref.WeakKeyDictionary[nnx.Module, tuple]" = weakref.WeakKeyDictionary()


def programs(model: nnx.Module):
    """`(graphdef, state, prefill, decode)` for `model`: jitted once per model and reused across calls.

    The graph definition is closed over rather than passed as a static argument, since a loaded model's
    graph carries its (unhashable) HF config dict.
    """
    graphdef, state = nnx.split(model)
    cached = _PROGRAMS.get(model)
    if cached is None or cached[0] != graphdef:
        cached = (graphdef,
                  jax.jit(partial(_prefill, graphdef), static_argnames=_STATIC),
                  jax.jit(partial(_decode, graphdef), static_argnames=_STATIC))
        _PROGRAMS[model] = cached
    return graphdef, state, cached[1], cached[2]


def generate(model: nnx.Module, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, attention_mask=None, top_k: int = 0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens after each prompt row; returns only the new ids `[B, n]`.

    `input_ids [B, T]` may be left-padded (`attention_mask` 0 on the left, as `padding_side="left"`
    tokenizers produce). `eos_token_id`: one id or several; `None` takes the model's own (its source
    folder's `generation_config.json`, else `config.json`); `[]` never stops early. A row that has
    finished is filled with `pad_token_id` (default: the first eos id, else 0), and generation stops
    when every row has finished, so `n ≤ max_new_tokens`.
    """
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("generate needs left padding (padding tokens before the prompt): use a tokenizer "
                         "with padding_side='left'")
    if not mask[:, -1].all():
        raise ValueError("every prompt row needs at least one token (attention_mask is all 0 in some row)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature ≥ 0, 0 < top_p ≤ 1 and top_k ≥ 0, got {temperature}, {top_p}, {top_k}")
    eos = default_eos(model) if eos_token_id is None else (
        [int(eos_token_id)] if np.ndim(eos_token_id) == 0 else [int(e) for e in eos_token_id])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)

    _, state, prefill, decode = programs(model)
    key = jax.random.key(seed)
    flags = dict(max_new_tokens=int(max_new_tokens), greedy=temperature == 0.0, nucleus=top_p < 1.0, top_k=int(top_k))
    t, p = jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p)
    token, cache = prefill(state, ids, mask, positions, key, t, p, **flags)
    out, steps = decode(state, cache, token, positions[:, -1], key, t, p,
                         jnp.asarray(eos or [-1], jnp.int32), jnp.int32(pad), **flags)
    return np.asarray(out)[:, : int(steps)]


def left_pad_positions(mask: np.ndarray) -> np.ndarray:
    """Positions of left-padded rows as `transformers` `generate` gives them: `cumsum(mask) − 1`, 0 on padding."""
    return np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def rollout_program(fn, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
    """`run(params, prompt_ids [B, P], prompt_mask [B, P], key, eos [E], pad) -> tokens [B, max_new_tokens]`:
    prefill and decode as one jitted program over `fn`'s parameters (a `Functional`: trainable `params` as an
    argument, its frozen ones closed in through `fn.frozen` at each call), traced with the mesh active so the
    KV cache and activations take the training shardings. `temperature` 0 is greedy. Rows are left-padded
    (`prompt_mask` 0 on the left); a row that has emitted an eos id is filled with `pad`. One compiled program
    per prompt shape `[B, P]`: bucket prompt lengths to keep that a handful. On a mesh the tokens come back
    replicated, so every process reads every row (rewards are scored on the host)."""
    from jaxft import parallel
    from jaxft.compilation import jit_options

    flags = dict(max_new_tokens=int(max_new_tokens), greedy=temperature == 0.0, nucleus=top_p < 1.0, top_k=int(top_k))
    t, p = float(max(temperature, 1e-6)), float(top_p)

    def rollout(params, frozen, ids, mask, key, eos, pad):
        with parallel.activate(fn.mesh):
            model = fn.module(params, frozen)
            positions = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
            temperature, top_p = jnp.float32(t), jnp.float32(p)
            token, cache = _prefill_on(model, ids, mask, positions, key, temperature, top_p, **flags)
            out, _ = _decode_on(model, cache, token, positions[:, -1], key, temperature, top_p, eos, pad, **flags)
            return out

    out = {} if fn.mesh is None else {"out_shardings": parallel.replicated(fn.mesh)}
    jitted = jax.jit(rollout, **out, **jit_options())

    def run(params, ids, mask, key, eos, pad):
        return jitted(params, fn.frozen, ids, mask, key, jnp.asarray(eos or [-1], jnp.int32), jnp.int32(pad))

    run.jitted = jitted
    return run


def load_for_generation(model_dir: str):
    """`(model, tokenizer)` from an HF folder, or from a jaxft run directory (its best, else latest,
    checkpoint, with the chat template the run trained with)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from jaxft.hf.load import load_model, resolve

    if (Path(model_dir) / "config.yaml").exists():
        from jaxft.data import chat_template
        from jaxft.train.run import restore_model, run_config, run_tokenizer

        cfg = run_config(model_dir)
        model, _, _ = restore_model(model_dir, cfg)
        tokenizer = run_tokenizer(model_dir, cfg)
        tokenizer.chat_template = chat_template(cfg) or tokenizer.chat_template
        return model, tokenizer
    folder = resolve(model_dir)
    return load_model(folder, task="causal-lm"), AutoTokenizer.from_pretrained(str(folder))


def generate_text(model_dir: str, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, chat: bool = False) -> str:
    """Load an HF folder or run directory, continue `prompt`, return the new text.

    With `chat`, the prompt is one user turn rendered with the chat template and its generation prompt.
    Stops at the eos ids of the folder's `generation_config.json` (else `config.json`, else the
    tokenizer's eos token); special tokens are left out of the returned text.
    """
    model, tokenizer = load_for_generation(model_dir)
    if chat:
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = np.asarray([list(out["input_ids"] if hasattr(out, "keys") else out)], np.int32)
    else:
        ids = tokenizer(prompt, return_tensors="np")["input_ids"]
    eos = default_eos(model) or ([] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
    new = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   seed=seed, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(new[0], skip_special_tokens=True)
