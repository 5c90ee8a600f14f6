#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel (python -m build makes the wheel from the sdist, so a
# file missing from the sdist is missing from the wheel too), check both with twine and against the checkout, install
# the wheel into a fresh virtual environment outside the checkout and run the console script there, from a folder
# that has no configs/: --help, recipes, an import, and a quick fit of a shipped recipe on Fashion-MNIST.
#
#   bash scripts/test_wheel.sh        # about a minute on a CPU; PYTHON=python3.12 to use another interpreter
#
# Nothing is written into the checkout: the build runs on a copy of its files (tracked and untracked, not ignored),
# and everything lives in one temporary folder, removed at the end. The venv sees the installed packages
# (--system-site-packages): the pinned torch is not copied again, and the wheel's other requirements resolve against
# what is installed. The checkout's own editable install is visible through it too: the script checks that the
# venv's copy of freeadv_pl is the one imported, and fails otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/freeadv_pl_wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s.%N)

step() {  # print a command, run it, print how long it took; LOG=file sends its output there (shown if it fails)
    local begin status=0
    begin=$(date +%s.%N)
    echo "+ $*"
    if [ -n "${LOG:-}" ]; then "$@" >"$LOG" 2>&1 || status=$?; else "$@" || status=$?; fi
    echo "  ($(awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s)"
    if [ "$status" != 0 ]; then
        [ -n "${LOG:-}" ] && tail -40 "$LOG"
        fail "exit status $status: $*"
    fi
}

fail() {
    echo "test_wheel.sh: FAILED: $*" >&2
    exit 1
}

# torch and torchvision pinned to the installed versions on every pip install: never another torch.
TORCH_PINS=($("$PYTHON" -c 'from importlib.metadata import version; print(*(f"{n}=={version(n)}" for n in ("torch", "torchvision")))'))

echo "== tools: build and twine (the test extra)"
if ! "$PYTHON" -m build --version >/dev/null 2>&1 || ! "$PYTHON" -m twine --version >/dev/null 2>&1; then
    # Constrained to what is installed, so that nothing installed changes (the newest twine would pull a docutils
    # that the docs extra's Sphinx 7.2 forbids).
    "$PYTHON" -m pip freeze --exclude-editable | grep -v ' @ ' >"$WORK/installed.txt"
    step "$PYTHON" -m pip install -q -c "$WORK/installed.txt" "build>=1" "twine>=5" "${TORCH_PINS[@]}"
fi
"$PYTHON" -m build --version

echo "== build the sdist and the wheel from a copy of the checkout"
mkdir "$WORK/src"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    (cd "$ROOT" && tar --null --ignore-failed-read -cf - -T - 2>/dev/null) | tar -xf - -C "$WORK/src"
LOG="$WORK/build.log" step "$PYTHON" -m build --outdir "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/*.whl)
SDIST=$(ls "$WORK"/dist/*.tar.gz)
ls -l "$WORK/dist"
step "$PYTHON" -m twine check --strict "$WHEEL" "$SDIST"

echo "== the wheel and the sdist hold every module and every recipe of the checkout"
"$PYTHON" - "$WORK/src" "$WHEEL" "$SDIST" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path

src, wheel, sdist = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
modules = {p.relative_to(src).as_posix() for p in (src / "freeadv_pl").rglob("*.py")}
recipes = {p.relative_to(src).as_posix() for p in (src / "configs").rglob("*.yaml")}
in_wheel = set(zipfile.ZipFile(wheel).namelist())
in_sdist = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
missing = sorted(modules - in_wheel) + sorted(f"freeadv_pl/{r}" for r in recipes if f"freeadv_pl/{r}" not in in_wheel)
missing += sorted(f"(sdist) {name}" for name in modules | recipes if name not in in_sdist)
if missing:
    sys.exit("missing from the distributions:\n  " + "\n  ".join(missing))
print(f"  {len(modules)} modules and {len(recipes)} recipes in both; the wheel installs the recipes as freeadv_pl/configs/")
EOF

echo "== install the wheel into a fresh venv (system site-packages visible: the installed torch is reused)"
VENV="$WORK/venv"
step "$PYTHON" -m venv --without-pip --system-site-packages "$VENV"
# The venv runs the installed pip. First the wheel itself, forced: an installed freeadv_pl of the same version (the
# checkout's) would otherwise satisfy it; then its requirements, resolved with torch pinned.
step "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$WHEEL"
step "$VENV/bin/python" -m pip install -q "$WHEEL" "${TORCH_PINS[@]}"

cd "$WORK"  # no configs/ here: recipes must come from the wheel
echo "== the venv's freeadv_pl is the one imported, recipes included"
step "$VENV/bin/python" -c "
import sys
import freeadv_pl
from freeadv_pl.recipes import recipes_dir
for name, path in (('freeadv_pl', freeadv_pl.__file__), ('its recipes', recipes_dir())):
    if not str(path).startswith(sys.prefix + '/'):
        sys.exit(f'{name} imported from {path}, not from the venv {sys.prefix}: the checkout shadows the wheel')
print(f'  freeadv_pl {freeadv_pl.__version__} from {freeadv_pl.__file__}; recipes in {recipes_dir()}')
"

echo "== the console script"
step "$VENV/bin/freeadv_pl" --help 2>"$WORK/help.err" | tee "$WORK/help.out"
if [ -s "$WORK/help.err" ]; then
    cat "$WORK/help.err"
    fail "freeadv_pl --help wrote to stderr (a warning?)"
fi
for subcommand in fit validate test predict export recipes; do
    grep -q "^ *$subcommand  " "$WORK/help.out" || fail "freeadv_pl --help does not list $subcommand"
done
step "$VENV/bin/freeadv_pl" recipes fashion_mnist
step "$VENV/bin/freeadv_pl" recipes --path fashion_mnist/free.yaml
step "$VENV/bin/python" -c "
import torch
import freeadv_pl

model = freeadv_pl.InputNormalization(freeadv_pl.SmallCNN(), mean=(0.286,), std=(0.353,)).eval()
x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
x_adv = freeadv_pl.pgd(model, x, y, epsilon=0.1, step_size=0.025, steps=5)
assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
print(f'  PGD-5 within the 0.1 ball; {len(freeadv_pl.__all__)} public names')
"

echo "== a shipped recipe, by name, with its quick overlay (Fashion-MNIST from /usr/share/datasets/fashion-mnist)"
step "$VENV/bin/freeadv_pl" fit --config fashion_mnist/free.yaml --config fashion_mnist/quick.yaml \
    --trainer.default_root_dir "$WORK/run" --trainer.enable_progress_bar false
[ -f "$WORK/run/lightning_logs/version_0/checkpoints/last.ckpt" ] || fail "the fit wrote no last.ckpt"
grep -q "class_path: freeadv_pl.FreeAdversarialModule" "$WORK/run/lightning_logs/version_0/config.yaml" ||
    fail "the fit's config.yaml is not the Free-m recipe"

echo "test_wheel.sh: OK in $(awk -v a="$START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s"
