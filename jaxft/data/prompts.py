"""Prompt-only rows for online objectives (GRPO), in TRL's format: `{"prompt": str | messages, ...}`.

A text prompt is tokenized as the tokenizer does by default (its BOS included where it adds one); a
conversational prompt (a list of `{role, content}` messages, or its JSON text) is rendered with the chat
template (`data.chat_template`, else the tokenizer's) and its generation prompt, as TRL renders it. Every other
column of the row is kept as it is and reaches the reward functions. A prompt longer than
`train.grpo.max_prompt_length` tokens (default `data.max_length`) or with no token is dropped and counted;
a value that is neither text nor messages is an error naming the row and column.

Batches hold prompt rows left-padded to a bucket width (the longest prompt rounded up to
`data.pad_to_multiple_of`), so the sampler compiles one program per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxft.config import Config
from jaxft.data.batches import Batches
from jaxft.data.preference import _chat, _check_messages
from jaxft.data.sft import SFTReport, _render
from jaxft.data.sources import DataError, require_column
from jaxft.data.tokenize import Encoded


@dataclass
class Prompts:
    """Tokenized prompts (`enc`, `input_ids` only), the prompts as given and the other columns, row-aligned."""

    enc: Encoded
    prompts: list
    columns: dict[str, list]

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx) -> "Prompts":
        idx = [int(i) for i in idx]
        return Prompts(self.enc.take(np.asarray(idx)), [self.prompts[i] for i in idx],
                       {k: [v[i] for i in idx] for k, v in self.columns.items()})


def encode_prompt(tokenizer, value, template: str | None, field: str) -> tuple[list[int], object]:
    """`(ids, prompt as the reward functions see it)` of one prompt value."""
    messages = _chat(value)
    if messages is not None:
        _check_messages(messages, field)
        return _render(tokenizer, messages, template, add_generation_prompt=True), messages
    if not isinstance(value, str):
        raise ValueError(f"{field} must be text or a list of {{role, content}} messages, got "
                         f"{type(value).__name__}")
    return list(tokenizer(value)["input_ids"]), value


def build_prompts(table: dict[str, list], tokenizer, d, split: str, max_prompt_length: int
                  ) -> tuple[Prompts, SFTReport]:
    field = d.prompt_field
    values = require_column(table, field, "data.prompt_field", split)
    report = SFTReport(split, len(values))
    ids, prompts, keep = [], [], []
    for i, value in enumerate(values):
        try:
            row, prompt = encode_prompt(tokenizer, value, d.chat_template, field)
        except ValueError as e:
            if d.on_bad_rows == "error":
                raise DataError(f"data.{split}, row {i + 1}: {e}") from None
            report.drop("bad prompt", i + 1)
            continue
        if not row:
            report.drop("empty prompt", i + 1)
            continue
        if len(row) > max_prompt_length:
            report.drop(f"prompt longer than {max_prompt_length} tokens", i + 1)
            continue
        ids.append(np.asarray(row, np.int32))
        prompts.append(prompt)
        keep.append(i)
    columns = {k: [v[i] for i in keep] for k, v in table.items() if k != field}
    return Prompts(Encoded.from_lists({"input_ids": ids}), prompts, columns), report


class PromptBatches(Batches):
    """Batches of prompts, left-padded: `prompt_ids [B, W]`, `prompt_mask [B, W]` (a padding row attends to its
    last position only), `weights`, `example_ids`. `prompts` holds the rows as given and their columns."""

    def __init__(self, prompts: Prompts, batch_size: int, **kw):
        super().__init__(prompts.enc, None, batch_size, **kw)
        self.prompts = prompts

    def collate(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        B, lengths = self.batch_size, self.enc.lengths()[idx]
        W = self.width(lengths)
        ids = np.full((B, W), self.pad_id, np.int32)
        mask = np.zeros((B, W), bool)
        for r, i in enumerate(idx):
            n = int(lengths[r])
            ids[r, W - n:] = self.enc.example(int(i))["input_ids"]
            mask[r, W - n:] = True
        mask[len(idx):, -1] = True
        return {"prompt_ids": ids, "prompt_mask": mask, **self.row_fields(idx)}


def build_prompt_data(cfg: Config, tokenizer, splits, prompts_per_step: int
                      ) -> tuple[dict[str, PromptBatches], list[SFTReport], str | None]:
    """Every configured split as `PromptBatches` (train: `prompts_per_step` prompts a batch, shuffled and
    seeded; evaluation: the eval batch size counts prompts)."""
    from jaxft.data import encode_chat_splits, pad_token_id

    g = cfg.train.grpo
    limit = g.max_prompt_length or cfg.data.max_length

    def build(table, tok, d, split):
        return build_prompts(table, tok, d, split, limit)

    d, encoded, reports, template = encode_chat_splits(cfg, tokenizer, splits, build, "prompts")
    for split, p in encoded.items():
        if len(p) == 0:
            raise DataError(f"data.{split} has no usable prompt: {next(r for r in reports if r.split == split).summary()}")
    if "train" in encoded and len(encoded["train"]) < prompts_per_step:
        raise DataError(f"data.train has {len(encoded['train'])} usable prompts, fewer than the "
                        f"{prompts_per_step} a step takes (train.batch_size={cfg.train.batch_size} / "
                        f"train.grpo.num_generations={g.num_generations})")
    eval_bs = cfg.train.eval_batch_size or prompts_per_step
    out = {}
    for split, p in encoded.items():
        train = split == "train"
        out[split] = PromptBatches(p, prompts_per_step if train else eval_bs, pad_id=pad_token_id(tokenizer),
                                   max_length=-(-limit // d.pad_to_multiple_of) * d.pad_to_multiple_of,
                                   pad_to_multiple_of=d.pad_to_multiple_of, shuffle=train, seed=cfg.train.seed,
                                   drop_remainder=train)
    return out, reports, template
