#!/usr/bin/env bash
# The core tests against the oldest Lightning, torchmetrics and jsonargparse that setup.cfg allows (scripts/test.sh
# runs this after the main suite). A venv that sees the installed torch (--system-site-packages) gets the oldest
# releases on top; torch and torchvision are pinned to the installed versions, so pip never fetches another torch.
# Run scripts/setup.sh first. Extra arguments go to pytest. On 2 CPU cores shared with other work (load 2) it took
# 3.5 minutes (15 s of it creating the venv and installing, the first time; less than 10 s after).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${OLDEST_VENV:-${TMPDIR:-/tmp}/freeadv_pl_oldest_lightning}
# Keep these equal to the lower bounds in setup.cfg.
OLDEST_PINS=${OLDEST_PINS:-"lightning==2.6.0 torchmetrics==1.0.0 jsonargparse[signatures]==4.40.2 torchdata==0.11.0"}
# The core tests: the modules' training, checkpoint and resume tests, the direct optimizer step, the reads of
# Lightning's private API (freeadv_pl/_lightning_compat.py) and the command line.
CORE_TESTS=(
  tests/test_lightning_compat.py
  tests/test_step_path.py
  tests/test_natural.py
  tests/test_free.py
  tests/test_pgd_module.py
  tests/test_fast.py
  tests/test_resume.py
  tests/test_cli.py
)
# The slowest CLI runs (about a minute together) add no Lightning API the ones kept do not use.
SKIPPED=(
  --deselect "tests/test_cli.py::test_the_test_subcommand_prints_the_papers_table"
  --deselect "tests/test_cli.py::test_the_cuda_graph_overlay_keeps_the_config_and_falls_back_on_the_cpu"
  --deselect "tests/test_cli.py::test_an_imagenet_config_runs_unchanged_under_two_process_ddp"
)

start=$SECONDS
echo "== Oldest-Lightning leg: venv $VENV with $OLDEST_PINS"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
constraints="$VENV/torch-constraints.txt"
"$VENV/bin/python" - "$constraints" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

pins = []
for name in ("torch", "torchvision"):
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed: run scripts/setup.sh first (this venv reuses the installed {name})")
with open(sys.argv[1], "w") as file:
    file.write("\n".join(pins) + "\n")
EOF
echo "== Pinned to the installed: $(tr '\n' ' ' < "$constraints")"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" $OLDEST_PINS
# The repo itself, editable, with the venv's own console script (tests/test_cli.py runs `freeadv_pl --help`).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
"$VENV/bin/python" -W ignore - <<'EOF'
import jsonargparse, lightning, numpy, torch, torchmetrics, torchvision
import freeadv_pl

print(f"== freeadv_pl {freeadv_pl.__version__} ({freeadv_pl.__file__}) | lightning {lightning.__version__} | "
      f"torchmetrics {torchmetrics.__version__} | jsonargparse {jsonargparse.__version__} | torch {torch.__version__} "
      f"| torchvision {torchvision.__version__} | numpy {numpy.__version__}")
EOF
echo "== Installed in $((SECONDS - start)) s; running the core tests"
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=5 "${SKIPPED[@]}" \
  "${CORE_TESTS[@]}" "$@"
echo "== Oldest-Lightning leg passed in $((SECONDS - start)) s"
