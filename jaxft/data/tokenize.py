"""Batched tokenization with the model's Hugging Face tokenizer, cached on disk.

The cache key hashes the tokenizer's full definition, `max_length` and the texts themselves, so a
changed tokenizer or data file never reuses stale ids. Sequences are stored ragged (no padding):
padding is decided per batch later.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


@dataclass
class Encoded:
    """Ragged token ids: example `i` is `ids[offsets[i]:offsets[i+1]]` (token types alike)."""

    ids: np.ndarray
    token_types: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.token_types[a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def cache_dir(configured: str | None) -> Path:
    base = configured or os.environ.get("JAXFT_CACHE") or Path.home() / ".cache" / "jaxft"
    return Path(base) / "tokens"


def _fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def encode(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
           cache: Path | None, desc: str = "tokenize", chunk: int = 2048) -> Encoded:
    h = hashlib.sha256()
    h.update(_fingerprint(tokenizer).encode())
    h.update(str(max_length).encode())
    for i, t in enumerate(texts):
        h.update(t.encode() + b"\0" + (pairs[i].encode() if pairs is not None else b"") + b"\1")
    path = cache / f"{h.hexdigest()[:32]}.npz" if cache is not None else None
    if path is not None and path.exists():
        with np.load(path) as z:
            return Encoded(z["ids"], z["token_types"], z["offsets"])

    ids, types, lengths = [], [], []
    for start in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", leave=False,
                      disable=len(texts) <= chunk):
        out = tokenizer(texts[start:start + chunk], pairs[start:start + chunk] if pairs is not None else None,
                        truncation=True, max_length=max_length, return_token_type_ids=True)
        for seq, tt in zip(out["input_ids"], out["token_type_ids"]):
            ids.append(np.asarray(seq, np.int32))
            types.append(np.asarray(tt, np.int32))
            lengths.append(len(seq))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    enc = Encoded(np.concatenate(ids) if ids else np.zeros(0, np.int32),
                  np.concatenate(types) if types else np.zeros(0, np.int32), offsets)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=enc.ids, token_types=enc.token_types, offsets=enc.offsets)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
    return enc
