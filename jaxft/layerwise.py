"""Which transformer block each parameter belongs to: the depth that layer-wise learning-rate decay
(`optim.layer_decay`) and freezing (`model.freeze_embeddings`, `model.freeze_layers`) act on.

Depth, as in BEiT (and ELECTRA without its extra head step), for a model of `L` blocks:

    0          the embeddings: every parameter under an `embeddings` module (BERT's word, position and
               token-type tables and their LayerNorm) and every lookup table (`….embedding`: GPT-2's
               `wte`/`wpe`, the decoders' `embed_tokens`; a tied output head is this table too)
    1 + l      block `l` (0-based) of `….layers.l.…` / `….h.l.…` (looped), or slice `l` of the leading
               axis of a stacked block (`model.scan_layers`), so the depth of a stacked parameter is an
               array `[n, 1, …]`, one value per slice
    L + 1      everything else: final norms, BERT's pooler, the classifier, an untied `lm_head`

With `scan_layers` a model may hold several stacks: DeepSeek's first `first_k_dense_replace` blocks are
`dense_layers`, its MoE blocks `layers`; their blocks are numbered in that order. Names are read from the
parameters' dotted jaxft paths, the same for every family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# `<container>.<index>.` (looped blocks) or `<container>.` followed by a stacked block's own names
_BLOCKS = re.compile(r"(?:^|\.)(dense_layers|layers|h)\.(?:(\d+)\.)?")


def _is_embedding(path: str) -> bool:
    parts = path.split(".")
    return "embeddings" in parts or parts[-1] == "embedding"


@dataclass(frozen=True)
class LayerMap:
    """The blocks of one model: `num_layers` in all, and for each stack (`scan_layers`) the index of its first
    block and its size."""

    num_layers: int
    stacks: dict[str, tuple[int, int]]   # stacked container path -> (first block, number of blocks)

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> "LayerMap":
        """From every parameter's path and shape (trainable and frozen alike: the model's whole depth)."""
        looped, stacked = set(), {}
        for path, shape in shapes.items():
            m = _BLOCKS.search(path)
            if m is None:
                continue
            container = path[:m.end(1)]
            if m.group(2) is not None:
                looped.add((container, int(m.group(2))))
            elif stacked.setdefault(container, shape[0]) != shape[0]:
                raise ValueError(f"{path}: leading (layer) axis {shape[0]} differs from the other parameters of "
                                 f"{container} ({stacked[container]})")
        if looped and stacked:
            raise ValueError(f"a model with looped blocks ({sorted(looped)[0][0]}) and stacked ones "
                             f"({sorted(stacked)[0]}): cannot number its layers")
        if looped:
            containers = {c for c, _ in looped}
            if len(containers) > 1:
                raise ValueError(f"more than one list of blocks ({sorted(containers)}): cannot number its layers")
            return cls(max(i for _, i in looped) + 1, {})
        stacks, first = {}, 0
        for container in sorted(stacked, key=lambda c: (not c.endswith("dense_layers"), c)):
            stacks[container] = (first, stacked[container])
            first += stacked[container]
        return cls(first, stacks)

    def depth(self, path: str, shape: tuple[int, ...]) -> int | np.ndarray:
        """0 (embeddings), 1 + block index, or `num_layers + 1` (head); an int array `[n, 1, …]` (one value
        per slice of the leading axis, broadcastable against the parameter) for a stacked parameter."""
        m = _BLOCKS.search(path)
        if m is not None:
            if m.group(2) is not None:
                return 1 + int(m.group(2))
            first, n = self.stacks[path[:m.end(1)]]
            return (1 + first + np.arange(n)).reshape((n,) + (1,) * (len(shape) - 1))
        return 0 if _is_embedding(path) else self.num_layers + 1

    def decay_scale(self, path: str, shape: tuple[int, ...], decay: float) -> float | np.ndarray:
        """The learning-rate multiplier `decay ** (num_layers + 1 − depth)` (float32 array per slice when stacked)."""
        d = self.depth(path, shape)
        return np.float32(decay) ** (self.num_layers + 1 - np.asarray(d)).astype(np.float32) \
            if isinstance(d, np.ndarray) else float(decay) ** (self.num_layers + 1 - d)

    def frozen(self, path: str, shape: tuple[int, ...], embeddings: bool, first_layers: int) -> bool | np.ndarray:
        """Whether `model.freeze_embeddings` / `model.freeze_layers` hold this parameter fixed: a bool, or for a
        stacked parameter a bool array `[n, 1, …]` per slice."""
        d = self.depth(path, shape)
        if isinstance(d, np.ndarray):
            return (d >= 1) & (d <= first_layers)
        return (d == 0 and embeddings) or 1 <= d <= first_layers
