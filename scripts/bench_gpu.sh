#!/usr/bin/env bash
# The accelerator benchmark (jaxft/bench/gpu.py): SmolLM2-135M and Llama-3.2-1B shapes, bfloat16, sequence
# 2048, full fine-tuning and LoRA, MFU against the chip's published bfloat16 peak. No network; < 8 minutes.
#   bash scripts/bench_gpu.sh              # on the GPU/TPU machine, from the repository root
#   bash scripts/bench_gpu.sh --reduced    # a tiny model at 64 tokens: checks it works (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
exec "$PY" -m jaxft.bench.gpu "$@"
