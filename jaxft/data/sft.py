"""Supervised fine-tuning data for causal LMs: token ids plus a loss mask, optionally packed.

Three row formats (`data.format`, or `auto` from the columns present):

- `text` (`data.text_field`): every token is trained; EOS is appended.
- `prompt_completion` (`data.prompt_field`, `data.completion_field`): loss on the completion and
  the EOS after it only. TRL's conversational form (both fields lists of `{role, content}` messages, the
  completion the assistant's turns) is rendered with the chat template, loss on the completion's tokens.
  Any other value that is not text is an error naming the row and the column.
- `chat` (`data.messages_field`, a list of `{role, content}`): rendered with the tokenizer's chat
  template (or `data.chat_template`); loss on the assistant turns only, including the end-of-turn
  tokens the template puts after them, so the model learns to stop. Assistant spans come from the
  template's `{% generation %}` markers when it has them; otherwise each assistant turn is located by
  rendering the conversation up to it with the generation prompt and checking that this is a token
  prefix of the conversation including it. A template for which neither works is an error: an
  all-ones mask would silently train on the user's words.

Truncation (`data.truncation`): `right` cuts examples longer than `data.max_length` at the end
(counted); `drop` drops them (counted). An example with no trained token left is dropped (counted).

Packing (`data.packing`) concatenates examples into rows of `data.max_length` tokens, each with its
own `segment_ids` (1, 2, ...), so that attention never crosses documents and positions restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from jaxft.data.sources import DataError
from jaxft.data.tokenize import Encoded


@dataclass
class SFTReport:
    split: str
    rows_in: int
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    examples: dict[str, list[int]] = field(default_factory=dict)

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(row)

    @property
    def rows_out(self) -> int:
        return self.rows_in - sum(self.dropped.values())

    def summary(self) -> str:
        parts = [f"{self.split}: {self.rows_in} rows → {self.rows_out} kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        parts += [f"dropped {n} {reason} (e.g. rows {self.examples[reason]})" for reason, n in self.dropped.items()]
        return "; ".join(parts)


def detect_format(columns, d) -> str:
    if d.format != "auto":
        return d.format
    if d.messages_field in columns:
        return "chat"
    if d.prompt_field in columns and d.completion_field in columns:
        return "prompt_completion"
    if d.text_field in columns:
        return "text"
    raise DataError(f"cannot tell the SFT format from the columns {list(columns)}: expected "
                    f"data.messages_field={d.messages_field!r}, data.prompt_field={d.prompt_field!r} + "
                    f"data.completion_field={d.completion_field!r}, or data.text_field={d.text_field!r}")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos(tokenizer) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token: set one (e.g. in tokenizer_config.json) so the "
                        "model can learn where a completion ends")
    return [tokenizer.eos_token_id]


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    ids = bos + _ids(tokenizer, text) + _eos(tokenizer)
    return ids, [0] * len(bos) + [1] * (len(ids) - len(bos))


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    p = bos + _ids(tokenizer, prompt)
    c = _ids(tokenizer, completion) + _eos(tokenizer)
    return p + c, [0] * len(p) + [1] * len(c)


def _render(tokenizer, messages, template, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, **kw)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def encode_chat(tokenizer, messages: list[dict], template: str | None) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a mask that is 1 exactly on assistant tokens."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {role, content} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn, so there is nothing to train on")
    template = template or tokenizer.chat_template
    if template is None:
        raise DataError("the tokenizer has no chat template: set data.chat_template")
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if not any(mask):
            raise DataError("the chat template's {% generation %} markers enclose no assistant tokens")
        return ids, mask
    full = _render(tokenizer, messages, template)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else []
        upto = _render(tokenizer, messages[:i + 1], template)
        if full[:len(upto)] != upto or upto[:len(before)] != before or len(upto) <= len(before):
            raise DataError(
                "cannot locate the assistant tokens: the chat template does not render conversations as "
                "prefixes of each other (it may rewrite earlier turns). Add {% generation %} markers to the "
                "template (data.chat_template) so assistant-only loss is possible")
        mask[len(before):len(upto)] = [1] * (len(upto) - len(before))
    return full, mask


def encode_chat_completion(tokenizer, prompt: list[dict], completion: list[dict], template: str | None,
                           field: str = "completion") -> tuple[list[int], list[int]]:
    """A conversational prompt–completion row (or one side of a preference pair): the whole conversation
    rendered, loss on the completion's assistant tokens only (the prompt, with its generation prompt, must
    render as a prefix of the whole, else the completion's tokens cannot be told apart)."""
    ids, mask = encode_chat(tokenizer, prompt + completion, template)
    before = _render(tokenizer, prompt, template or tokenizer.chat_template, add_generation_prompt=True)
    if ids[:len(before)] != before:
        raise DataError(f"{field}: the chat template renders the prompt with its generation prompt differently "
                        f"inside the conversation, so the {field} tokens cannot be told apart")
    return ids, [0] * len(before) + list(mask[len(before):])


