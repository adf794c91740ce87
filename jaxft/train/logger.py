"""Run logging: `metrics.jsonl` (appended and flushed per line), TensorBoard events, console lines.

Only process 0 writes. A resumed run appends to the same file, dropping nothing already written and
skipping steps it has already logged, so the file never holds a step twice for the same split. Each line
goes to the file in one `write` on an append-only descriptor, so lines never interleave or split; a last
line a crash cut short (no final newline) is removed on opening, with a warning, so the next line starts
on a line of its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax

log = logging.getLogger("jaxft")


class RunLogger:
    def __init__(self, run_dir: Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.logged: set[tuple[int, str]] = set()
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            repair_last_line(self.path)
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.logged.add((row["step"], row["split"]))
                except (ValueError, KeyError):
                    continue  # a line cut by a crash
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled or (step, split) in self.logged:
            return
        row = {"step": int(step), "split": split, **{k: _py(v) for k, v in metrics.items()}}
        data = (json.dumps(row) + "\n").encode()
        while data:  # one write for any line a regular file takes at once; loop on a partial write
            data = data[os.write(self.fd, data):]
        self.logged.add((step, split))
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            os.close(self.fd)
            self.tb.close()


def repair_last_line(path: Path) -> None:
    """If `path` does not end in a newline, its last line was cut by a crash: cut it off (a line that is still
    whole JSON only gets its newline back), so what is appended next starts on a fresh line."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        start = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else size - len(tail)
        f.seek(start)
        last = f.read()
        try:
            json.loads(last)
            f.write(b"\n")
            return
        except ValueError:
            pass
        f.truncate(start)
        log.warning("%s: removed a last line cut short by an interrupted run (%d bytes: %r)", path, len(last),
                    last[:80].decode(errors="replace"))


def _py(v):
    if hasattr(v, "item"):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v
