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
# FAISS comes from exactly one extra: cpu (the default, and what the tests use) or gpu (RETROGEN_FAISS=gpu, a
# CUDA host). Both wheels install the same `faiss` module, so the other one is removed before installing.
faiss=${RETROGEN_FAISS:-cpu}
case "$faiss" in
  cpu) other=faiss-gpu ;;
  gpu) other=faiss-cpu ;;
  *) echo "RETROGEN_FAISS must be cpu or gpu, got '$faiss'" >&2; exit 2 ;;
esac
stamp=.venv/.retrogen-installed
want=$( (cat pyproject.toml constraints.txt; echo "$faiss") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, alone: it is the 5 GB piece, and pinning it first keeps every later resolve on it.
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
if .venv/bin/python -m pip show -q "$other" >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -q -y "$other"
  .venv/bin/python -m pip uninstall -q -y "faiss-$faiss" 2>/dev/null || true  # its files were overwritten: reinstall
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,$faiss]"
echo "$want" > "$stamp"
echo "retrogen installed in .venv ($(.venv/bin/retrogen --help >/dev/null && echo ok))"