def _field(table: dict[str, list], column: str, r: int, split: str, messages_ok: bool = False):
    """The value of `column` in row `r`: text, or (where `messages_ok`) a list of {role, content} messages."""
    value = table[column][r]
    if value is None or isinstance(value, str):
        return value
    if messages_ok and isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                        for m in value):
        return value
    what = "text or a list of {role, content} messages" if messages_ok else "text"
    raise DataError(f"data.{split}, row {r + 1}, column {column!r}: expected {what}, got "
                    f"{type(value).__name__} {str(value)[:60]!r}")


def build_sft(table: dict[str, list], tokenizer, d, split: str) -> tuple[Encoded, SFTReport]:
    """Rows → `Encoded` with `input_ids` and `loss_mask` (one example per row, truncated per policy)."""
    fmt = detect_format(table, d)
    n = len(next(iter(table.values()))) if table else 0
    report = SFTReport(split, n)
    rows: dict[str, list] = {"input_ids": [], "loss_mask": []}
    for r in range(n):
        try:
            if fmt == "text":
                text = _field(table, d.text_field, r, split)
                if not text or not text.strip():
                    report.drop("empty text", r + 1)
                    continue
                ids, mask = encode_text(tokenizer, text)
            elif fmt == "prompt_completion":
                prompt = _field(table, d.prompt_field, r, split, messages_ok=True)
                completion = _field(table, d.completion_field, r, split, messages_ok=True)
                if not completion or (isinstance(completion, str) and not completion.strip()):
                    report.drop("empty completion", r + 1)
                    continue
                if isinstance(prompt, list) != isinstance(completion, list):
                    raise DataError(f"data.{split}, row {r + 1}: {d.prompt_field!r} and {d.completion_field!r} "
                                    f"must both be text or both be message lists")
                if isinstance(completion, list):
                    ids, mask = encode_chat_completion(tokenizer, prompt, completion, d.chat_template)
                else:
                    ids, mask = encode_prompt_completion(tokenizer, prompt or "", completion)
            else:
                messages = table[d.messages_field][r]
                if isinstance(messages, str):
                    messages = json.loads(messages)
                ids, mask = encode_chat(tokenizer, messages, d.chat_template)
        except ValueError as e:
            if isinstance(e, DataError) or d.on_bad_rows == "error":
                raise DataError(f"data.{split}, row {r + 1}: {e}") from e
            report.drop(str(e).split(",")[0].split(":")[0], r + 1)
            continue
        truncated = len(ids) > d.max_length
        if truncated:
            if d.truncation == "drop":
                report.drop("longer than max_length", r + 1)
                continue
            ids, mask = ids[:d.max_length], mask[:d.max_length]
        if not any(mask[1:]):  # the first token is never a target
            report.drop("no trained token within max_length (prompt too long)", r + 1)
            continue
        report.truncated += truncated
        rows["input_ids"].append(np.asarray(ids, np.int32))
        rows["loss_mask"].append(np.asarray(mask, np.int32))
    if not rows["input_ids"]:
        raise DataError(f"data.{split} has no usable rows: {report.summary()}")
    return Encoded.from_lists(rows), report


def pack(enc: Encoded, max_length: int, seed: int) -> Encoded:
    """Concatenate examples (in a seeded order) into rows of at most `max_length` tokens.

    Greedy: an example goes into the current row if it fits, else starts a new row. Each example keeps
    its tokens and loss mask and gets `segment_ids` = its 1-based index within the row.
    """
    order = np.random.default_rng(seed).permutation(len(enc))
    rows: dict[str, list] = {"input_ids": [], "loss_mask": [], "segment_ids": []}
    cur: dict[str, list] = {k: [] for k in rows}
    used, seg = 0, 0
    for i in order:
        ex = enc.example(int(i))
        n = len(ex["input_ids"])
        if used + n > max_length and used:
            for k in rows:
                rows[k].append(np.concatenate(cur[k]))
            cur, used, seg = {k: [] for k in rows}, 0, 0
        seg += 1
        cur["input_ids"].append(ex["input_ids"])
        cur["loss_mask"].append(ex["loss_mask"])
        cur["segment_ids"].append(np.full(n, seg, np.int32))
        used += n
    if used:
        for k in rows:
            rows[k].append(np.concatenate(cur[k]))
    return Encoded.from_lists(rows)
