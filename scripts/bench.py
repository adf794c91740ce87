"""Side-by-side benchmarks, jaxft vs a plain PyTorch loop: `python scripts/bench.py [WORKLOAD ...]` is
`jaxft bench` (see jaxft/bench/__init__.py for the workloads and what is measured). It writes BENCHMARKS.md.

    python scripts/bench.py                        # every workload
    python scripts/bench.py sst2-steps --repeats 7
    python scripts/bench.py --reduced --out /tmp/b.md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxft.bench.cli import main  # noqa: E402

sys.exit(main())
