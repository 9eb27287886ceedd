#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): SD 1.5 / SDXL generation, personalisation training, CLIP embedding and
# exact search figures in one run, offline. Extra arguments go to the script (--dry-run, --only, --json FILE).
# PYTHON picks the interpreter; default: the repository's .venv when there is one, else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" "$here/gpu_check.py" "$@"
