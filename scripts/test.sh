#!/usr/bin/env bash
# README command 2 (and what CI runs): set up the machine, run the whole test suite, then the core tests against the
# oldest Lightning, torchmetrics and jsonargparse that setup.cfg allows (scripts/test_oldest_lightning.sh, 2 to
# 4 minutes; OLDEST_LIGHTNING=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q --durations=10 "$@"
if [ "${OLDEST_LIGHTNING:-1}" != 0 ]; then
  bash scripts/test_oldest_lightning.sh
fi
