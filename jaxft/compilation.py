"""Compilation: a persistent XLA cache (on by default) and a counter of what was compiled.

A cold run pays one XLA compilation per distinct program (each padded batch length of the train and
eval steps, generation, initialisation). JAX's persistent compilation cache stores the compiled
executables on disk, keyed by everything that changes them (the program's HLO, the JAX/jaxlib version,
the backend, device kind and count, XLA flags), so a second run of the same recipe loads them instead
of compiling; a changed model, shape, mesh or version gets new keys and can never load a stale one.

Where: `$JAXFT_XLA_CACHE` if set, else `xla/` under jaxft's cache directory (`$JAXFT_CACHE`, default
`~/.cache/jaxft`), least recently used entries dropped past `MAX_BYTES`. `JAXFT_XLA_CACHE=off`
switches it off. Every program is stored, however quick to compile, so that a second run compiles
nothing at all.

`jit_options()` is what jaxft's train and eval steps are compiled with: on CPU, LLVM's optimisation
level 1 instead of XLA's default 2 (the MiniLM train step compiles in 10–11 s instead of 16–18 s, its
steps as fast: 1.01–1.09 s vs 1.11 s at batch 32 × 32, alternating runs; level 0 halves step speed),
unless `XLA_FLAGS` sets `--xla_backend_optimization_level` itself.

`CompileCounter` listens to JAX's monitoring events and counts real backend compilations, cache hits
and compile seconds, so the training loop can report throughput without compilation and say how many
programs an epoch compiled.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path

import jax

log = logging.getLogger("jaxft")

MAX_BYTES = 4 << 30

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def cache_path() -> Path | None:
    """The persistent cache's folder, or None when `JAXFT_XLA_CACHE=off`."""
    configured = os.environ.get("JAXFT_XLA_CACHE")
    if configured is not None and configured.strip().lower() in ("off", "0", "false", "no", ""):
        return None
    if configured:
        return Path(configured)
    return Path(os.environ.get("JAXFT_CACHE") or Path.home() / ".cache" / "jaxft") / "xla"


def jit_options() -> dict:
    """Keyword arguments for `jax.jit` of the train and eval steps (see the module docstring)."""
    if jax.default_backend() == "cpu" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        return {"compiler_options": {"xla_backend_optimization_level": 1}}
    return {}


def enable_persistent_cache() -> Path | None:
    """Point JAX's compilation cache at `cache_path()` (once per process; a folder already configured
    through `jax.config` by the caller is kept). Returns the folder in use, or None."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = cache_path()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home must not stop a run: it just compiles every time
        log.warning("persistent compilation cache off: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        import filelock  # noqa: F401  (JAX needs it to share a size-bounded cache between processes safely)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    except ImportError:
        pass
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileCounter:
    """Counts, from the moment it is created, XLA compilations (`compiles`, and `by_program`: per jitted
    function name, e.g. `train_step`), programs loaded from the persistent cache (`cache_hits`) and the
    seconds both took (`seconds`).

    JAX's listeners cannot be removed, so one process-wide listener feeds every counter alive; a counter
    reads differences from its creation. A program read from the persistent cache reports a cache-hit
    event and then, from the same thread, a (short) backend-compile event: that one is not a compile."""

    _lock = threading.Lock()
    _hit = threading.local()
    _totals: dict = {"compiles": 0, "cache_hits": 0, "seconds": 0.0, "by_program": Counter()}
    _installed = False

    def __init__(self):
        with CompileCounter._lock:
            if not CompileCounter._installed:
                jax.monitoring.register_event_duration_secs_listener(CompileCounter._on_duration)
                jax.monitoring.register_event_listener(CompileCounter._on_event)
                CompileCounter._installed = True
            self._start = {k: v.copy() if isinstance(v, Counter) else v for k, v in CompileCounter._totals.items()}

    @staticmethod
    def _on_event(event: str, **_) -> None:
        if event == _CACHE_HIT:
            CompileCounter._hit.pending = True
            with CompileCounter._lock:
                CompileCounter._totals["cache_hits"] += 1

    @staticmethod
    def _on_duration(event: str, seconds: float, fun_name: str = "?", **_) -> None:
        if event != _BACKEND_COMPILE:
            return
        hit, CompileCounter._hit.pending = getattr(CompileCounter._hit, "pending", False), False
        with CompileCounter._lock:
            CompileCounter._totals["seconds"] += seconds
            if not hit:
                CompileCounter._totals["compiles"] += 1
                CompileCounter._totals["by_program"][fun_name.removeprefix("jit(").removesuffix(")")] += 1

    def read(self) -> dict:
        """`{"compiles", "cache_hits", "seconds", "by_program"}` since this counter was created."""
        with CompileCounter._lock:
            t = CompileCounter._totals
            return {"compiles": t["compiles"] - self._start["compiles"],
                    "cache_hits": t["cache_hits"] - self._start["cache_hits"],
                    "seconds": t["seconds"] - self._start["seconds"],
                    "by_program": dict(+(t["by_program"] - self._start["by_program"]))}
