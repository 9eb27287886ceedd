#!/usr/bin/env bash
# Create .venv in the repository root and install retrogen with every pinned dependency.
# Idempotent: re-running only installs what changed. pip (not uv/poetry) so torch comes from local wheels
# where they exist; constraints.txt pins the whole stack so no resolver picks another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.retrogen-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, alone: it is the 5 GB piece, and pinning it first keeps every later resolve on it.
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
echo "retrogen installed in .venv ($(.venv/bin/retrogen --help >/dev/null && echo ok))"
