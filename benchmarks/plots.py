"""The plots of ``benchmarks/README.md`` that the benchmark scripts do not write themselves, redrawn from the committed
results files (``results/*.json``) alone: no training, no torch, seconds on any machine.

    python benchmarks/plots.py                  # writes them into benchmarks/results/
    python benchmarks/plots.py --out /tmp/p     # anywhere else

- ``frontier_cpu_N32_seeds.png`` (section 10): PGD-20 accuracy against training CPU time per method, one panel per
  ε, every seed as a point and the mean with a bar over the seeds' range (min to max: the table's "spread"), and
  each seed's accuracy under AutoAttack or the APGD preset where it was measured.
- ``paper_budget_autoattack.png`` (section 6b): natural, PGD-20 and AutoAttack accuracy of each N = 80 model, the
  CPU models and the H200 run side by side.
- ``recipe_seeds.png`` (section 9): PGD-20 accuracy of each shipped recipe at each seed, with the mean and range.
- ``collapse_signals_cpu.png`` (section 11): per epoch, Free-4's attack gain (with the alarm's threshold) and the PGD
  guard's accuracy, for the seeded runs that collapse and the shipped recipe's.

The scripts' own plots (``accuracy_vs_time.py``: section 3; ``paper_budget.py``: sections 6 and 6a; ``frontier.py``:
means only) are written by those scripts when they run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend

RESULTS = Path(__file__).resolve().parent / "results"

# The frontier's rows in the order frontier.py reports them (frontier.rows(); not imported: it needs torch).
FRONTIER_ORDER = [
    "natural",
    "Free-4 recipe, lr 0.05 (shipped)",
    "Free-4 recipe, lr 0.02",
    "Free-4 recipe, lr 0.01",
    "Free-4, the paper's batch δ",
    "FGSM-RS",
    "N-FGSM",
    "FGSM-MEP",
    "7-PGD, natural's cost",
    "7-PGD, 7× natural's cost",
]

# recipe_seeds_<stem>.json: the row's name in section 9's table, in that table's order.
RECIPES = [
    ("free_multistep_lr0_05", "Free-4, MultiStepLR from 0.05 (the config before) ¹"),
    ("free_multistep_lr0_05_noise0_5", "Free-4, the same, restart ρ = 0.5"),
    ("free_multistep_lr0_02", "Free-4, MultiStepLR from 0.02"),
    ("free_onecycle_lr0_02", "Free-4, one cycle peaking at 0.02"),
    ("free_onecycle_lr0_05", "Free-4, one cycle peaking at 0.05: free.yaml now"),
    ("fgsm_rs", "FGSM-RS, fgsm_rs.yaml"),
    ("nfgsm", "N-FGSM, nfgsm.yaml"),
    ("mep", "FGSM-MEP, mep.yaml"),
    ("free_m2_multistep_lr0_05", "Free-2, 6 epochs, MultiStepLR from 0.05"),
    ("free_m2_onecycle_lr0_05", "Free-2, 6 epochs, one cycle to 0.05"),
    ("free_m8_multistep_lr0_05", "Free-8, 1.5 epochs, MultiStepLR from 0.05"),
    ("free_m8_onecycle_lr0_05", "Free-8, 1.5 epochs, one cycle to 0.05"),
]

SEED_MARKERS = "os^Dv"


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _dates(info: dict[str, Any]) -> str:
    """The day or days a results file was measured on (its merged parts' dates, else its own)."""
    days = sorted({part["date"][:10] for part in info.get("parts", [])} or {info["date"][:10]})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _device(info: dict[str, Any]) -> str:
    """The device as the results file records it, with the CPU's cores and torch threads where it ran on a CPU."""
    if info["device"].startswith("CPU"):
        threads = info["torch_threads"]
        return (
            f"{info['device']}, {info['cpu_cores_visible']} cores, {threads} torch thread{'s' * (threads != 1)} per run"
        )
    return info["device"]


def plot_frontier(results: Path, out: Path) -> Path:
    """Section 10: PGD-20 against training CPU time per method, per ε; every seed, and the mean with its range; the
    stronger attacks' accuracy of each seed where measured."""
    data = _load(results / "frontier_cpu_N32.json")
    info, runs = data["machine"], data["rows"]
    epsilons = sorted({run["epsilon"] for run in runs})
    rank = {name: index for index, name in enumerate(FRONTIER_ORDER)}
    methods = sorted({run["method"] for run in runs}, key=lambda name: (rank.get(name, len(rank)), name))
    colours = {name: f"C{index % 10}" for index, name in enumerate(methods)}
    markers = dict(zip(methods, "osD^v<>ph*PX" * 2, strict=False))
    figure, axes = plt.subplots(1, len(epsilons), figsize=(6.5 * len(epsilons), 5.8), squeeze=False)
    for axis, epsilon in zip(axes[0], epsilons, strict=True):
        for method in methods:
            group = [run for run in runs if run["epsilon"] == epsilon and run["method"] == method]
            if not group:
                continue
            minutes = [run["cpu_minutes"] for run in group]
            robust = [run["PGD-20"] for run in group]
            colour, marker = colours[method], markers[method]
            axis.scatter(minutes, robust, s=30, marker=marker, facecolors="none", edgecolors=colour, linewidths=1)
            strongest = [(run["cpu_minutes"], run.get("AutoAttack", run.get("APGD-CE+DLR"))) for run in group]
            strongest = [point for point in strongest if point[1] is not None]
            if strongest:
                axis.scatter(*zip(*strongest, strict=True), s=40, marker="x", color=colour, linewidths=1)
            mean = statistics.fmean(robust)
            spread = max(robust) - min(robust)
            label = f"{method}: {mean:.1f}" + (
                f" ± {spread:.1f} ({len(group)} seeds)" if len(group) > 1 else " (1 seed)"
            )
            axis.errorbar(
                statistics.fmean(minutes),
                mean,
                yerr=[[mean - min(robust)], [max(robust) - mean]],
                fmt=marker,
                color=colour,
                markersize=8,
                capsize=4,
                label=label,
            )
        axis.axhline(info.get("arguments", {}).get("collapse_below", 10.0), color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("training CPU time (minutes of fit, 1 torch thread)")
        axis.set_ylabel(f"PGD-20 accuracy (%), ε = {epsilon:g}")
        axis.set_ylim(-3, 100)
        axis.set_title(
            f"PGD-20: CE loss, ε = {epsilon:g}, step ε/4, 1 random start, {info['test_images']:,} test images\n"
            "hollow: each seed; filled: the mean, bar from min to max; dotted: the collapse line\n"
            "×: AutoAttack (first seed) or APGD-CE+DLR (other seeds) on 1,000 of the test images",
            fontsize=8,
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
    epochs = info.get("arguments", {}).get("epochs")
    figure.suptitle(
        f"The cheap-AT frontier: Fashion-MNIST, SmallCNN, N = {epochs} natural epochs' cost, "
        f"{info['training_images']:,} training images\n{_device(info)}; {_dates(info)}",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(figure, out / "frontier_cpu_N32_seeds.png")


def plot_autoattack(results: Path, out: Path) -> Path:
    """Section 6b: natural, PGD-20 and AutoAttack accuracy of each N = 80 model, CPU and H200."""
    cpu = _load(results / "paper_budget_cpu_eps0_1_autoattack.json")
    gpu_path = results / "paper_budget_cuda_eps0_1_autoattack_free.json"
    parts = [(cpu["machine"], row) for row in cpu["rows"]]
    if gpu_path.is_file():
        gpu = _load(gpu_path)
        parts += [(gpu["machine"], row) for row in gpu["rows"]]
    test_images = f"{cpu['machine']['test_images']:,} test images"
    columns = [
        ("natural", f"natural (clean) accuracy, {test_images}"),
        ("PGD-20", f"PGD-20 (CE loss, step 0.025, 1 random start), {test_images}"),
        ("PGD-20 (AA images)", "PGD-20, the same attack on AutoAttack's 1,000 seeded test images"),
        ("AutoAttack", "AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), 1,000 seeded test images"),
    ]
    figure, axis = plt.subplots(figsize=(11, 6.5))
    width = 0.8 / len(columns)
    for index, (key, label) in enumerate(columns):
        positions = [group + (index - (len(columns) - 1) / 2) * width for group in range(len(parts))]
        values = [row.get(key, float("nan")) for _, row in parts]
        bars = axis.bar(positions, values, width=width, label=label, color=f"C{index}")
        axis.bar_label(bars, labels=[f"{value:g}" for value in values], fontsize=7, padding=1)
    names = []
    for info, row in parts:
        where = "CPU" if info["device"].startswith("CPU") else info["device"].replace("NVIDIA ", "")
        code = "official code" if "official" in info["attacks"]["AutoAttack"] else "torchattacks' port"
        names.append(
            f"{row['method']}\n{row['epochs']} epochs, {row['passes']:,} passes\n{where}, {_dates(info)}\n"
            f"AutoAttack: {code}"
        )
    axis.set_xticks(range(len(parts)), names, fontsize=7)
    axis.set_ylabel("accuracy (%), L∞ ε = 0.1")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    info = cpu["machine"]
    axis.set_title(
        f"AutoAttack at the paper's budget ratio: Fashion-MNIST, SmallCNN, N = {info['arguments']['epochs']} "
        f"natural epochs' cost, seed {info['arguments']['seed']}\nCPU rows: {_device(info)}; "
        f"the last: {parts[-1][0]['device']}",
        fontsize=9,
    )
    figure.tight_layout()
    return _save(figure, out / "paper_budget_autoattack.png")


def plot_recipe_seeds(results: Path, out: Path) -> Path:
    """Section 9: PGD-20 accuracy of each recipe at each seed, the mean and the range over its seeds."""
    found = [
        (label, _load(results / f"recipe_seeds_{stem}.json"))
        for stem, label in RECIPES
        if (results / f"recipe_seeds_{stem}.json").is_file()
    ]
    if not found:
        raise FileNotFoundError(f"no recipe_seeds_*.json of section 9 in {results}: run benchmarks/recipe_seeds.py")
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(found) + 2.8))
    seeds_seen: set[int] = set()
    mean_labelled = False
    for position, (_, data) in enumerate(found):
        robust = {row["seed"]: row["PGD-20"] for row in data["rows"]}
        for seed, value in sorted(robust.items()):
            axis.scatter(
                value,
                position,
                marker=SEED_MARKERS[seed % len(SEED_MARKERS)],
                s=40,
                facecolors="none",
                edgecolors=f"C{seed}",
                label=None if seed in seeds_seen else f"seed {seed}",
                zorder=3,
            )
            seeds_seen.add(seed)
        if len(robust) > 1:
            values = list(robust.values())
            axis.plot([min(values), max(values)], [position, position], color="grey", linewidth=1, zorder=1)
            axis.scatter(
                statistics.fmean(values),
                position,
                marker="|",
                s=300,
                color="black",
                zorder=2,
                label=None if mean_labelled else "mean over the seeds; line: min to max",
            )
            mean_labelled = True
    axis.set_yticks(range(len(found)), [label for label, _ in found], fontsize=8)
    axis.invert_yaxis()
    attack = next(
        (row["attacks"]["PGD-20"] for _, data in found for row in data["rows"] if "attacks" in row),
        "PGD-20 (CE loss, ε = 0.1, step 0.0125, 1 random start) on 2000 test images",
    )
    axis.set_xlabel(f"PGD-20 accuracy (%), ε = 0.1: {attack}", fontsize=9)
    axis.grid(alpha=0.3, axis="x")
    handles, labels = axis.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda index: labels[index])  # seed 0, 1, 2, then the mean
    axis.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncol=4,
    )
    info = found[0][1]["machine"]
    days = sorted({_dates(data["machine"]) for _, data in found})
    axis.set_title(
        "The shipped Fashion-MNIST recipes at several seeds: SmallCNN, 12 natural epochs' cost each\n"
        f"{_device(info)}; {', '.join(days)}",
        fontsize=9,
    )
    figure.text(
        0.01,
        0.01,
        "¹ seeds 0 and 2 of this row are not in the results files (benchmarks/README.md, section 9)",
        fontsize=7,
    )
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(figure, out / "recipe_seeds.png")


