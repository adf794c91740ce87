"""Preference pairs for causal LMs: `{prompt, chosen, rejected}` rows → batches of chosen and rejected sequences.

A row holds one prompt and two responses to it, the preferred (`data.chosen_field`) and the other
(`data.rejected_field`), in one of two formats (as TRL's preference data sets):

- plain text: three strings. Each sequence is `[BOS] prompt response EOS`, as SFT's `prompt_completion`.
- chat: the prompt is a list of `{role, content}` messages; each response is a list of messages (usually
  one assistant turn) or a string, taken as one assistant turn. The conversation `prompt + response` is
  rendered with the chat template (`data.chat_template` or the tokenizer's).

Only response tokens count (`loss_mask` 1): in chat rows, the tokens after the rendered prompt with its
generation prompt (so earlier assistant turns of a multi-turn prompt never count), as the assistant mask of
SFT chat data marks them (end-of-turn tokens included). Truncation follows `data.truncation` for each
sequence; a pair where either side keeps no response token is dropped (counted).

A batch of B pairs holds `chosen_{input_ids, attention_mask, loss_mask}` and `rejected_{...}`, each
`[B, T]` padded to one width, plus `weights [B]` (0 for padding rows) and `example_ids`; the objective
puts both sides through one forward pass (`jaxft.objectives.preference`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from jaxft.config import Config
from jaxft.data.batches import Batches
from jaxft.data.sft import SFTReport, encode_chat_completion, encode_prompt_completion
from jaxft.data.sources import DataError
from jaxft.data.tokenize import Encoded

SIDES = ("chosen", "rejected")


@dataclass
class Pairs:
    """Encoded chosen and rejected sequences, example `i` of each being the two sides of pair `i`."""

    chosen: Encoded
    rejected: Encoded

    def __len__(self) -> int:
        return len(self.chosen)

    def take(self, idx) -> "Pairs":
        return Pairs(self.chosen.take(idx), self.rejected.take(idx))


def _chat(value) -> list | None:
    """A list of messages (or its JSON text) as a list; None for plain text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, list) else None


def _check_messages(messages: list, field: str) -> None:
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"{field} must be a list of {{role, content}} messages or a string")


def encode_pair_side(tokenizer, prompt, response, template: str | None, field: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + response` and a mask that is 1 exactly on the response's tokens.

    Plain text when both are strings; otherwise a conversation (a string prompt is one user turn, a string
    response one assistant turn)."""
    if response is None or (isinstance(response, str) and not response.strip()):
        raise ValueError(f"{field} is empty")
    turns, answer = _chat(prompt), _chat(response)
    if turns is None and answer is None:
        return encode_prompt_completion(tokenizer, str(prompt), str(response))
    turns = [{"role": "user", "content": str(prompt)}] if turns is None else turns
    answer = [{"role": "assistant", "content": str(response)}] if answer is None else answer
    _check_messages(turns, "prompt")
    _check_messages(answer, field)
    if not any(m["role"] == "assistant" for m in answer):
        raise ValueError(f"{field} has no assistant turn")
    return encode_chat_completion(tokenizer, turns, answer, template, field)


def build_pairs(table: dict[str, list], tokenizer, d, split: str) -> tuple[Pairs, SFTReport]:
    """Rows → `Pairs` (one per usable row), truncated or dropped per `data.truncation`; errors name the row."""
    for key, name in (("data.prompt_field", d.prompt_field), ("data.chosen_field", d.chosen_field),
                      ("data.rejected_field", d.rejected_field)):
        if name not in table:
            raise DataError(f"data.{split} has no column {name!r} ({key}); columns: {list(table)}")
    n = len(table[d.prompt_field])
    report = SFTReport(split, n)
    rows: dict[str, dict[str, list]] = {s: {"input_ids": [], "loss_mask": []} for s in SIDES}
    for r in range(n):
        prompt = table[d.prompt_field][r]
        prompt = "" if prompt is None else prompt
        sides, skip = {}, None
        for side, name in zip(SIDES, (d.chosen_field, d.rejected_field)):
            try:
                ids, mask = encode_pair_side(tokenizer, prompt, table[name][r], d.chat_template, name)
            except (ValueError, TypeError) as e:
                if isinstance(e, DataError) or d.on_bad_rows == "error":
                    raise DataError(f"data.{split}, row {r + 1}, field {name!r}: {e}") from e
                skip = f"bad {name}"
                break
            if len(ids) > d.max_length:
                if d.truncation == "drop":
                    skip = "longer than max_length"
                    break
                ids, mask = ids[:d.max_length], mask[:d.max_length]
                report.truncated += 1
            if not any(mask[1:]):  # the first token is never a target
                skip = "no response token within max_length (prompt too long)"
                break
            sides[side] = (ids, mask)
        if skip is not None:
            report.drop(skip, r + 1)
            continue
        for side, (ids, mask) in sides.items():
            rows[side]["input_ids"].append(np.asarray(ids, np.int32))
            rows[side]["loss_mask"].append(np.asarray(mask, np.int32))
    if not rows["chosen"]["input_ids"]:
        raise DataError(f"data.{split} has no usable preference pairs: {report.summary()}")
    return Pairs(Encoded.from_lists(rows["chosen"]), Encoded.from_lists(rows["rejected"])), report


class PairBatches(Batches):
    """`Batches` of pairs: both sides of a pair padded to the batch's common width, keys prefixed by side."""

    def __init__(self, pairs: Pairs, batch_size: int, **kw):
        super().__init__(pairs.chosen, None, batch_size, **kw)
        self.pairs = pairs

    def row_lengths(self) -> np.ndarray:
        return np.maximum(self.pairs.chosen.lengths(), self.pairs.rejected.lengths())

    def collate(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        W = self.width(self.row_lengths()[idx])
        batch = {}
        for side in SIDES:
            batch.update({f"{side}_{k}": v for k, v in self.pad(getattr(self.pairs, side), idx, W).items()})
        batch.update(self.row_fields(idx))
        return batch


def build_preference_data(cfg: Config, tokenizer, splits) -> tuple[dict[str, PairBatches], list[SFTReport], str | None]:
    """Preference splits: encoded pairs, carved (`data.validation_fraction`), batched."""
    from jaxft.data import encode_chat_splits, pad_token_id

    d, encoded, reports, template = encode_chat_splits(cfg, tokenizer, splits, build_pairs, "preference")
    pad_id = pad_token_id(tokenizer)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    out = {split: PairBatches(pairs, cfg.train.batch_size if split == "train" else eval_bs, pad_id=pad_id,
                              max_length=d.max_length, padding=d.padding, pad_to_multiple_of=d.pad_to_multiple_of,
                              shuffle=split == "train", seed=cfg.train.seed, drop_remainder=split == "train",
                              group_by_length=d.group_by_length)
           for split, pairs in encoded.items()}
    return out, reports, template
