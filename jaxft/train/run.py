"""The run directory: the single source of truth of a run.

    RUN_DIR/config.yaml        resolved config           RUN_DIR/labels.json   label map (classification)
    RUN_DIR/metrics.jsonl      one JSON object a line    RUN_DIR/checkpoints/  Orbax
    RUN_DIR/data_report.json   cleaning counts           RUN_DIR/tensorboard/  event files
    RUN_DIR/train.log          the console log           RUN_DIR/.lock         held by a running `jaxft train`

`restore_model` rebuilds a trained model from a run (best checkpoint, else latest) for eval and export.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from jaxft.config import Config, load_config
from jaxft.data.clean import LabelMap
from jaxft.train.checkpoint import Checkpoints

log = logging.getLogger("jaxft")


class _Pending(logging.Handler):
    """Holds a starting run's log records until `start_run_log` writes them to `train.log`."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def setup_logging(run_dir: Path | None = None, defer: bool = False) -> None:
    """Console (INFO) and, on process 0, `RUN_DIR/train.log`. With `defer`, the lines for `train.log` are
    held until `start_run_log(run_dir)`: a command refused while it starts leaves the run's log as it was."""
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
        for h in [h for h in root.handlers if isinstance(h, (logging.FileHandler, _Pending))]:
            root.removeHandler(h)
            h.close()
        if defer:
            root.addHandler(_Pending())
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def start_run_log(run_dir: Path) -> None:
    """Open `RUN_DIR/train.log` (process 0) and write the lines held since `setup_logging(defer=True)`."""
    root = logging.getLogger("jaxft")
    pending = [h for h in root.handlers if isinstance(h, _Pending)]
    setup_logging(run_dir)
    fh = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    for h in pending:
        for record in h.records if fh is not None else ():
            fh.handle(record)
        h.close()


def write_json(path: Path, obj) -> None:
    if jax.process_index() == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)


def read_labels(run_dir: Path) -> LabelMap | None:
    path = run_dir / "labels.json"
    if not path.exists():
        return None
    try:
        return LabelMap.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a label map written by jaxft ({type(e).__name__}: {e})") from None


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a jaxft run directory (no config.yaml)")
    return load_config(path)


# what a run that got past its start has written (a run refused while starting writes none of them)
RUN_FILES = ("config.yaml", "metrics.jsonl", "train.log", "batches.jsonl")


def run_contents(run_dir: Path) -> list[str]:
    """What of a run `run_dir` already holds (its files, and `checkpoints/` when it has any)."""
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    ckpts = run_dir / "checkpoints"
    return held + (["checkpoints/"] if ckpts.is_dir() and any(ckpts.iterdir()) else [])


class RunLocked(ValueError):
    """Another `jaxft train` holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory (`RUN_DIR/.lock`, `fcntl.flock`) while one `jaxft train` writes it.

    The holder writes its pid, host, start time and command into the file, and empties it on release; a
    `.lock` that is a symbolic link is refused, never followed. The kernel drops the lock of a process that
    dies, so a crash never leaves the directory locked. On a file system without locks (some network
    mounts) it warns and goes on unlocked.
    """

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        import fcntl

        self.fd = None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / self.NAME
        try:  # never through a link: writing the lock would truncate the file it points to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if not self.path.is_symlink():
                raise
            raise ValueError(f"output_dir {run_dir}: the lock file {self.path} is a symbolic link (to "
                             f"{os.readlink(self.path)}); jaxft never writes through links in a run directory: "
                             f"remove the link") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on host {h['host']}, started {h['started']}: {h['command']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that is starting"
            raise RunLocked(f"output_dir {run_dir} is in use by another jaxft train ({who}); wait for it to end "
                            f"or use another output_dir ({self.path} is locked)") from None
        except OSError as e:
            os.close(fd)
            log.warning("cannot lock %s (%s): make sure no other jaxft train writes to %s", self.path, e, run_dir)
            return
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["jaxft", *sys.argv[1:]]) if sys.argv else "jaxft train"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@contextmanager
def claim_run_dir(cfg: Config):
    """Hold `output_dir` for one `jaxft train` (process 0; call after `jax.distributed` is initialised).

    Refuses, before writing anything: an `output_dir` that is a file; `checkpoint.resume=false` into a
    directory that holds a run (unless `checkpoint.overwrite=move`, which renames the old run to
    `OUTPUT_DIR.old-TIMESTAMP` first); a directory another `jaxft train` holds (`RunLock`). On resume, step
    folders Orbax never committed (`checkpoint.incomplete_steps`) move to `RUN_DIR/incomplete_checkpoints/`
    with a warning, so training resumes from the newest complete checkpoint and can save that step again.
    """
    from jaxft.config import ConfigError
    from jaxft.hf.files import file_in_the_way
    from jaxft.train.checkpoint import incomplete_steps

    run_dir = Path(cfg.output_dir)
    if jax.process_index() != 0:
        yield
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file, not a folder")
    blocker = file_in_the_way(run_dir)
    if blocker is not None:
        raise ConfigError(f"output_dir {run_dir}: {blocker} is a file, not a folder")
    held = run_contents(run_dir) if run_dir.is_dir() else []
    if held and not cfg.checkpoint.resume:
        if cfg.checkpoint.overwrite != "move":
            raise ConfigError(
                f"output_dir {run_dir} holds a run ({', '.join(held)}) and checkpoint.resume=false: starting over "
                f"there would delete its checkpoints and mix the two runs' logs. Use another output_dir, drop "
                f"checkpoint.resume=false to resume it, or pass checkpoint.overwrite=move to move it aside")
        old = RunLock(run_dir)  # never move a run another process is writing
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        while aside.exists():
            aside = aside.with_name(aside.name + "-1")
        os.rename(run_dir, aside)
        old.release()
        setup_logging()
        log.warning("checkpoint.overwrite=move: moved the earlier run in %s to %s", run_dir, aside)
    lock = RunLock(run_dir)
    try:
        if cfg.checkpoint.resume:
            for step_dir in incomplete_steps(run_dir):
                dest = run_dir / "incomplete_checkpoints" / step_dir.name
                while dest.exists():
                    dest = dest.with_name(dest.name + "-1")
                dest.parent.mkdir(exist_ok=True)
                os.rename(step_dir, dest)
                setup_logging()
                log.warning("%s was never committed (no _CHECKPOINT_METADATA): moved to %s; resuming from the "
                            "newest complete checkpoint", step_dir, dest)
        yield
    finally:
        lock.release()
        root = logging.getLogger("jaxft")  # lines held for a train.log that a refused start never opened
        for h in [h for h in root.handlers if isinstance(h, _Pending)]:
            root.removeHandler(h)


