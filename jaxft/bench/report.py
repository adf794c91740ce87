"""`BENCHMARKS.md` from the results of `jaxft.bench.run`: the machine, the versions, the command, one table
per workload, and each target met or missed by how much. Ratios are written so that above 1 favours
jaxft: speed = PyTorch's time / jaxft's, memory = PyTorch's peak / jaxft's, rates (examples/s, tokens/s,
MFU) = jaxft's / PyTorch's."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
from importlib import metadata
from pathlib import Path

GiB = 2**30


def _med(xs):
    return statistics.median(xs)


def _spread(xs) -> str:
    return f"{min(xs):.3g}–{max(xs):.3g}" if len(xs) > 1 else ""


def _percent(x: float) -> str:
    """A shortfall as a percentage, with a decimal when it is under 1% (a near miss must not read '0%')."""
    return f"{100 * x:.1f}%" if x < 0.01 else f"{100 * x:.0f}%"


def headline(name: str, result: dict) -> dict:
    """The numbers each workload is judged by, with the jaxft/PyTorch ratios."""
    sides = result["sides"]
    if "jaxft-cold" in sides:   # end to end
        wall = {s: _med([r["wall_s"] for r in runs]) for s, runs in sides.items()}
        return {"wall_s": wall, "accuracy": {s: [r["accuracy"] for r in runs] for s, runs in sides.items()},
                "peak_rss_gib": {s: _med([r["peak_rss_bytes"] for r in runs]) / GiB for s, runs in sides.items()},
                "ratios": {"speed-cold": wall["torch"] / wall["jaxft-cold"],
                           "speed-warm": wall["torch"] / wall["jaxft-warm"]}}
    if "call_s" in sides["jaxft"]:   # sampling
        out = {s: {"call_s": _med(r["call_s"]), "spread": _spread(r["call_s"]), "first_call_s": r["first_call_s"],
                   "tokens_per_s": r["new_tokens"] / _med(r["call_s"]), "peak_rss_gib": r["peak_rss_bytes"] / GiB}
               for s, r in sides.items()}
        out["ratios"] = {"speed": out["jaxft"]["tokens_per_s"] / out["torch"]["tokens_per_s"],
                         "memory": out["torch"]["peak_rss_gib"] / out["jaxft"]["peak_rss_gib"]}
        return out
    if "layer_s" in sides["jaxft"]:   # MoE layer
        ms = {s: {e: 1e3 * _med(t) for e, t in r["layer_s"].items()} for s, r in sides.items()}
        lo, hi = sorted(ms["jaxft"], key=int)[0], sorted(ms["jaxft"], key=int)[-1]
        return {"layer_ms": ms, "growth": {s: m[hi] / m[lo] for s, m in ms.items()},
                "ratios": {f"speed-{e}": ms["torch"][e] / ms["jaxft"][e] for e in ms["jaxft"]}}
    out = {}
    for s, r in sides.items():
        out[s] = {"step_s": _med(r["step_s"]), "spread": _spread(r["step_s"]), "first_step_s": r["first_step_s"],
                  "examples_per_s": _med(r["examples_per_s"]), "tokens_per_s": _med(r["tokens_per_s"]),
                  "mfu": _med(r["model_flops_per_s"]) / r["matmul_peak_flops"],
                  "matmul_peak_gflops": r["matmul_peak_flops"] / 1e9, "peak_rss_gib": r["peak_rss_bytes"] / GiB,
                  "trainable_params": r["trainable_params"]}
    out["ratios"] = {"speed": out["torch"]["step_s"] / out["jaxft"]["step_s"],
                     "memory": out["torch"]["peak_rss_gib"] / out["jaxft"]["peak_rss_gib"]}
    return out


def _versions() -> str:
    names = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")
    found = []
    for n in names:
        try:
            found.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join([f"Python {platform.python_version()}", *found])


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    load = ", load average at the end %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{mem}{load}"


def _table(name: str, h: dict) -> list[str]:
    if "wall_s" in h:
        rows = ["| | jaxft, empty compilation cache | jaxft, warm cache | PyTorch |", "| --- | --- | --- | --- |"]
        cols = ("jaxft-cold", "jaxft-warm", "torch")
        rows.append("| process start → test accuracy | " + " | ".join(f"{h['wall_s'][c]:.1f} s" for c in cols) + " |")
        rows.append("| test accuracy | " + " | ".join(", ".join(f"{a:.4f}" for a in h["accuracy"][c]) for c in cols) + " |")
        rows.append("| peak memory | " + " | ".join(f"{h['peak_rss_gib'][c]:.2f} GiB" for c in cols) + " |")
        return rows
    if "call_s" in h.get("jaxft", {}):
        j, t = h["jaxft"], h["torch"]
        rows = ["| | jaxft | PyTorch (transformers generate) | ratio (above 1 favours jaxft) |",
                "| --- | --- | --- | --- |"]
        rows.append(f"| one call (median) | {j['call_s']:.2f} s | {t['call_s']:.2f} s | {t['call_s'] / j['call_s']:.2f} |")
        rows.append(f"| spread of the calls | {j['spread']} | {t['spread']} | |")
        rows.append(f"| first call (compilation) | {j['first_call_s']:.1f} s | {t['first_call_s']:.1f} s | |")
        rows.append(f"| new tokens/s | {j['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | "
                    f"{h['ratios']['speed']:.2f} |")
        rows.append(f"| peak memory (RSS) | {j['peak_rss_gib']:.2f} GiB | {t['peak_rss_gib']:.2f} GiB | "
                    f"{h['ratios']['memory']:.2f} |")
        return rows
    if "layer_ms" in h:
        experts = sorted(h["layer_ms"]["jaxft"], key=int)
        rows = ["| | " + " | ".join(f"{e} experts" for e in experts) + " | growth |",
                "| --- |" + " --- |" * (len(experts) + 1)]
        for s, label in (("jaxft", "jaxft"), ("torch", "PyTorch (transformers)")):
            rows.append(f"| {label} | " + " | ".join(f"{h['layer_ms'][s][e]:.1f} ms" for e in experts)
                        + f" | {h['growth'][s]:.2f}× |")
        return rows
    j, t = h["jaxft"], h["torch"]
    rows = ["| | jaxft | PyTorch | ratio (above 1 favours jaxft) |", "| --- | --- | --- | --- |"]
    for key, label, fmt in (("step_s", "step (median)", "{:.3f} s"), ("spread", "spread of the windows", "{}"),
                            ("first_step_s", "first step (compilation)", "{:.1f} s"),
                            ("examples_per_s", "examples/s", "{:.1f}"), ("tokens_per_s", "tokens/s (real)", "{:.0f}"),
                            ("matmul_peak_gflops", "matmul peak measured", "{:.0f} GFLOP/s"),
                            ("mfu", "MFU", "{:.3f}"), ("peak_rss_gib", "peak memory (RSS)", "{:.2f} GiB"),
                            ("trainable_params", "trainable parameters", "{:,}")):
        ratio = ""
        if key in ("step_s", "first_step_s", "peak_rss_gib"):       # lower is better: PyTorch's / jaxft's
            ratio = f"{t[key] / j[key]:.2f}"
        elif key in ("examples_per_s", "tokens_per_s", "mfu"):      # higher is better: jaxft's / PyTorch's
            ratio = f"{j[key] / t[key]:.2f}" if t[key] else ""
        rows.append(f"| {label} | {fmt.format(j[key])} | {fmt.format(t[key])} | {ratio} |")
    return rows


def write_report(results: dict, out: Path, reduced: bool, argv: list[str]) -> None:
    from jaxft.bench import WORKLOADS

    lines = ["# Benchmarks", "",
             "Generated by `jaxft bench` (`jaxft/bench/`); do not edit by hand. Ratios above 1 favour jaxft "
             "(times: PyTorch's / jaxft's; memory: PyTorch's peak / jaxft's; rates and MFU: jaxft's / "
             "PyTorch's).", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {_machine()}", f"- versions: {_versions()}",
             f"- command: `{shlex.join(['jaxft', 'bench', *argv[1 + (argv[1:2] == ['bench']):]])}`"]
    if reduced:
        lines.append("- **reduced sizes** (a check of the harness, not a measurement)")
    for name, result in results.items():
        w, h = WORKLOADS[name], headline(name, result)
        lines += ["", f"## {name}: {w.title}", "", *_table(name, h), ""]
        lines += _profile(result["sides"])
        params = ", ".join(f"{k}={v}" for k, v in result["params"].items())
        lines.append(f"Parameters: {params}.")
        for metric, goal, meaning in w.targets:
            got = h["ratios"][metric]
            verdict = "met" if got >= goal else f"missed by {_percent(1 - got / goal)}"
            lines.append(f"- target {meaning}: {got:.2f}× — {verdict}")
    lines += _lora_vs_full(results)
    Path(out).write_text("\n".join(lines) + "\n")


def _profile(sides: dict) -> list[str]:
    """Where a step's time goes on each side (`jaxft.bench.profile`), when the sides were profiled."""
    if not all("profile" in r for r in sides.values()):
        return []
    from jaxft.bench.profile import KINDS

    j, t = sides["jaxft"]["profile"], sides["torch"]["profile"]
    lines = ["", "Where a step's time goes (profiled after the timed windows; seconds per step):", "",
             "| kind of op | jaxft | PyTorch |", "| --- | --- | --- |"]
    lines += [f"| {k} | {j['kinds'][k]:.3f} | {t['kinds'][k]:.3f} |" for k in KINDS]
    for label, prof in (("jaxft", j), ("PyTorch", t)):
        lines.append(f"\nLargest {label} ops: " + ", ".join(f"`{n}` {s:.3f} s" for n, s in prof["top"]) + ".")
    return lines + [""]


