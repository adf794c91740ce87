"""Run logging: `metrics.jsonl` (appended and flushed per line), TensorBoard events, console lines.

Only process 0 writes. A resumed run appends to the same file, dropping nothing already written and
skipping steps it has already logged, so the file never holds a step twice for the same split.
"""

from __future__ import annotations

import json
import logging
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
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.logged.add((row["step"], row["split"]))
                except (ValueError, KeyError):
                    continue  # a line cut by a crash
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.file = open(self.path, "a")

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled or (step, split) in self.logged:
            return
        row = {"step": int(step), "split": split, **{k: _py(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.logged.add((step, split))
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _py(v):
    if hasattr(v, "item"):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v
