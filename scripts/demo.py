"""The README's first command: Free-m adversarial training on real Fashion-MNIST on the CPU, then a robustness table.

    python scripts/demo.py                      # Free-m (configs/fashion_mnist/free.yaml), then natural training
                                                # on the same budget (natural.yaml), one table for both
    python scripts/demo.py --free-only          # Free-m alone
    python scripts/demo.py -- --trainer.max_epochs 1   # anything after -- goes to `freeadv_pl fit` (both runs)

Training runs through the package's CLI (`freeadv_pl fit --config ...`); evaluation uses the package's attacks on
the Fashion-MNIST test set. Logs and checkpoints go to outputs/demo/.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import freeadv_pl
from freeadv_pl import AttackSpec, robust_accuracy
from freeadv_pl.cli import _ignore_unactionable_warnings, build_cli

ROOT = Path(__file__).resolve().parent.parent
EPSILON = 0.1
PGD_STEP = 2.5 * EPSILON / 20  # Madry et al.'s rule: 2.5 ε / steps


def _train(config: Path, extra: list[str]) -> tuple[object, float]:
    # The CLI is given its arguments explicitly; the demo's own command line is not meant for it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    _ignore_unactionable_warnings()  # third-party deprecations, as the freeadv_pl command hides them
    start = time.perf_counter()
    cli = build_cli(["fit", "--config", str(config), "--trainer.default_root_dir", "outputs/demo", *extra])
    return cli, time.perf_counter() - start


def _evaluate(model: torch.nn.Module, loader: DataLoader) -> list[tuple[str, float]]:
    attacks = {
        "natural (no attack)": AttackSpec(steps=0),
        f"FGSM (CE, ε={EPSILON})": AttackSpec(steps=1, step_size=EPSILON, random_start=False, name="fgsm"),
        f"PGD-20 (CE, ε={EPSILON}, step {PGD_STEP:g}, 1 restart, random start)": AttackSpec(
            steps=20, step_size=PGD_STEP
        ),
        f"CW-20 (PGD on the CW margin, ε={EPSILON}, step {PGD_STEP:g}, 1 restart, random start)": AttackSpec(
            steps=20, loss="cw", step_size=PGD_STEP
        ),
    }
    accuracy = robust_accuracy(model, loader, list(attacks.values()), EPSILON)
    for name, attack in attacks.items():
        print(f"  {name}: {100.0 * accuracy[attack.key]:.2f}% of {accuracy['examples']}", flush=True)
    return [(name, 100.0 * accuracy[attack.key]) for name, attack in attacks.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/fashion_mnist/free.yaml")
    parser.add_argument(
        "--free-only",
        action="store_true",
        help="skip the natural-training baseline (configs/fashion_mnist/natural.yaml)",
    )
    parser.add_argument("--eval-size", type=int, default=10000, help="test images evaluated (first N of 10,000)")
    parser.add_argument("extra", nargs="*", help="arguments passed on to `freeadv_pl fit` (after --)")
    args = parser.parse_args()

    configs = [args.config] + ([] if args.free_only else [ROOT / "configs/fashion_mnist/natural.yaml"])
    results = []
    for config in configs:
        print(f"\n=== freeadv_pl fit --config {config.relative_to(ROOT)} {' '.join(args.extra)}", flush=True)
        cli, train_seconds = _train(config, args.extra)
        datamodule = cli.datamodule
        datamodule.setup("test")
        test_set = Subset(datamodule.test_set, range(min(args.eval_size, len(datamodule.test_set))))
        loader = DataLoader(test_set, batch_size=500)
        print(f"Evaluating on {len(test_set)} Fashion-MNIST test images:", flush=True)
        module = cli.model
        label = "natural" if type(module).__name__ == "NaturalModule" else type(module).__name__
        if hasattr(module, "replays"):
            noise = f", noise {module.delta_start_noise:g}" if module.delta_start_noise else ""
            label = (
                f"Free-{module.replays} ({module.delta_memory} δ, step {module.step_size / module.epsilon:g}ε{noise})"
            )
        epochs = cli.trainer.current_epoch
        results.append((label, epochs, cli.trainer.global_step, train_seconds, _evaluate(module.model, loader)))

    names = [name for name, _ in results[0][4]]
    print("\n" + "=" * 100)
    print(
        f"Robustness on the Fashion-MNIST test set ({len(test_set)} images), ε = {EPSILON} in [0, 1] pixel units.\n"
        f"freeadv_pl {freeadv_pl.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
        f" CPU, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}. Accuracy (%) under each evaluation:"
    )
    for index, name in enumerate(names):
        print(f"  [{index + 1}] {name}")
    header = f"  {'model':<40} {'epochs':>6} {'opt. steps':>10} {'train s':>8}"
    print("\n" + header + "".join(f" {f'[{index + 1}]':>7}" for index in range(len(names))))
    for label, epochs, steps, train_seconds, rows in results:
        line = f"  {label:<40} {epochs:>6} {steps:>10} {train_seconds:>8.0f}"
        print(line + "".join(f" {accuracy:>7.2f}" for _, accuracy in rows))
    print(
        "\nEvery model made the same number of forward/backward passes (the budget rule: Free-m for N/m epochs costs "
        "natural training's N)."
        if len(results) > 1
        else ""
    )
    print("=" * 100)


if __name__ == "__main__":
    sys.exit(main())
