#!/usr/bin/env bash
# README command 1: set up the machine, then train Free-m on Fashion-MNIST on the CPU and print a robustness table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 scripts/demo.py "$@"
