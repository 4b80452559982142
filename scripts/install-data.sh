#!/usr/bin/env sh
# Installs Fashion-MNIST (Debian package dataset-fashion-mnist) unless its files are already there.
set -eu
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing Fashion-MNIST: apt-get install dataset-fashion-mnist"
$SUDO apt-get install -y --no-install-recommends dataset-fashion-mnist \
    || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends dataset-fashion-mnist; }
