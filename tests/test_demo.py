"""The README's first command, on a tiny budget: it trains through the CLI and prints the robustness table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import needs_fashion_mnist

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


@needs_fashion_mnist
def test_demo_prints_a_robustness_table(in_tmp_path):
    quick = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]
    command = [sys.executable, str(DEMO), "--eval-size", "100", "--", *quick]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("Robustness on the Fashion-MNIST test set (100 images)") :]
    for name in ("natural (no attack)", "PGD-20 (CE, ε=0.1, step 0.0125, 1 restart, random start)", "CW-20"):
        assert name in table
    # One row per model: the shipped Free recipe and natural training on the same command line (1 epoch, 3 batches).
    free = next(
        line for line in table.splitlines() if line.strip().startswith("Free-4 (example δ, step 0.5ε, noise 1)")
    )
    natural = next(line for line in table.splitlines() if line.strip().startswith("natural "))
    assert free.split()[-7:-5] == ["1", "12"] and natural.split()[-7:-5] == ["1", "3"]
    accuracies = [float(value) for line in (free, natural) for value in line.split()[-4:]]
    assert len(accuracies) == 8 and all(0 <= value <= 100 for value in accuracies)
    assert (in_tmp_path / "outputs" / "demo").is_dir()
