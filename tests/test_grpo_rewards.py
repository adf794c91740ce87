"""GRPO's rewards (`train.grpo.rewards`): the built-in kinds on hand-made completions, user functions called
as TRL calls them, and every way a reward or its config can be wrong, each named."""

from __future__ import annotations

import pytest

from jaxft.config import ConfigError, RewardSpec, load_config
from jaxft.objectives.rewards import RewardError, make_rewards, normalizer, score


def run(specs: list[dict], completions, **columns):
    rewards = make_rewards([RewardSpec(**s) for s in specs], max_completion_length=10)
    columns.setdefault("completion_lengths", [len(c.split()) if isinstance(c, str) else 1 for c in completions])
    return score(rewards, ["p"] * len(completions), completions, columns).tolist()


def test_builtin_rewards():
    completions = ["The answer is 1,234.", "<think>hm</think><answer> 42 </answer>", "forty-two", "  Paris "]
    answers = ["1234", "42", "42", "paris"]
    assert run([{"kind": "exact_match", "normalize": ["last_number"]}], completions, answer=answers) == \
        [[1.0], [1.0], [0.0], [0.0]]
    assert run([{"kind": "exact_match", "normalize": ["strip", "lower"]}], completions, answer=answers) == \
        [[0.0], [0.0], [0.0], [1.0]]
    assert run([{"kind": "contains", "column": "gold"}], completions, gold=["answer", "42", "two", "Par"]) == \
        [[1.0], [1.0], [1.0], [1.0]]
    fmt = r"^<think>.*?</think><answer>.*?</answer>$"
    assert [r[0] for r in run([{"kind": "regex", "pattern": fmt}], completions)] == [0.0, 1.0, 0.0, 0.0]
    # extract: the answer tag's content is compared; no tag, no match
    tagged = run([{"kind": "exact_match", "extract": r"<answer>(.*?)</answer>"}], completions, answer=answers)
    assert tagged == [[0.0], [1.0], [0.0], [0.0]]
    assert [r[0] for r in run([{"kind": "length", "target": 2}], ["a b c d", "a", "a b"])] == pytest.approx([-0.2, -0.1, 0.0])
    assert normalizer(["last_number"])("x = -3.50 and 4.0") == "4" and normalizer(["last_number"])("none") is None


def test_weights_names_and_chat_completions(tmp_path, monkeypatch):
    """A user function gets TRL's arguments: prompts, completions (messages for a conversational prompt) and
    every column by name; each reward keeps its own column in the score."""
    (tmp_path / "my_rewards.py").write_text(
        "def echo_len(prompts, completions, answer, completion_lengths, **kw):\n"
        "    assert isinstance(completions[0], list) and completions[0][0]['role'] == 'assistant'\n"
        "    return [float(len(a)) + n for a, n in zip(answer, completion_lengths)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    chat = [[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": "eight"}]]
    out = run([{"function": "my_rewards:echo_len", "weight": 0.5}, {"kind": "exact_match"}], chat,
              answer=["7", "8"], completion_lengths=[2, 3])
    assert out == [[3.0, 1.0], [4.0, 0.0]]


@pytest.mark.parametrize("body,message", [
    ("    raise KeyError('boom')", "reward 'bad' raised KeyError"),
    ("    return [1.0]", "reward 'bad' returned 1 values for 2 completions"),
    ("    return ['x', 'y']", "reward 'bad' must return a list of numbers"),
    ("    return [float('nan'), 1.0]", "reward 'bad' returned a non-finite value"),
])
def test_a_failing_user_function_is_named(tmp_path, monkeypatch, body, message):
    module = f"bad_rewards_{abs(hash(body))}"   # one module per case: imports are cached by name
    (tmp_path / f"{module}.py").write_text(f"def bad(prompts, completions, **kw):\n{body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=message):
        run([{"function": f"{module}:bad"}], ["a", "b"])


def test_bad_reward_configs_name_the_key(tmp_path, monkeypatch):
    base = ["model.name_or_path=x", "model.task=causal-lm", "data.train=t.jsonl", "train.objective=grpo",
            "train.batch_size=8", "train.grpo.num_generations=4"]
    cases = {
        "needs train.grpo.rewards": [],
        "must be a multiple of train.grpo.num_generations=4": ["train.batch_size=6",
                                                              "train.grpo.rewards=[{kind: length}]"],
        "needs function: 'module:function'": ["train.grpo.rewards=[{kind: function}]"],
        "write 'module:function'": ["train.grpo.rewards=[{function: mymodule}]"],
        "needs pattern": ["train.grpo.rewards=[{kind: regex}]"],
        "not a valid regular expression": ["train.grpo.rewards=[{kind: regex, pattern: '(unclosed'}]"],
        "two rewards are named 'length'": ["train.grpo.rewards=[{kind: length}, {kind: length, target: 3}]"],
        "set model.task=causal-lm": ["model.task=sequence-classification", "train.grpo.rewards=[{kind: length}]"],
    }
    for message, extra in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + extra)
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_here'"):
        make_rewards([RewardSpec(function="no_such_module_here:f")], 8)
    (tmp_path / "has_no_f.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="has_no_f has no function 'f'"):
        make_rewards([RewardSpec(function="has_no_f:f")], 8)
    with pytest.raises(ConfigError, match="reads column 'answer', which the data does not have"):
        run([{"kind": "exact_match"}], ["a"])
