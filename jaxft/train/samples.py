"""Samples during training (`train.samples`): greedy generations of fixed prompts, so a person sees the model change.

Every `every` steps (and at the last step) each prompt is continued greedily for up to `max_new_tokens` tokens
(`jaxft.generate.generate`) by the model with the current parameters, for any causal-LM objective. Each sample
is one line of `RUN_DIR/samples.jsonl`, `{"step", "prompt", "completion"}`, and a TensorBoard text entry
`samples/<i>` at that step. Only process 0 writes. The generation programs are compiled once: one module is
kept and its parameters are replaced before each sampling (the train step donates the old ones).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxft.config import ConfigError, SamplesSection
from jaxft.generate import default_eos, generate


def read_prompts(s: SamplesSection) -> list[str]:
    if s.prompts:
        return list(s.prompts)
    path = Path(s.file)
    if not path.is_file():
        raise ConfigError(f"train.samples.file: {path} does not exist")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"train.samples.file: {path} holds no prompt (one per line)")
    return prompts


class Sampler:
    def __init__(self, s: SamplesSection, tokenizer, run_dir: Path, base_model, total: int):
        """`base_model`: the loaded model, whose source folder says where generation stops (its eos ids)."""
        self.s, self.tokenizer, self.total = s, tokenizer, total
        self.prompts = read_prompts(s)
        self.path = Path(run_dir) / "samples.jsonl"
        self.eos = default_eos(base_model) or ([] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
        self.model = None

    def due(self, step: int) -> bool:
        return step % self.s.every == 0 or step == self.total

    def sample(self, step: int, fn, params: dict, logger) -> list[dict]:
        """Generate for every prompt with `params` (one prompt at a time: no padding to get wrong); write them."""
        module = fn.module(params)
        if self.model is None:
            self.model = module
        else:  # same graph, new arrays: the compiled generation programs are reused
            nnx.update(self.model, nnx.state(module))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = []
        for prompt in self.prompts:
            ids = np.asarray([self.tokenizer(prompt)["input_ids"]], np.int32)
            new = generate(self.model, ids, max_new_tokens=self.s.max_new_tokens, eos_token_id=self.eos,
                           pad_token_id=pad)
            rows.append({"step": step, "prompt": prompt,
                         "completion": self.tokenizer.decode(new[0].tolist(), skip_special_tokens=True)})
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
            if logger.tb is not None:
                for i, r in enumerate(rows):
                    logger.tb.add_text(f"samples/{i}", f"{r['prompt']} → {r['completion']}", step)
                logger.tb.flush()
        return rows