def checkpoints_of(run_dir: Path, cfg: Config, read_only: bool = False) -> Checkpoints:

    metric, mode = cfg.early_stopping()
    return Checkpoints(run_dir, keep=cfg.checkpoint.keep, metric=metric, mode=mode, read_only=read_only)


def run_tokenizer(run_dir: str | Path, cfg: Config):
    """The tokenizer a run trained with: the copy saved in `RUN_DIR/tokenizer` (so a base folder or Hub repo
    that changed since does not change what eval, export and generate tokenize), else the base's."""
    from transformers import AutoTokenizer

    from jaxft.hf.load import resolve

    saved = Path(run_dir) / "tokenizer"
    return AutoTokenizer.from_pretrained(str(saved if saved.is_dir() else resolve(cfg.model.name_or_path)))


def restore_model(run_dir: str | Path, cfg: Config | None = None, mesh=None, step: int | None = None):
    """`(model, label_map, step)` with the parameters of the best (else latest) checkpoint of a run."""
    r = restore_run(run_dir, cfg, mesh, step)
    return r.model, r.labels, r.step


@dataclass
class Restored:
    model: Any                 # the trained model (a LoRA run's with its adapters attached)
    labels: LabelMap | None
    step: int
    adapters: Any = None       # `jaxft.lora.Adapters` of a LoRA run


def restore_run(run_dir: str | Path, cfg: Config | None = None, mesh=None, step: int | None = None) -> Restored:
    """A run's trained model from its best (else latest) checkpoint: the base from `model.name_or_path`
    (checked against the base a LoRA run recorded), the run's adapters, and the checkpoint's parameters."""
    from jaxft.hf.load import resolve
    from jaxft.train.model import check_base, load_run_model
    from jaxft.train.step import Functional

    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    ckpts = checkpoints_of(run_dir, cfg, read_only=True)
    try:
        step = step if step is not None else (ckpts.best_step() or ckpts.latest_step())
        if step is None:
            raise FileNotFoundError(f"run {run_dir} has no checkpoint yet")
        labels = read_labels(run_dir)
        model_dir = resolve(cfg.model.name_or_path)
        check_base(ckpts.meta(step).get("base"), cfg, model_dir)
        run_model = load_run_model(cfg, model_dir, mesh, num_labels=len(labels) if labels else cfg.model.num_labels)
        model = run_model.model
        fn = Functional(model, run_model.trainable)
        restored, _ = ckpts.restore(step, {"params": fn.params})
        trained = fn.module(restored["params"])
        trained.hf_config = dict(model.hf_config)
        if labels is not None:
            trained.hf_config["id2label"] = {str(k): v for k, v in labels.id2label.items()}
            trained.hf_config["label2id"] = {v: k for k, v in labels.id2label.items()}
        log.info("restored step %d of %s", step, run_dir)
        return Restored(trained, labels, step, run_model.adapters)
    finally:
        ckpts.close()
