"""Rewards of sampled completions (`train.grpo.rewards`), computed on the host.

Every reward is a function `(prompts, completions, **columns) -> list[float]`, TRL's reward-function
signature: `prompts` as the data gives them (text or a list of messages), `completions` as text (for a
conversational prompt, TRL's `[{"role": "assistant", "content": text}]`), and every other column of the
data, one value per completion. Built in:

    exact_match / contains   1.0 when the completion equals / contains the row's `column` (both sides passed
                             through `extract`, then `normalize`), else 0.0
    regex                    1.0 when `pattern` is found in the completion (re.DOTALL), else 0.0
    length                   −|completion tokens − target| / max_completion_length

and `function: "module:function"`, imported from the working directory or PYTHONPATH. A function that
raises, returns the wrong number of values or a non-number is an error naming it. The total reward of a
completion is Σ weight · reward.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from jaxft.config import ConfigError, RewardSpec

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class RewardError(ValueError):
    """A reward function failed; the message names it (the command exits 2 after checkpointing the run)."""


def completion_text(completion) -> str:
    """The text of a completion: itself, or the content of its (one) assistant message."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def normalizer(steps: list[str]) -> Callable[[str], str | None]:
    """`text -> normalised text`, or None where `last_number` finds no number."""
    def apply(text: str) -> str | None:
        for step in steps:
            if step == "strip":
                text = text.strip()
            elif step == "lower":
                text = text.lower()
            elif step == "last_number":
                found = NUMBER.findall(text)
                if not found:
                    return None
                value = found[-1].replace(",", "")
                text = value.rstrip("0").rstrip(".") if "." in value else value   # 3.50 == 3.5, 4.0 == 4
                text = "0" if text in ("-0", "") else text
        return text
    return apply


def _extract(pattern: re.Pattern | None, text: str) -> str | None:
    if pattern is None:
        return text
    m = pattern.search(text)
    return None if m is None else (m.group(1) if m.groups() else m.group(0))


def answer_reward(spec: RewardSpec) -> Callable:
    """exact_match / contains against the column `spec.column`."""
    norm, pattern = normalizer(spec.normalize), None if spec.extract is None else re.compile(spec.extract, re.DOTALL)
    contains = spec.kind == "contains"

    def reward(prompts, completions, **columns):
        if spec.column not in columns:
            raise ConfigError(f"train.grpo.rewards: {spec.kind} reads column {spec.column!r}, which the data does "
                              f"not have (columns: {sorted(columns)})")
        out = []
        for completion, answer in zip(completions, columns[spec.column]):
            got = _extract(pattern, completion_text(completion))
            got = None if got is None else norm(got)
            want = norm(str(answer))
            hit = got is not None and want is not None and (want in got if contains else got == want)
            out.append(float(hit))
        return out

    return reward


def regex_reward(spec: RewardSpec) -> Callable:
    pattern = re.compile(spec.pattern, re.DOTALL)

    def reward(prompts, completions, **columns):
        return [float(pattern.search(completion_text(c)) is not None) for c in completions]

    return reward


def length_reward(spec: RewardSpec, max_completion_length: int) -> Callable:
    """−|n − target| / max_completion_length over the completion's tokens (`completion_lengths` column)."""
    def reward(prompts, completions, completion_lengths, **columns):
        return [-abs(int(n) - spec.target) / max_completion_length for n in completion_lengths]

    return reward


def import_function(path: str) -> Callable:
    """`module:function` from the working directory or PYTHONPATH."""
    module_name, _, name = path.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module: say which
        raise ConfigError(f"train.grpo.rewards: cannot import {module_name!r} for function={path!r}: "
                          f"{type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"train.grpo.rewards: function={path!r}: {module_name} has no function {name!r}")
    return fn


@dataclass
class Reward:
    name: str
    weight: float
    fn: Callable


def make_rewards(specs: list[RewardSpec], max_completion_length: int) -> list[Reward]:
    out = []
    for spec in specs:
        if spec.kind == "function":
            fn = import_function(spec.function)
            name = spec.name or spec.function.rsplit(":", 1)[-1]
        else:
            fn = {"exact_match": answer_reward, "contains": answer_reward, "regex": regex_reward}.get(spec.kind)
            fn = fn(spec) if fn else length_reward(spec, max_completion_length)
            name = spec.name or spec.kind
        out.append(Reward(name, spec.weight, fn))
    return out


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list]) -> np.ndarray:
    """`[N, len(rewards)]` float32: each reward of each completion. `columns` are the data's other columns,
    one value per completion (plus `completion_lengths`, the completions' token counts)."""
    n = len(completions)
    out = np.zeros((n, len(rewards)), np.float32)
    for j, r in enumerate(rewards):
        try:
            values = r.fn(prompts, completions, **columns)
        except (ConfigError, RewardError):
            raise
        except Exception as e:  # noqa: BLE001 - the user's function failed: name it
            raise RewardError(f"reward {r.name!r} raised {type(e).__name__}: {e}") from e
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {r.name!r} must return a list of numbers, one per completion: {e}") from None
        if len(values) != n:
            raise RewardError(f"reward {r.name!r} returned {len(values)} values for {n} completions")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RewardError(f"reward {r.name!r} returned a non-finite value ({values[bad[0]]}) for completion {bad[0]}")
        out[:, j] = values
    return out
