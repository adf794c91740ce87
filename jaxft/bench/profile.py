"""Where a training step's time goes, on each side of a benchmark: a profile of a few steps, summed by kind of op.

Both sides are traced after their timed windows (so tracing never slows the windows): jaxft with
`jax.profiler` (XLA's own per-op events: each fused kernel, dot and copy the compiled step runs), PyTorch
with `torch.profiler` (each ATen op's self time). Ops are put in the same four kinds on both sides:

- `matmul`: dense products (XLA dots and the YNNPACK/oneDNN fusions around them; ATen mm/addmm/bmm, and
  PyTorch's fused scaled-dot-product attention kernel, whose time is mostly its products);
- `layout copy`: copies and transposes that only move data (XLA `copy*`/`transpose*` fusions; ATen copy_,
  clone, contiguous);
- `other ops`: everything else that computes: element-wise work, reductions, gathers and scatters,
  softmax, norms, the optimiser update;
- `not in an op`: the step's wall time minus the ops' sum (dispatch, framework overhead, waiting). It can
  be negative for XLA, which runs independent ops on several threads at once.

The kinds are coarse on purpose: they answer whether a gap between the two sides is in the products, in
moving data, or in the work between products, and the `top` ops name the biggest single items.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

KINDS = ("matmul", "layout copy", "other ops", "not in an op")

# XLA events that contain other ops (their children are counted) or are runtime bookkeeping, not ops
_XLA_SKIP = re.compile(r"^(\$|Thunk|Slinky|PjitFunction|while|conditional|call\b|TfrtCpu|Pjrt|end_of|xla::)")
_XLA_MATMUL = re.compile(r"^(ynn_|onednn|dot|custom-call|__onednn|xnn)")
_XLA_COPY = re.compile(r"^(copy|transpose)")
_TORCH_MATMUL = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_dot_product.*|scaled_dot_product.*)$")
_TORCH_COPY = re.compile(r"^aten::(copy_|clone|contiguous|_to_copy)$")


def _kind(name: str, matmul: re.Pattern, copy: re.Pattern) -> str:
    if matmul.match(name):
        return "matmul"
    if copy.match(name):
        return "layout copy"
    return "other ops"


def summarise(op_seconds: dict[str, float], wall: float, steps: int, matmul, copy, top: int = 8) -> dict:
    """`{kinds: {kind: seconds per step}, top: [[op, seconds per step], ...]}` from total seconds per op."""
    kinds = dict.fromkeys(KINDS, 0.0)
    for name, s in op_seconds.items():
        kinds[_kind(name, matmul, copy)] += s / steps
    kinds["not in an op"] = wall / steps - sum(kinds.values())
    biggest = sorted(op_seconds.items(), key=lambda kv: -kv[1])[:top]
    return {"kinds": kinds, "top": [[name, s / steps] for name, s in biggest]}


def xla_profile(step, sync, steps: int = 2) -> dict:
    """Profile `steps` calls of `step()` (already compiled) with `jax.profiler`; ops are grouped by their HLO
    name with the numeric suffix dropped (`copy_bitcast_fusion.73` → `copy_bitcast_fusion`)."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t = time.perf_counter()
            for _ in range(steps):
                sync(step())
            wall = time.perf_counter() - t
        (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops: dict[str, float] = collections.defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and not _XLA_SKIP.match(name):
            ops[re.sub(r"\.\d+$", "", name)] += e["dur"] / 1e6
    return summarise(ops, wall, steps, _XLA_MATMUL, _XLA_COPY)


def torch_profile(step, sync, steps: int = 2) -> dict:
    """Profile `steps` calls of `step()` with `torch.profiler` (CPU): each ATen op's self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            sync(step())
        wall = time.perf_counter() - t
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("aten::")}
    return summarise(ops, wall, steps, _TORCH_MATMUL, _TORCH_COPY)
