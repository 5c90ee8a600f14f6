#!/usr/bin/env bash
# README command 2 (and what CI runs): set up the machine, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q --durations=10 "$@"
