"""notebooks/quickstart.ipynb runs top to bottom (its code cells in order, as Jupyter would) in its quick
mode (8 steps), from the notebooks/ folder of this checkout: plan, train, metrics, export, classify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, minilm_dir):
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    script = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    (tmp_path / "notebook.py").write_text(script)
    env = dict(os.environ, JAXFT_NOTEBOOK_QUICK="1", MPLBACKEND="Agg", JAXFT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(tmp_path / "notebook.py")], cwd=ROOT / "notebooks", env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    out = proc.stdout
    assert "accelerator: cpu" in out and "parameters" in out                 # the plan's report
    assert "eval loss" in out and "accuracy" in out
    lines = out.strip().splitlines()[-2:]                                    # the two classified sentences
    assert all(line.split()[0] in ("positive", "negative") for line in lines), lines
