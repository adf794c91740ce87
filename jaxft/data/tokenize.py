"""Batched tokenization with the model's Hugging Face tokenizer, cached on disk.

The cache key hashes the tokenizer's full definition, `max_length` and the texts themselves, so a
changed tokenizer or data file never reuses stale ids. Sequences are stored ragged (no padding):
padding is decided per batch later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger("jaxft")


@dataclass
class Encoded:
    """Ragged per-token fields: example `i` of field `f` is `fields[f][offsets[i]:offsets[i+1]]`.

    Classification has `input_ids` and `token_type_ids`; SFT has `input_ids`, `loss_mask` and, once
    packed, `segment_ids` (one row then holds several documents).
    """

    fields: dict[str, np.ndarray]
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def ids(self) -> np.ndarray:
        return self.fields["input_ids"]

    def example(self, i: int) -> dict[str, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return {k: v[a:b] for k, v in self.fields.items()}

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, idx) -> "Encoded":
        rows = [self.example(int(i)) for i in idx]
        return Encoded.from_lists({k: [r[k] for r in rows] for k in self.fields})

    @classmethod
    def from_lists(cls, rows: dict[str, list[np.ndarray]]) -> "Encoded":
        lengths = [len(x) for x in next(iter(rows.values()))]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls({k: np.concatenate(v).astype(np.int32) if v else np.zeros(0, np.int32)
                    for k, v in rows.items()}, offsets)

    def save(self, path: Path) -> None:
        """Atomic write: a crash never leaves a half-written cache entry."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, offsets=self.offsets, **self.fields)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Encoded":
        with np.load(path) as z:
            return cls({k: z[k] for k in z.files if k != "offsets"}, z["offsets"])


CACHE_FORMAT = "encoded-v2"  # bump when the stored fields change, so old cache entries are never read


def cache_dir(configured: str | None) -> Path:
    base = configured or os.environ.get("JAXFT_CACHE") or Path.home() / ".cache" / "jaxft"
    return Path(base) / "tokens"


def _fingerprint(tokenizer) -> str:
    """A digest of what the tokenizer does. The fast tokenizer's serialisation also records the truncation and
    padding its last call set, which `encode` itself changes, so those are left out: the same tokenizer gives
    the same key before and after a call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def encode(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
           cache: Path | None, desc: str = "tokenize", chunk: int = 2048) -> Encoded:
    h = hashlib.sha256()
    h.update(CACHE_FORMAT.encode())
    h.update(_fingerprint(tokenizer).encode())
    h.update(str(max_length).encode())
    for i, t in enumerate(texts):
        h.update(t.encode() + b"\0" + (pairs[i].encode() if pairs is not None else b"") + b"\1")
    path = cache / f"{h.hexdigest()[:32]}.npz" if cache is not None else None
    if path is not None and path.exists():
        try:
            return Encoded.load(path)
        except Exception as e:  # noqa: BLE001 - a cut, empty or foreign file: a cache entry, made again
            log.warning("tokenization cache entry %s is unreadable (%s: %s): tokenizing again", path,
                        type(e).__name__, e)

    rows: dict[str, list] = {"input_ids": [], "token_type_ids": []}
    for start in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", leave=False,
                      disable=len(texts) <= chunk):
        out = tokenizer(texts[start:start + chunk], pairs[start:start + chunk] if pairs is not None else None,
                        truncation=True, max_length=max_length, return_token_type_ids=True)
        rows["input_ids"] += [np.asarray(x, np.int32) for x in out["input_ids"]]
        rows["token_type_ids"] += [np.asarray(x, np.int32) for x in out["token_type_ids"]]
    enc = Encoded.from_lists(rows)
    if path is not None:
        enc.save(path)
    return enc
