#!/usr/bin/env bash
# Set everything up and run the retrieval demo on real data (Fashion-MNIST), no network beyond package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/retrogen demo "$@"
