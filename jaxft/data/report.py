"""`jaxft data`: the data pipeline alone — cleaning report, what each rule removed or changed, token lengths.

No model weights are loaded; the tokenizer is (token lengths are the model's). Writes into `output_dir`:
data_report.json (the cleaning reports, as a training run writes them), data_report.md (the same as a table)
and token_lengths.svg (a histogram of the cleaned splits' token lengths, hand-written SVG: no plotting
library is needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxft.config import Config
from jaxft.data.clean import CleanReport, report_table, token_lengths

COLOURS = {"train": "#4477aa", "validation": "#ee6677", "test": "#228833"}


def length_stats(lengths, max_length: int) -> dict:
    """min / median / p95 / max tokens, and the share of rows longer than `data.max_length` (truncated)."""
    a = np.asarray(lengths)
    return {"rows": int(a.size), "min": int(a.min()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max()),
            "truncated": int((a > max_length).sum()), "truncated_share": float((a > max_length).mean())}


def histogram_svg(lengths: dict[str, list[int]], max_length: int, bins: int = 40) -> str:
    """Token-length histograms of the splits, overlaid, with the `data.max_length` cut as a dashed line."""
    hi = max(max(v) for v in lengths.values())
    edges = np.linspace(0, max(hi, max_length) + 1, bins + 1)
    counts = {s: np.histogram(v, edges)[0] / len(v) for s, v in lengths.items()}  # share of the split
    top = max(c.max() for c in counts.values()) or 1.0
    w, h, left, bottom, pad = 640, 360, 50, 40, 20
    x = lambda v: left + (w - left - pad) * v / edges[-1]
    y = lambda share: h - bottom - (h - bottom - pad) * share / top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="14">token lengths (share of rows per bin)</text>']
    for split, c in counts.items():
        colour = COLOURS.get(split, "#666666")
        for i, share in enumerate(c):
            if share > 0:
                out.append(f'<rect class="bar" data-split="{split}" x="{x(edges[i]):.1f}" y="{y(share):.1f}" '
                           f'width="{x(edges[i + 1]) - x(edges[i]):.1f}" height="{y(0) - y(share):.1f}" '
                           f'fill="{colour}" fill-opacity="0.5"/>')
    out.append(f'<line x1="{left}" y1="{y(0)}" x2="{w - pad}" y2="{y(0)}" stroke="black"/>')
    for v in np.linspace(0, edges[-1], 6):
        out.append(f'<text x="{x(v):.1f}" y="{y(0) + 14}" text-anchor="middle">{int(v)}</text>')
    out.append(f'<line x1="{x(max_length):.1f}" y1="{pad}" x2="{x(max_length):.1f}" y2="{y(0)}" stroke="black" '
               f'stroke-dasharray="4 3"/><text x="{x(max_length) + 3:.1f}" y="{pad + 10}">max_length '
               f'{max_length}</text>')
    for i, split in enumerate(counts):
        out.append(f'<rect x="{w - 130}" y="{pad + 16 * i}" width="10" height="10" '
                   f'fill="{COLOURS.get(split, "#666666")}"/><text x="{w - 115}" y="{pad + 16 * i + 9}">{split} '
                   f'({len(lengths[split])})</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def write_report_md(path: Path, reports: list[CleanReport]) -> None:
    """RUN_DIR/data_report.md: the cleaning counts of a training run as a table (process 0 writes it)."""
    import jax

    if jax.process_index() == 0:
        Path(path).write_text(f"# Data cleaning\n\n{report_table(reports)}")


def _clip(text, n: int = 160) -> str:
    text = repr(text)
    return text if len(text) <= n else text[:n - 3] + "..."


def examples_text(reports: list[CleanReport]) -> str:
    """A few rows per rule: the text dropped, or before → after for repairs."""
    lines = []
    for r in reports:
        for rule, samples in r.samples.items():
            lines.append(f"{r.split} · {rule}:")
            for s in samples:
                if "before" in s:
                    lines.append(f"  row {s['row']}: {_clip(s['before'])}\n        → {_clip(s['after'])}")
                else:
                    labels = f"  labels {s['labels']}" if "labels" in s else ""
                    lines.append(f"  row {s['row']}: {_clip(s['text'])}{labels}")
    return "\n".join(lines)


def stats_text(stats: dict[str, dict], max_length: int) -> str:
    lines = [f"| split | rows | min | median | p95 | max | truncated at max_length={max_length} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for split, s in stats.items():
        lines.append(f"| {split} | {s['rows']} | {s['min']} | {s['median']:g} | {s['p95']:g} | {s['max']} | "
                     f"{s['truncated']} ({100 * s['truncated_share']:.1f}%) |")
    return "\n".join(lines) + "\n"


def require_classification(cfg: Config) -> None:
    """`jaxft data` covers one classification data set; anything else is refused before the tokenizer loads."""
    if cfg.model.task != "sequence-classification" or getattr(cfg, "tasks", None):
        raise ValueError("jaxft data covers classification data (model.task=sequence-classification, no tasks:); "
                         f"this config has model.task={cfg.model.task}"
                         + (" with tasks:" if getattr(cfg, "tasks", None) else ""))


def inspect_data(cfg: Config, tokenizer, out_dir: str | Path) -> str:
    """Clean the configured splits, write the report files and the histogram into `out_dir`, return the
    text `jaxft data` prints."""
    from jaxft.data import read_clean_rows
    from jaxft.train.run import write_json

    require_classification(cfg)
    rows, reports = read_clean_rows(cfg, tokenizer)
    lengths = {split: token_lengths(tokenizer, r) for split, r in rows.items()}
    stats = {split: length_stats(v, cfg.data.max_length) for split, v in lengths.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = report_table(reports)
    write_json(out / "data_report.json", [vars(r) | {"rows_out": r.rows_out} for r in reports])
    (out / "data_report.md").write_text(f"# Data cleaning\n\n{table}\n# Token lengths\n\n"
                                        f"{stats_text(stats, cfg.data.max_length)}")
    write_json(out / "token_lengths.json", stats)
    (out / "token_lengths.svg").write_text(histogram_svg(lengths, cfg.data.max_length))
    return (f"Cleaning (rows per rule and split)\n\n{table}\nExamples\n\n{examples_text(reports)}\n\n"
            f"Token lengths\n\n{stats_text(stats, cfg.data.max_length)}\n"
            f"wrote {out / 'data_report.json'}, {out / 'data_report.md'}, {out / 'token_lengths.svg'}")
