"""The run directory: the single source of truth of a run.

    RUN_DIR/config.yaml        resolved config           RUN_DIR/labels.json   label map (classification)
    RUN_DIR/metrics.jsonl      one JSON object a line    RUN_DIR/checkpoints/  Orbax
    RUN_DIR/data_report.json   cleaning counts           RUN_DIR/tensorboard/  event files
    RUN_DIR/train.log          the console log

`restore_model` rebuilds a trained model from a run (best checkpoint, else latest) for eval and export.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax

from jaxft.config import Config, load_config
from jaxft.data.clean import LabelMap
from jaxft.train.checkpoint import Checkpoints

log = logging.getLogger("jaxft")


def setup_logging(run_dir: Path | None = None) -> None:
    """Console (INFO) and, on process 0, `RUN_DIR/train.log`."""
    root = logging.getLogger("jaxft")
    root.setLevel(logging.INFO)
    root.propagate = False  # other libraries configure the root logger; print our lines once
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    if run_dir is not None and jax.process_index() == 0:
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(h)
            h.close()
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def write_json(path: Path, obj) -> None:
    if jax.process_index() == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)


def read_labels(run_dir: Path) -> LabelMap | None:
    path = run_dir / "labels.json"
    return LabelMap.from_json(json.loads(path.read_text())) if path.exists() else None


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a jaxft run directory (no config.yaml)")
    return load_config(path)


def checkpoints_of(run_dir: Path, cfg: Config, read_only: bool = False) -> Checkpoints:
    metric, mode = cfg.early_stopping()
    return Checkpoints(run_dir, keep=cfg.checkpoint.keep, metric=metric, mode=mode, read_only=read_only)


def restore_model(run_dir: str | Path, cfg: Config | None = None, mesh=None, step: int | None = None):
    """`(model, label_map, step)` with the parameters of the best (else latest) checkpoint of a run."""
    from jaxft.hf.load import load_model
    from jaxft.train.step import Functional

    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    ckpts = checkpoints_of(run_dir, cfg, read_only=True)
    try:
        step = step if step is not None else (ckpts.best_step() or ckpts.latest_step())
        if step is None:
            raise FileNotFoundError(f"run {run_dir} has no checkpoint yet")
        labels = read_labels(run_dir)
        model = load_model(cfg.model.name_or_path, cfg.model.task,
                           num_labels=len(labels) if labels else cfg.model.num_labels,
                           dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, mesh=mesh,
                           seed=cfg.train.seed, scan_layers=cfg.model.scan_layers)
        fn = Functional(model)
        restored, _ = ckpts.restore(step, {"params": fn.params})
        trained = fn.module(restored["params"])
        trained.hf_config = dict(model.hf_config)
        if labels is not None:
            trained.hf_config["id2label"] = {str(k): v for k, v in labels.id2label.items()}
            trained.hf_config["label2id"] = {v: k for k, v in labels.id2label.items()}
        log.info("restored step %d of %s", step, run_dir)
        return trained, labels, step
    finally:
        ckpts.close()
