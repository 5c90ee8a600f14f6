"""Does a shipped recipe hold at every seed? Train a config through the CLI at several seeds, as a user would
(``freeadv_pl fit --config ... --seed_everything S``), and score each model on the Fashion-MNIST test set.

    python benchmarks/recipe_seeds.py --config configs/fashion_mnist/free.yaml --seeds 0 1 2
    python benchmarks/recipe_seeds.py --config configs/fashion_mnist/free.yaml --seeds 0 1 2 \\
        -- --model.init_args.optimizer.init_args.lr 0.05      # anything after -- goes to `freeadv_pl fit`

The seed changes the initial weights and the training module's draws (random starts, δ noise); the DataModule's own
``seed`` (the validation split and the per-epoch order) stays the config's. Each model is scored with natural accuracy
and PGD-20 (CE, step 2.5 ε / 20 as in the demo, 1 random start) on the first ``--eval-size`` test images. The result
files give every seed's figures and, per config, the mean, the range and the spread (max − min) of PGD-20 accuracy.
Runs of a list of seeds can be shared out over processes (``--seeds 0`` in one, ``--seeds 1`` in another) and the
result files joined with ``--merge``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from torch.utils.data import DataLoader, Subset

from freeadv_pl import AttackSpec, robust_accuracy
from freeadv_pl.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


def run_seed(configs: list[str], seed: int, extra: list[str], eval_size: int, workdir: Path) -> dict[str, Any]:
    """Train ``configs`` (+ ``extra`` CLI arguments) at ``seed`` through the CLI; natural and PGD-20 accuracy (%)."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    arguments = ["fit", *(item for config in configs for item in ("--config", config))]
    arguments += ["--seed_everything", str(seed), "--trainer.default_root_dir", str(workdir / f"seed{seed}")]
    arguments += ["--trainer.enable_progress_bar", "false", *extra]
    start = time.perf_counter()
    cli = build_cli(arguments)
    train_seconds = time.perf_counter() - start
    module, data = cli.model, cli.datamodule
    epsilon = float(module.epsilon)
    data.setup("test")
    loader = DataLoader(Subset(data.test_set, range(min(eval_size, len(data.test_set)))), batch_size=500)
    attacks = {"natural": AttackSpec(steps=0), "PGD-20": AttackSpec(steps=20, step_size=2.5 * epsilon / 20)}
    scores = robust_accuracy(module.model, loader, list(attacks.values()), epsilon)
    row: dict[str, Any] = {
        "seed": seed,
        "optimizer_steps": cli.trainer.global_step,
        "train_minutes": train_seconds / 60.0,
        **{name: 100.0 * scores[attack.key] for name, attack in attacks.items()},
    }
    alignment = cli.trainer.callback_metrics.get("train/grad_alignment")
    if alignment is not None:
        row["grad_alignment_last_epoch"] = float(alignment)
    row["attacks"] = {
        name: attack.describe(epsilon) + f" on {scores['examples']} test images" for name, attack in attacks.items()
    }
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean, min, max and spread (max − min) of the rows' PGD-20 and natural accuracy."""
    out: dict[str, float] = {}
    for key in ("PGD-20", "natural"):
        values = [row[key] for row in rows]
        out.update(
            {
                f"{key} mean": statistics.fmean(values),
                f"{key} min": min(values),
                f"{key} max": max(values),
                f"{key} spread": max(values) - min(values),
            }
        )
    return out


def write(rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> None:
    columns = [
        ("seed", "seed"),
        ("optimizer_steps", "optimizer steps"),
        ("train_minutes", "train min"),
        ("natural", "natural %"),
        ("PGD-20", "PGD-20 %"),
    ]
    if any("grad_alignment_last_epoch" in row for row in rows):
        columns.append(("grad_alignment_last_epoch", "grad alignment, last epoch"))
    table = markdown_table(sorted(rows, key=lambda row: row["seed"]), columns)
    info = {**info, "summary": summary(rows)} if rows else info
    stats = info.get("summary", {})
    if stats:
        table += (
            f"\n\nPGD-20 over {len(rows)} seeds: mean {stats['PGD-20 mean']:.1f} %, range "
            f"{stats['PGD-20 min']:.1f}–{stats['PGD-20 max']:.1f} % (spread {stats['PGD-20 spread']:.1f} points)"
        )
    write_results(
        out, f"Recipe at several seeds: {' + '.join(info['configs'])} {' '.join(info['extra'])}", info, rows, table
    )
    print(table, flush=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=None, help="a config file (repeat to combine them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-size", type=int, default=2000, help="test images scored (the first N)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="results path without suffix (.json, .md)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="join these results .json into --out")
    parser.add_argument("extra", nargs="*", help="arguments passed on to `freeadv_pl fit` (after --)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS / "recipe_seeds"
    if args.merge:
        parts = [json.loads(part.read_text()) for part in args.merge]
        info = {**parts[0]["machine"], "parts": [part["machine"] for part in parts]}
        info.pop("summary", None)
        rows = [row for part in parts for row in part["rows"]]
        write(rows, info, out)
        return rows
    if not args.config:
        parser.error("give at least one --config")
    torch.set_num_threads(args.threads)
    info = machine("cpu", args) | {"configs": args.config, "extra": args.extra}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            rows.append(run_seed(args.config, seed, args.extra, args.eval_size, Path(workdir)))
            print(
                f"seed {seed}: {rows[-1]['natural']:.2f} % natural, {rows[-1]['PGD-20']:.2f} % PGD-20, "
                f"{rows[-1]['train_minutes']:.1f} min",
                flush=True,
            )
            write(rows, info, out)
    return rows


if __name__ == "__main__":
    quiet_lightning()
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    main()
