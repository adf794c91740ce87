"""`python -m jaxft.bench` = `jaxft bench` (see `jaxft.bench`)."""

import sys

from jaxft.bench.cli import main

sys.exit(main())
