#!/usr/bin/env bash
# Set everything up and run the retrieval demo on real data (Fashion-MNIST from Debian's package registry).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist, 30 MB)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/retrogen demo "$@"
