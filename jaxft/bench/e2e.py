"""One end-to-end SST-2 run in this process, for `jaxft bench sst2-e2e`; its last stdout line is JSON.

    python -m jaxft.bench.e2e jaxft CONFIG [key=value ...]     # what `jaxft train CONFIG ...` does (and starts as it does)
    python -m jaxft.bench.e2e torch [--rows N] [--data-dir D]   # scripts/torch_baseline.py's loop

The caller times the process from spawn to exit; this reports the test accuracy and the process's peak
resident memory (and, for jaxft, what it compiled and read from the persistent compilation cache).
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import runpy
import sys

from jaxft.bench import ROOT


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "jaxft":
        from jaxft.hostmem import restart_with_huge_pages

        restart_with_huge_pages()   # as the `jaxft` command starts
        from jaxft.config import load_config
        from jaxft.train.loop import train

        with contextlib.redirect_stdout(io.StringIO()):
            summary = train(load_config(args[0], args[1:]))
        out = {"accuracy": summary["test"]["accuracy"], "compilation": summary.get("compilation")}
    else:
        sys.argv = [str(ROOT / "scripts" / "torch_baseline.py"), *args]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            runpy.run_path(sys.argv[0], run_name="__main__")
        out = json.loads(buf.getvalue().strip().splitlines()[-1])
    print(json.dumps(dict(out, peak_rss_bytes=peak_rss_bytes())))


if __name__ == "__main__":
    main()
