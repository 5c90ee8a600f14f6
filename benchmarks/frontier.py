"""The cheap-adversarial-training frontier on real Fashion-MNIST, at several seeds and ε: natural training, Free-4
(the shipped recipe at three peak learning rates, and the paper's batch δ), FGSM-RS, N-FGSM, prior-guided FGSM
(FGSM-MEP, the authors' settings: α = ε, momentum 0.3, λ = 10, label smoothing 4/9) and 7-PGD, each at natural
training's cost for N epochs (the budget rule; FGSM-MEP's 3 passes per batch give it N/3 epochs, rounded down), and
7-PGD at 7× that cost.

Every run: SmallCNN, SGD (momentum 0.9, weight decay 5e-4, batch 128), a one-cycle learning rate (linear up over
40 % of the run's optimizer steps to the row's peak, then linear down), ``--train-size`` training images, seeded
weights, order and draws. Scored on the test set (``--test-size``, default all 10,000): natural accuracy and PGD-20
(CE, step ε/4, 1 random start); on ``--autoattack-size`` seeded test images, AutoAttack's standard version for the
first seed and the cheaper APGD-CE + APGD-DLR preset for the others (needs torchattacks; 0 skips both). A run whose
PGD-20 accuracy ends below ``--collapse-below`` % (default 10) is reported as collapsed, with its seed.

The results files (.json, .md, .png: PGD-20 against training time, one panel per ε) are rewritten after every run,
and a run already in the .json is not trained again: an interrupted grid goes on where it stopped, and a grid
shared out over processes (``--rows``, ``--epsilons``, ``--seeds``) is joined with ``--merge`` (a run found in several
parts counts once).

    python benchmarks/frontier.py --epochs 32 --epsilons 0.1 0.2 --seeds 0 1 2     # hours on one CPU core
    python benchmarks/frontier.py --device cuda ...                                  # minutes on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend
import torch
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from accuracy_vs_time import accuracy, autoattack_subset, cache_file, flagged_by, train
from lightning.pytorch import LightningModule

from freeadv_pl import (
    AttackSpec,
    AutoAttackSpec,
    FashionMNISTDataModule,
    FastAdversarialModule,
    FreeAdversarialModule,
    NaturalModule,
    NoiseFGSMModule,
    PGDAdversarialModule,
    PriorGuidedFGSMModule,
)

Row = tuple[type[LightningModule], Callable[[int], int], Callable[[float], dict[str, Any]], float, bool]
"""(module class, epochs from N, module arguments from ε, peak lr, every seed (False: the first seed only))."""


def _free_recipe(epsilon: float) -> dict[str, Any]:
    return {"replays": 4, "epsilon": epsilon, "step_size": epsilon / 2, "delta_memory": "example",
            "delta_start_noise": 1.0}


def rows() -> dict[str, Row]:
    """The grid's rows, in the order they run and are reported."""
    table: dict[str, Row] = {
        "natural": (NaturalModule, lambda n: n, lambda eps: {}, 0.05, True),
        "Free-4 recipe, lr 0.05 (shipped)": (FreeAdversarialModule, lambda n: n // 4, _free_recipe, 0.05, True),
        "Free-4 recipe, lr 0.02": (FreeAdversarialModule, lambda n: n // 4, _free_recipe, 0.02, True),
        "Free-4 recipe, lr 0.01": (FreeAdversarialModule, lambda n: n // 4, _free_recipe, 0.01, True),
        "Free-4, the paper's batch δ": (
            FreeAdversarialModule, lambda n: n // 4,
            lambda eps: {"replays": 4, "epsilon": eps, "step_size": eps / 2}, 0.02, True,
        ),
        "FGSM-RS": (
            FastAdversarialModule, lambda n: n // 2, lambda eps: {"epsilon": eps, "step_size": 1.25 * eps}, 0.1, True
        ),
        "N-FGSM": (
            NoiseFGSMModule, lambda n: n // 2, lambda eps: {"epsilon": eps, "step_size": eps, "noise_scale": 2.0},
            0.1, True,
        ),
        "FGSM-MEP": (
            PriorGuidedFGSMModule, lambda n: n // 3,  # 3 passes per batch: N/3 epochs, rounded down
            lambda eps: {"epsilon": eps, "step_size": eps, "label_smoothing": 4 / 9}, 0.1, True,
        ),
        "7-PGD, natural's cost": (
            PGDAdversarialModule, lambda n: n // 8, lambda eps: {"steps": 7, "epsilon": eps, "step_size": eps / 4},
            0.1, True,
        ),
        "7-PGD, 7× natural's cost": (
            PGDAdversarialModule, lambda n: n, lambda eps: {"steps": 7, "epsilon": eps, "step_size": eps / 4},
            0.1, False,
        ),
    }
    return table


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=32, help="N, natural training's epochs (a multiple of 8)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=None, help="run only these rows, by name")
    parser.add_argument("--train-size", type=int, default=20000, help="training images")
    parser.add_argument("--test-size", type=int, default=None, help="a seeded subset of the test set (default: all)")
    parser.add_argument("--autoattack-size", type=int, default=1000, help="test images for AutoAttack/APGD; 0: none")
    parser.add_argument("--collapse-below", type=float, default=10.0, help="PGD-20 %% under which a run collapsed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", type=Path, default=None, help="keep trained models here; one there is loaded")
    parser.add_argument("--note", default=None, help="a note on the machine for the results file")
    parser.add_argument("--out", default=None, help="results path without suffix (.json, .md, .png)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="join these results .json into --out")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS / f"frontier_{args.device}"
    if args.merge:
        parts = [json.loads(part.read_text()) for part in args.merge]
        info = {**parts[0]["machine"], "parts": [part["machine"] for part in parts]}
        runs, seen = [], set()
        for run in (run for part in parts for run in part["rows"]):  # a run in several parts counts once (the first)
            if (run["method"], run["epsilon"], run["seed"]) not in seen:
                seen.add((run["method"], run["epsilon"], run["seed"]))
                runs.append(run)
        _write(runs, info, out, args.collapse_below)
        return runs
    if args.epochs < 8 or args.epochs % 8:
        parser.error(f"--epochs must be a multiple of 8 (7-PGD at natural's cost runs N/8), got {args.epochs}")
    table = rows()
    unknown = set(args.rows or []) - set(table)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; the rows are {list(table)}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:6.1f} min] {message}", flush=True)

    data = FashionMNISTDataModule(
        batch_size=128, train_size=args.train_size, val_size=5000, test_size=args.test_size, seed=0, return_index=True
    )
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    subset = autoattack_subset(data.test_set, args.autoattack_size, 0) if args.autoattack_size else None
    info = machine(args.device, args) | {
        "schedule": "SGD momentum 0.9, weight decay 5e-4, batch 128; one-cycle lr, linear up over 40 % of the steps",
        "training_images": len(data.train_set),
        "test_images": len(data.test_set),
        "collapse": f"PGD-20 accuracy below {args.collapse_below:g} %",
    }
    runs: list[dict[str, Any]] = []
    if out.with_suffix(".json").is_file():
        runs = json.loads(out.with_suffix(".json").read_text())["rows"]
    done = {(run["method"], run["epsilon"], run["seed"]) for run in runs}
    for epsilon in args.epsilons:
        attacks = {"natural": AttackSpec(steps=0), "PGD-20": AttackSpec(steps=20, step_size=epsilon / 4)}
        info[f"attacks at ε = {epsilon:g}"] = {key: attack.describe(epsilon) for key, attack in attacks.items()}
        for name, (module_class, epochs_of, arguments_of, lr, every_seed) in table.items():
            if args.rows and name not in args.rows:
                continue
            for seed in args.seeds if every_seed else args.seeds[:1]:
                if (name, epsilon, seed) in done:
                    continue
                epochs, arguments = epochs_of(args.epochs), arguments_of(epsilon)
                log(f"ε = {epsilon:g}, {name}, seed {seed}: {epochs} epochs, peak lr {lr:g}")
                cache = cache_file(args.models, f"{name} eps{epsilon:g} seed{seed}", epochs, lr)
                module, cost = train(module_class, epochs, arguments, lr, data, seed, cache, args.device)
                run: dict[str, Any] = {"method": name, "epsilon": epsilon, "seed": seed, "epochs": epochs,
                                       "arguments": arguments, **cost}
                if not cost["diverged"]:
                    run.update(accuracy(module, data.test_set, attacks, seed, epsilon))
                    if subset is not None:
                        spec = AutoAttackSpec() if seed == args.seeds[0] else AutoAttackSpec(version="apgd")
                        column = "AutoAttack" if spec.version == "standard" else "APGD-CE+DLR"
                        run.update(accuracy(module, subset, {column: spec}, seed, epsilon))
                        run[f"{column} images"] = len(subset)
                    run["collapsed"] = name != "natural" and run["PGD-20"] < args.collapse_below
                runs.append(run)
                scores = ", ".join(f"{key} {run[key]:.2f}" for key in ("natural", "PGD-20", "AutoAttack",
                                                                       "APGD-CE+DLR") if key in run)
                log(f"  {cost['cpu_minutes']:.2f} CPU min; {scores or 'diverged'}")
                info["total_minutes"] = (time.perf_counter() - start) / 60.0
                _write(runs, info, out, args.collapse_below)
    log(f"done; results in {out}.json, .md and .png")
    return runs


def summarise(runs: list[dict[str, Any]], collapse_below: float) -> list[dict[str, Any]]:
    """One line per (ε, method): mean and spread (max − min) over its seeds, and the seeds that collapsed."""
    order = {name: rank for rank, name in enumerate(rows())}
    keys = sorted({(run["epsilon"], run["method"]) for run in runs}, key=lambda k: (k[0], order.get(k[1], 99)))
    lines = []
    for epsilon, method in keys:
        group = [run for run in runs if run["epsilon"] == epsilon and run["method"] == method]
        line: dict[str, Any] = {"epsilon": epsilon, "method": method, "seeds": len(group),
                                "cpu_minutes": statistics.fmean(run["cpu_minutes"] for run in group)}
        for key in ("natural", "PGD-20", "AutoAttack", "APGD-CE+DLR"):
            values = [run[key] for run in group if key in run]
            if values:
                line[key] = f"{statistics.fmean(values):.1f} ± {max(values) - min(values):.1f}" if len(values) > 1 \
                    else f"{values[0]:.1f}"
                line[f"{key} mean"] = statistics.fmean(values)
        collapsed = [str(run["seed"]) for run in group if run.get("diverged") or run["PGD-20"] < collapse_below]
        line["collapsed seeds"] = "(not adversarial)" if method == "natural" else ", ".join(collapsed) or "none"
        lines.append(line)
    return lines


def _write(runs: list[dict[str, Any]], info: dict[str, Any], out: Path, collapse_below: float) -> None:
    lines = summarise(runs, collapse_below)
    columns = [("epsilon", "ε"), ("method", "method"), ("seeds", "seeds"), ("cpu_minutes", "CPU min (mean)"),
               ("natural", "natural % (mean ± spread)"), ("PGD-20", "PGD-20 % (mean ± spread)"),
               ("AutoAttack", "AutoAttack % (first seed)"), ("APGD-CE+DLR", "APGD-CE+DLR % (other seeds)"),
               ("collapsed seeds", "collapsed seeds")]
    table = markdown_table(lines, columns)
    per_run = markdown_table(
        [run | {"flagged by": flagged_by(run)} for run in
         sorted(runs, key=lambda run: (run["epsilon"], run["method"], run["seed"]))],
        [("epsilon", "ε"), ("method", "method"), ("seed", "seed"), ("epochs", "epochs"), ("cpu_minutes", "CPU min"),
         ("natural", "natural %"), ("PGD-20", "PGD-20 %"), ("AutoAttack", "AutoAttack %"),
         ("APGD-CE+DLR", "APGD-CE+DLR %"), ("flagged by", "AutoAttack's flags"), ("lr", "peak lr")],
    )
    arguments = info.get("arguments", {})
    title = (f"The cheap-AT frontier, Fashion-MNIST, SmallCNN, N = {arguments.get('epochs')} natural epochs on "
             f"{info.get('training_images')} images")
    write_results(out, title, info, runs, table + "\n\nEvery run:\n\n" + per_run)
    _plot(lines, out.with_suffix(".png"), title)
    print(table, flush=True)


def _plot(lines: list[dict[str, Any]], path: Path, title: str) -> None:
    epsilons = sorted({line["epsilon"] for line in lines})
    figure, axes = plt.subplots(1, len(epsilons), figsize=(6 * len(epsilons), 5), squeeze=False)
    for axis, epsilon in zip(axes[0], epsilons, strict=True):
        for marker, line in zip("osD^v<>ph*PX" * 2, [x for x in lines if x["epsilon"] == epsilon], strict=False):
            if "PGD-20 mean" in line:
                axis.scatter(line["cpu_minutes"], line["PGD-20 mean"], marker=marker, s=60,
                             label=f"{line['method']} ({line['PGD-20']})")
        axis.set_xscale("log")
        axis.set_xlabel("training CPU minutes (mean over seeds, log scale)")
        axis.set_ylabel("PGD-20 accuracy on the test set, % (mean over seeds)")
        axis.set_title(f"ε = {epsilon:g}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title.replace(", SmallCNN", ",\nSmallCNN"), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    quiet_lightning()
    main()