def _lora_vs_full(results: dict) -> list[str]:
    """jaxft's LoRA step against its own full fine-tuning step (the LoRA issue's target: at most 0.75× the
    time, and a smaller compiled program), when both workloads ran."""
    if not {"llama-135m", "llama-135m-lora"} <= results.keys():
        return []
    full, lora = (results[n]["sides"]["jaxft"] for n in ("llama-135m", "llama-135m-lora"))
    ratio = _med(lora["step_s"]) / _med(full["step_s"])
    lines = ["", "## LoRA vs full fine-tuning (jaxft, llama-135m)", "",
             "| | full | LoRA | LoRA / full |", "| --- | --- | --- | --- |",
             f"| step (median) | {_med(full['step_s']):.3f} s | {_med(lora['step_s']):.3f} s | {ratio:.2f} |"]
    if "xla_bytes" in full and "xla_bytes" in lora:
        fb, lb = dict(full["xla_bytes"]), dict(lora["xla_bytes"])
        fb["total"], lb["total"] = sum(fb.values()), sum(lb.values())
        for kind, b in fb.items():
            lines.append(f"| compiled step {kind} (XLA) | {b / GiB:.2f} GiB | {lb[kind] / GiB:.2f} GiB "
                         f"| {lb[kind] / b:.2f} |")
    lines.append(f"| peak memory (RSS) | {full['peak_rss_bytes'] / GiB:.2f} GiB | {lora['peak_rss_bytes'] / GiB:.2f} GiB "
                 f"| {lora['peak_rss_bytes'] / full['peak_rss_bytes']:.2f} |")
    verdict = "met" if ratio <= 0.75 else f"missed by {_percent(ratio / 0.75 - 1)}"
    lines += ["", f"- target LoRA step ≤ 0.75× the full step: {ratio:.2f}× — {verdict}"]
    return lines
