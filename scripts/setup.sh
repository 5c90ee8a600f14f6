#!/usr/bin/env bash
# Set up a fresh machine: the real Fashion-MNIST files, PyTorch, and freeadv_pl with its test extras.
# Idempotent: steps already done are skipped quickly. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# This environment keeps these two releases on disk; pinning them stops pip from downloading another torch.
TORCH_PINS=${TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

echo "== Installing $TORCH_PINS"
# shellcheck disable=SC2086
$PYTHON -m pip install -q --disable-pip-version-check $TORCH_PINS
echo "== Installing freeadv_pl[test,notebooks,docs]"
# shellcheck disable=SC2086
$PYTHON -m pip install -q --disable-pip-version-check -e ".[test,notebooks,docs]" $TORCH_PINS
$PYTHON -c "import freeadv_pl, torch, lightning; print('freeadv_pl', freeadv_pl.__version__, '| torch', torch.__version__, '| lightning', lightning.__version__)"
