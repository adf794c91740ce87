"""HF ↔ jaxft weight-name tables: data, not code.

A family declares a list of `Rule`s. Each rule pairs a Hugging Face tensor name pattern with an NNX
parameter path pattern and a `Transform` between the two layouts, e.g.

    Rule("bert.encoder.layer.{i}.attention.self.query.weight",
         "bert.layers.{i}.attention.query.kernel", Linear(n_in=1))

`{i}` (or any `{name}`) matches a decimal index. A placeholder that appears in the HF pattern but not
in the path is a *stacked* axis: all HF tensors for its indices are stacked along a new leading axis of
one jaxft array (DeepSeek's per-expert tensors → one `[E, ...]` array, a scanned model's layers → one
`[L, ...]` array), and split again on export. `within={"i": (start, stop)}` restricts a placeholder to a
range, so layers of two kinds stack into two arrays (DeepSeek's dense first layers and its MoE layers);
a stacked axis then counts from `start`.

`NameTable.sources` matches a checkpoint to the jaxft parameters and raises on any tensor it does not
know and any parameter it could not fill (unless the rule says how to initialise it, as HF does for new
heads); `NameTable.build` reads a parameter, or only a device's slice of it, and raises on any shape that
does not match. `NameTable.export` is the exact inverse: transposes and reshapes only,
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

    def groups(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """For each HF dimension, in HF order, the jaxft dimensions it holds (row-major), e.g. a Linear
        query `[N*H, D]` ↔ `[D, N, H]` is `[(1, 2), (0,)]`. Slice reads (`read_block`) follow from it."""
        return [(d,) for d in range(len(shape))]


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

    def groups(self, shape):
        return [tuple(range(self.n_in, len(shape))), tuple(range(self.n_in))]


@dataclass(frozen=True)
class Flatten(Transform):
    """A tensor stored flat in HF and split in jaxft (e.g. a bias `[N*H]` ↔ `[N, H]`)."""

    def to_hf(self, a):
        return a.reshape(-1)

    def hf_shape(self, shape):
        return (prod(shape),)

    def groups(self, shape):
        return [tuple(range(len(shape)))]


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

    def groups(self, shape):
        return [tuple(range(self.n_in)), tuple(range(self.n_in, len(shape)))]


IDENTITY = Transform()


def read_block(transform: Transform, shape: tuple[int, ...], index: tuple[slice, ...],
               read: Callable[[tuple[slice, ...]], np.ndarray]) -> np.ndarray:
    """`to_jax(full HF tensor)[index]`, reading only a slice of the HF tensor: `read(hf_index)`.

    Each HF dimension holds a row-major group of jaxft dimensions (`Transform.groups`); the slice of the
    group's first dimension is a contiguous range of the HF dimension, which is all that is read, and
    slices of the group's other dimensions are applied after. Reads are exact when only leading
    dimensions of groups are sharded (every rule in `jaxft.parallel.RULES` today: `embed` of `[D, N, H]`,
    `heads` of `[N, H, D]`) and at most a group's inner rows larger otherwise.
    """
    groups = transform.groups(shape)
    spans = [index[d].indices(shape[d])[:2] for d in range(len(shape))]
    hf_index, block_shape, order = [], [], []
    for g in groups:
        lead, inner = g[0], prod(shape[d] for d in g[1:])
        start, stop = spans[lead]
        hf_index.append(slice(start * inner, stop * inner))
        block_shape += [stop - start] + [shape[d] for d in g[1:]]
        order += list(g)
    block = np.asarray(read(tuple(hf_index))).reshape(block_shape).transpose(np.argsort(order))
    firsts = {g[0] for g in groups}
    return block[tuple(slice(None) if d in firsts else slice(*spans[d]) for d in range(len(shape)))]
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
    within: Mapping[str, tuple[int, int]] | None = None  # placeholder → allowed [start, stop)

    def admits(self, idx: Mapping[str, str]) -> bool:
        return all(lo <= int(idx[p]) < hi for p, (lo, hi) in (self.within or {}).items())

    def offset(self, placeholder: str) -> int:
        return (self.within or {}).get(placeholder, (0, 0))[0]

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
            if m and rule.admits(m.groupdict()):
                return rule, m.groupdict()
        return None

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

    def build(self, path: str, names: list[str], shape: tuple[int, ...], index: tuple[slice, ...] | None,
              read: Callable[[str, tuple[slice, ...]], np.ndarray], hf_shape: Callable[[str], tuple[int, ...]],
              locate: Callable[[str], str] | None = None) -> np.ndarray:
        """`array[index]` of the jaxft parameter `path` (shape `shape`; `index` None = all of it) from its
        HF tensors `names` (from `sources`), reading only the slices it needs: `read(name, hf_index)`.

        For a stacked parameter only the tensors in the stacked dimensions' part of `index` are read (a
        host loads only the experts, or layers, its devices hold). Raises naming the tensor and its file
        when a tensor's shape (`hf_shape(name)`) is not the one the model config implies.
        """
        locate = locate or str
        rule, _ = self.rule_for_path(path)
        n_stack = len(rule.stacked)
        index = tuple(index) if index is not None else (slice(None),) * len(shape)
        inner, want = tuple(shape[n_stack:]), rule.transform.hf_shape(tuple(shape[n_stack:]))
        grid = np.empty(len(names), object)
        grid[:] = names
        chosen = grid.reshape(shape[:n_stack])[index[:n_stack]] if n_stack else grid
        parts = []
        for name in chosen.reshape(-1):
            if tuple(hf_shape(name)) != tuple(want):
                raise ValueError(f"tensor {name!r} in {locate(name)} has shape {tuple(hf_shape(name))}, but "
                                 f"the model config implies {tuple(want)}")
            parts.append(read_block(rule.transform, inner, index[n_stack:], lambda hf, n=name: read(n, hf)))
        if not n_stack:
            return parts[0]
        return np.stack(parts).reshape(chosen.shape + parts[0].shape)

    def export(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`{path: array}` → `{hf_name: tensor}` (inverse of `build`)."""
        out = {}
        for path, a in arrays.items():
            rule, idx = self.rule_for_path(path)
            stacked = rule.stacked
            if not stacked:
                out[rule.hf.format(**idx)] = np.ascontiguousarray(rule.transform.to_hf(a))
                continue
            lead = a.shape[: len(stacked)]
            for flat in np.ndindex(*lead):
                names = dict(idx, **{p: str(i + rule.offset(p)) for p, i in zip(stacked, flat)})
                out[rule.hf.format(**names)] = np.ascontiguousarray(rule.transform.to_hf(a[flat]))
        return out
