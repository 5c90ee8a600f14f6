#!/usr/bin/env bash
# README command 2 (and what CI runs): set up the machine, then
#   1. the whole test suite;
#   2. the documentation site, built with warnings as errors (scripts/build_docs.sh);
#   3. the wheel and sdist, built, checked and installed into a fresh venv outside the checkout, where the
#      `freeadv_pl` command trains a shipped recipe (scripts/test_wheel.sh);
#   4. the core tests against the oldest Lightning, torchmetrics and jsonargparse that setup.cfg allows
#      (scripts/test_oldest_lightning.sh, 2 to 4 minutes; OLDEST_LIGHTNING=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q --durations=10 "$@"
bash scripts/build_docs.sh
bash scripts/test_wheel.sh
if [ "${OLDEST_LIGHTNING:-1}" != 0 ]; then
  bash scripts/test_oldest_lightning.sh
fi
