#!/usr/bin/env bash
# Build the documentation site (docs/) into docs/_build/html, strictly: every warning is an error (-W), and all of
# them are listed before it fails (--keep-going). A fresh build each time (-E): Sphinx does not notice a changed
# docstring, and an incremental build would not repeat the warnings of pages it skips.
# Needs the docs extra (scripts/setup.sh installs it). Extra arguments go to sphinx-build, e.g. -b linkcheck.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${DOCS_OUT:-docs/_build/html}
if ! $PYTHON -c "import sphinx, myst_nb, furo" 2>/dev/null; then
  echo "error: the docs extra is missing: pip install -e \".[docs]\" (or bash scripts/setup.sh)" >&2
  exit 1
fi

echo "== Building the documentation (warnings are errors) into $OUT"
start=$(date +%s%N)
status=0
$PYTHON -m sphinx -W --keep-going -E -q -b html docs "$OUT" "$@" || status=$?
end=$(date +%s%N)
seconds="$(( (end - start) / 1000000000 )).$(( (end - start) / 100000000 % 10 ))"
if [ "$status" != 0 ]; then
  echo "== The documentation build failed after $seconds s (exit status $status): fix the warnings above" >&2
  exit "$status"
fi
echo "== Documentation built in $seconds s: $OUT/index.html"
