"""HF ↔ jaxft weight-name tables: data, not code.

A family declares a list of `Rule`s. Each rule pairs a Hugging Face tensor name pattern with an NNX
parameter path pattern and a `Transform` between the two layouts, e.g.

    Rule("bert.encoder.layer.{i}.attention.self.query.weight",
         "bert.layers.{i}.attention.query.kernel", Linear(n_in=1))

`{i}` (or any `{name}`) matches a decimal index. A placeholder that appears in the HF pattern but not
in the path is a *stacked* axis: all HF tensors for its indices are stacked along a new leading axis of
one jaxft array (DeepSeek's per-expert tensors → one `[E, ...]` array), and split again on export.

`NameTable.import_` turns a checkpoint into jaxft arrays and raises on any tensor it does not know, any
parameter it could not fill (unless the rule says how to initialise it, as HF does for new heads) and
any shape that does not match. `NameTable.export` is the exact inverse: transposes and reshapes only,
so an untouched round trip is bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import prod
from typing import Callable, Iterable, Mapping

import numpy as np


class Transform:
    """Identity: same layout on both sides."""

    def to_jax(self, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return t.reshape(shape)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        return a

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


@dataclass(frozen=True)
class Linear(Transform):
    """torch `Linear.weight` `[out, in]` ↔ einsum kernel whose first `n_in` dims are the input.

    to_jax: `W.T.reshape(shape)`, e.g. query `[N*H, D]` → `[D, N, H]` (n_in=1) or attention output
    `[D, N*H]` → `[N, H, D]` (n_in=2). to_hf flattens back and transposes.
    """

    n_in: int = 1

    def to_jax(self, t, shape):
        return t.T.reshape(shape)

    def to_hf(self, a):
        return a.reshape(prod(a.shape[: self.n_in]), -1).T

    def hf_shape(self, shape):
        return (prod(shape[self.n_in:]), prod(shape[: self.n_in]))


@dataclass(frozen=True)
class Flatten(Transform):
    """A tensor stored flat in HF and split in jaxft (e.g. a bias `[N*H]` ↔ `[N, H]`)."""

    def to_hf(self, a):
        return a.reshape(-1)

    def hf_shape(self, shape):
        return (prod(shape),)


@dataclass(frozen=True)
class Conv1D(Transform):
    """GPT-2 `Conv1D.weight`, stored `[in, out]` (input first, so no transpose) ↔ a kernel whose first
    `n_in` dims are the input: fused `c_attn` `[D, 3·N·H]` ↔ `[D, 3, N, H]` (n_in=1), attention
    `c_proj` `[N·H, D]` ↔ `[N, H, D]` (n_in=2). Only reshapes, so round trips are bit-identical."""

    n_in: int = 1

    def to_hf(self, a):
        return a.reshape(prod(a.shape[: self.n_in]), -1)

    def hf_shape(self, shape):
        return (prod(shape[: self.n_in]), prod(shape[self.n_in:]))


IDENTITY = Transform()
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(pattern: str, idx: Mapping[str, str]) -> str:
    """Substitute the placeholders known in `idx`; leave the others as `{name}`."""
    return _PLACEHOLDER.sub(lambda m: idx.get(m.group(1), m.group(0)), pattern)


def _regex(pattern: str) -> re.Pattern:
    out, last = "", 0
    for m in _PLACEHOLDER.finditer(pattern):
        out += re.escape(pattern[last:m.start()]) + f"(?P<{m.group(1)}>\\d+)"
        last = m.end()
    return re.compile(out + re.escape(pattern[last:]) + "$")


@dataclass(frozen=True)
class Rule:
    hf: str
    path: str
    transform: Transform = IDENTITY
    init: str | None = None  # `normal` | `zeros` | `ones`: may be absent from a checkpoint (a new head)

    @property
    def stacked(self) -> list[str]:
        """Placeholders of the HF name that become a leading stacked axis of the jaxft array."""
        in_path = set(_PLACEHOLDER.findall(self.path))
        return [p for p in _PLACEHOLDER.findall(self.hf) if p not in in_path]


class MissingTensorError(KeyError):
    pass


@dataclass
class NameTable:
    """The rules of one family (for one task), plus HF names that carry no weights (`ignore`)."""

    rules: list[Rule]
    ignore: list[str] = field(default_factory=list)  # regexes, e.g. r".*\.position_ids"

    def __post_init__(self):
        self._hf = [(_regex(r.hf), r) for r in self.rules]
        self._path = [(_regex(r.path), r) for r in self.rules]
        self._ignore = [re.compile(p + "$") for p in self.ignore]

    def rule_for_path(self, path: str) -> tuple[Rule, dict[str, str]]:
        for rx, rule in self._path:
            m = rx.match(path)
            if m:
                return rule, m.groupdict()
        raise KeyError(f"jaxft parameter {path!r} has no rule in the HF name table")

    def match_hf(self, name: str) -> tuple[Rule, dict[str, str]] | None:
        for rx, rule in self._hf:
            m = rx.match(name)
            if m:
                return rule, m.groupdict()
        return None

    def import_(self, hf_names: Iterable[str], read: Callable[[str], np.ndarray],
                shapes: Mapping[str, tuple[int, ...]], where: str = "checkpoint",
                locate: Callable[[str], str] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
        """Checkpoint tensors → `{path: array}` for every path in `shapes` (all in memory at once; see
        `sources` and `build` to go parameter by parameter).

        Returns the arrays and the paths that were absent and must be initialised (rules with `init`).
        Raises naming the tensor for unknown names, unfilled parameters and shape mismatches;
        `locate(name)` names the file holding a tensor (default: `where`).
        """
        found, missing = self.sources(hf_names, shapes, where, locate)
        return {p: self.build(p, names, shapes[p], read, locate) for p, names in found.items()}, missing

    def sources(self, hf_names: Iterable[str], shapes: Mapping[str, tuple[int, ...]], where: str = "checkpoint",
                locate: Callable[[str], str] | None = None) -> tuple[dict[str, list[str]], list[str]]:
        """Match a checkpoint's names to the parameters in `shapes`, reading nothing.

        Returns `{path: [HF names]}` (stacked ones in index order) and the paths that are absent and must be
        initialised. Raises naming the tensor for unknown names, unfilled parameters and stacks of the
        wrong size.
        """
        locate = locate or (lambda _: where)
        by_path: dict[str, list[tuple[tuple[int, ...], str]]] = {}
        for name in hf_names:
            if any(rx.match(name) for rx in self._ignore):
                continue
            hit = self.match_hf(name)
            if hit is None:
                raise KeyError(f"unexpected tensor {name!r} in {locate(name)}: no rule of this model family "
                               f"maps it (is the model_type or task right?)")
            rule, idx = hit
            path = rule.path.format(**idx)
            by_path.setdefault(path, []).append((tuple(int(idx[p]) for p in rule.stacked), name))

        unknown = sorted(set(by_path) - set(shapes))
        if unknown:
            raise KeyError(f"tensor {by_path[unknown[0]][0][1]!r} in {where} maps to {unknown[0]!r}, "
                           f"which this model does not have (check num_hidden_layers and the task)")

        found, missing = {}, []
        for path, shape in shapes.items():
            rule, _ = self.rule_for_path(path)
            if path not in by_path:
                if rule.init is None:
                    raise MissingTensorError(
                        f"{where} has no tensor for {_fill(rule.hf, self.rule_for_path(path)[1])!r} "
                        f"(jaxft parameter {path})")
                missing.append(path)
                continue
            names = [name for _, name in sorted(by_path[path])]
            expected = prod(shape[:len(rule.stacked)])
            if rule.stacked and len(names) != expected:
                raise MissingTensorError(f"{where} has {len(names)} tensors for {rule.hf!r}, expected {expected}")
            found[path] = names
        return found, missing

    def build(self, path: str, names: list[str], shape: tuple[int, ...], read: Callable[[str], np.ndarray],
              locate: Callable[[str], str] | None = None) -> np.ndarray:
        """The jaxft array of `path` (shape `shape`) from its HF tensors `names` (from `sources`).

        For a stacked parameter, `names` may be a contiguous part of the stack and `shape` that part's
        shape: only those tensors are read (a host loads only the experts its devices hold).
        """
        locate = locate or str
        rule, _ = self.rule_for_path(path)
        n_stack = len(rule.stacked)
        inner = tuple(shape[n_stack:])
        want = rule.transform.hf_shape(inner)
        parts = []
        for name in names:
            t = read(name)
            if tuple(t.shape) != tuple(want):
                raise ValueError(f"tensor {name!r} in {locate(name)} has shape {tuple(t.shape)}, but the "
                                 f"model config implies {tuple(want)}")
            parts.append(rule.transform.to_jax(t, inner))
        return np.stack(parts).reshape(shape) if n_stack else parts[0]

    def export(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`{path: array}` → `{hf_name: tensor}` (inverse of `import_`)."""
        out = {}
        for path, a in arrays.items():
            rule, idx = self.rule_for_path(path)
            stacked = rule.stacked
            if not stacked:
                out[rule.hf.format(**idx)] = np.ascontiguousarray(rule.transform.to_hf(a))
                continue
            lead = a.shape[: len(stacked)]
            for flat in np.ndindex(*lead):
                names = dict(idx, **{p: str(i) for p, i in zip(stacked, flat)})
                out[rule.hf.format(**names)] = np.ascontiguousarray(rule.transform.to_hf(a[flat]))
        return out
