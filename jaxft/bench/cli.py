"""The `jaxft bench` command line (also `python -m jaxft.bench`, `scripts/bench.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxft.bench import ROOT, WORKLOADS, run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workloads", nargs="*", choices=[[], *WORKLOADS], metavar="WORKLOAD",
                   help=f"any of {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--repeats", type=int, help="timed windows per side (default 5)")
    p.add_argument("--e2e-repeats", type=int, default=1, help="end-to-end runs per side (medians reported)")
    p.add_argument("--reduced", action="store_true", help="tiny sizes: checks the harness, measures nothing")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="the report to write")


def bench(args) -> None:
    run(args.workloads or list(WORKLOADS), reduced=args.reduced, repeats=args.repeats, out=args.out,
        e2e_repeats=args.e2e_repeats)
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jaxft bench", description=__doc__)
    add_arguments(p)
    bench(p.parse_args(argv))
    return 0