def plot_collapse_signals(results: Path, out: Path) -> Path:
    """Section 11: the attack gain and the PGD guard's accuracy per epoch, collapsing and healthy runs, every seed."""
    path = results / "collapse_signals_cpu.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} of section 11 in {results}: run benchmarks/collapse_signals.py")
    data = _load(path)
    threshold = data["machine"]["arguments"]["gain_threshold"]
    figure, (gain_axis, pgd_axis) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = {"collapse": "tab:red", "recipe": "tab:blue"}
    names = {
        "collapse": "Free-4, per-example δ, ε_step = ε, lr 0.05 (collapses)",
        "recipe": "the shipped Free-4 recipe (healthy)",
    }
    labelled: set[str] = set()
    for row in data["rows"]:
        label = None if row["run"] in labelled else names[row["run"]]
        labelled.add(row["run"])
        epochs = range(len(row["attack_gain"]))
        style = {"color": colours[row["run"]], "marker": "o", "alpha": 0.8}
        gain_axis.plot(epochs, row["attack_gain"], label=label, **style)
        pgd_axis.plot(epochs, [100 * value for value in row["pgd5"]], label=label, **style)
    gain_axis.axhline(threshold, color="gray", linestyle=":", label=f"gain_threshold {threshold:g}")
    gain_axis.set(xlabel="epoch", ylabel="train/attack_gain (last replay's loss / first's)")
    gain_axis.set_title("Free-4's attack gain per epoch (no attack run)", fontsize=9)
    pgd_axis.set(xlabel="epoch", ylabel="PGD-5 accuracy (%), ε = 0.1", ylim=(0, 100))
    pgd_axis.set_title("The PGD guard: PGD-5 (CE, step ε/4, 1 random start) on its training batch", fontsize=9)
    for axis in (gain_axis, pgd_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(
        "Attack-free alarm for Free-m's collapse: Fashion-MNIST, SmallCNN, 5,000 images, seeds "
        f"{', '.join(str(seed) for seed in data['machine']['arguments']['seeds'])}\n"
        f"{_device(data['machine'])}; {_dates(data['machine'])}",
        fontsize=9,
    )
    figure.tight_layout()
    return _save(figure, out / "collapse_signals_cpu.png")


PLOTS = {
    "frontier_cpu_N32_seeds.png": plot_frontier,
    "paper_budget_autoattack.png": plot_autoattack,
    "recipe_seeds.png": plot_recipe_seeds,
    "collapse_signals_cpu.png": plot_collapse_signals,
}


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Redraw every plot in :data:`PLOTS` from ``--results`` into ``--out``; returns the files written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files (.json)")
    parser.add_argument("--out", type=Path, default=None, help="folder to write the PNGs into (default: --results)")
    parser.add_argument("--only", nargs="+", choices=sorted(PLOTS), default=None, help="draw only these")
    args = parser.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    written = [plot(args.results, out) for name, plot in PLOTS.items() if args.only is None or name in args.only]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
