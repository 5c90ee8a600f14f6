"""Smoke tests: each benchmark script runs on a tiny size (performance targets live in the benchmarks, not here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import needs_fashion_mnist, tiny_cnn, tiny_dataset

from freeadv_pl import AutoAttackSpec
from freeadv_pl.autoattack import AutoAttackWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy_vs_time  # benchmarks/ is a folder of scripts, not a package
import autoattack_implementations
import collapse_signals
import free_cifar10_run
import frontier
import lightning_overhead
import loader_cost
import paper_budget
import recipe_seeds
import step_cost


def test_step_cost_runs_on_a_tiny_size(tmp_path):
    rows = step_cost.main(
        ["--batches", "3", "--rounds", "1", "--batch-size", "4", "--replays", "2", "--out", str(tmp_path / "step_cost")]
    )
    assert [row["method"] for row in rows] == ["natural", "Free-2", "PGD-3", "PGD-7", "FGSM-RS"]
    assert [row["passes_per_batch"] for row in rows] == [1, 2, 4, 8, 2]
    assert all(row["step_ms"] > 0 for row in rows) and rows[0]["step_ratio"] == 1.0
    saved = json.loads((tmp_path / "step_cost.json").read_text())
    assert saved["machine"]["arguments"]["batch_size"] == 4 and len(saved["rows"]) == 5
    assert "| Free-2 | 2 |" in (tmp_path / "step_cost.md").read_text()


def test_loader_cost_runs_on_a_tiny_size(tmp_path):
    rows = loader_cost.main(["--workers", "0", "--rounds", "1", "--train-size", "512", "--out", str(tmp_path / "lc")])
    assert [row["loader"] for row in rows] == list(loader_cost.LOADERS)
    assert rows[0]["ratio"] == 1.0 and all(row["us_per_batch"] > 0 and row["batches_timed"] == 3 for row in rows)
    assert "| 0 | StatefulDataLoader + seeded order (default) |" in (tmp_path / "lc.md").read_text()


def test_lightning_overhead_runs_on_a_tiny_size_and_both_loops_agree(tmp_path):
    rows = lightning_overhead.main(
        [
            "--batch-size",
            "4",
            "--replays",
            "2",
            "--warmup",
            "1",
            "--batches",
            "2",
            "--repeats",
            "1",
            "--out",
            str(tmp_path / "overhead"),
        ]
    )
    assert rows[0]["run"] == "raw PyTorch loop" and len(rows) == 3
    # The module and the plain loop compute the same weights (the benchmark's own check, here asserted).
    assert all(row["max_weight_difference_to_raw"] < 1e-6 for row in rows)
    assert (tmp_path / "overhead.md").is_file()


def test_the_whole_run_script_runs_on_a_tiny_size(tmp_path):
    summary = free_cifar10_run.main(
        [
            "--device",
            "cpu",
            "--precision",
            "32-true",
            "--epochs",
            "1",
            "--train-size",
            "32",
            "--batch-size",
            "16",
            "--replays",
            "2",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert summary["optimizer_steps"] == 4 and summary["passes"] == 4 and summary["batches"] == 2
    assert (tmp_path / "run.json").is_file()


@needs_fashion_mnist
def test_accuracy_vs_time_runs_on_a_tiny_size(tmp_path):
    out = tmp_path / "accuracy"
    arguments = ["--train-size", "512", "--val-size", "128", "--val-eval-size", "64", "--test-size", "64"]
    arguments += ["--autoattack-size", "8"]
    threads = torch.get_num_threads()
    try:  # one thread, the script's default: two oversubscribe a busy 2-core machine (measured 10× slower)
        rows = accuracy_vs_time.main([*arguments, "--lr-grid", "0.05", "--note", "a test", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # main sets the process's thread count
    methods = ["natural", "Free-2", "Free-4", "Free-8", "PGD-7", "PGD-7, natural's cost", "FGSM-RS"]
    assert [row["method"] for row in rows] == methods
    # The budget rule in the numbers: every row but the N-epoch PGD-7 costs natural training's passes.
    passes = {row["method"]: row["passes"] for row in rows}
    assert passes["PGD-7"] == 8 * passes["natural"] and passes["Free-8"] == passes["FGSM-RS"] == passes["natural"]
    assert all(0 <= row[key] <= 100 for row in rows for key in ("natural", "PGD-20", "CW-20", "AutoAttack"))
    assert all(row["AutoAttack"] <= row["PGD-20 (AA images)"] for row in rows)
    assert all(row["lr"] == 0.05 and len(row["grid"]) == 1 and row["cpu_minutes"] > 0 for row in rows)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["machine"]["attacks"]["PGD-20"] == "PGD-20 (CE loss, ε = 0.1, step 0.025, 1 random start)"
    assert [row["method"] for row in saved["rows"]] == methods and saved["machine"]["test_images"] == 64
    table = out.with_suffix(".md").read_text()
    assert "| CW-20 (CW loss, ε = 0.1, step 0.025, 1 random start) % |" in table and "- note: a test" in table
    assert all(f"| {method} | " in table for method in methods)
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_the_benchmarks_record_autoattacks_flags_of_each_run_only():
    model = torch.nn.Sequential(tiny_cnn(10), torch.nn.Softmax(dim=1))  # probabilities: the official checks flag it
    spec, dataset = AutoAttackSpec(steps=3, queries=10), tiny_dataset(8, num_classes=10)
    with pytest.warns(AutoAttackWarning, match="probability distribution"):
        first = accuracy_vs_time.accuracy(SimpleNamespace(model=model), dataset, {"AutoAttack": spec}, 0)
    (flag,) = first["AutoAttack flags"]
    assert flag.startswith("checks: it seems that the output is a probability distribution")
    assert accuracy_vs_time.flagged_by(first) == "checks" and accuracy_vs_time.flagged_by({}) == ""
    model[1] = torch.nn.Identity()  # logits: no flag, and none left over from the first run in the shared spec
    assert "AutoAttack flags" not in accuracy_vs_time.accuracy(SimpleNamespace(model=model), dataset, {"AA": spec}, 0)


@needs_fashion_mnist
def test_paper_budget_runs_on_a_tiny_size_and_merges_its_parts(tmp_path):
    sizes = ["--train-size", "256", "--val-size", "128", "--val-eval-size", "32", "--test-size", "64", "--epochs", "8"]
    sizes += ["--autoattack-size", "8", "--models", str(tmp_path / "models")]
    recipes = ["--free", "m=8,memory=example,step=0.5,noise=1", "--free", "m=4,memory=batch,reset=1,warmup=1"]
    threads = torch.get_num_threads()
    try:
        first = paper_budget.main([*sizes, *recipes, "--methods", "natural", "Free", "--out", str(tmp_path / "a")])
        second = paper_budget.main([*sizes, "--methods", "FGSM-RS", "PGD-7", "--out", str(tmp_path / "b")])
    finally:
        torch.set_num_threads(threads)  # main sets the process's thread count
    names = ["natural", "Free-8 example, step 0.5ε, noise 1", "Free-4 batch, step 1ε, reset 1, warmup 1"]
    assert [row["method"] for row in first] == names and [row["method"] for row in second] == ["FGSM-RS", "PGD-7"]
    assert first[1]["arguments"] == {
        "replays": 8,
        "epsilon": 0.1,
        "step_size": 0.05,
        "delta_memory": "example",
        "delta_start_noise": 1.0,
        "norm": "linf",
    }
    assert first[2]["arguments"]["delta_reset_every"] == 1 and first[2]["arguments"]["epsilon_warmup_epochs"] == 1
    # The budget rule: natural 8 epochs, Free-8 1 epoch, FGSM-RS 4: the same passes; PGD-7 8× them.
    assert first[0]["passes"] == first[1]["passes"] == second[0]["passes"] == second[1]["passes"] // 8
    assert all(0 <= row[key] <= 100 for row in first + second for key in ("validation_pgd10", "PGD-20", "CW-20"))
    try:
        merged = paper_budget.main(
            ["--merge", str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "m")]
        )
    finally:
        torch.set_num_threads(threads)
    assert [row["method"] for row in merged] == [*names, "FGSM-RS", "PGD-7"]
    assert merged[0]["cost_vs_natural"] == 1.0 and merged[-1]["cost_vs_natural"] > 1
    saved = json.loads((tmp_path / "m.json").read_text())
    assert len(saved["machine"]["parts"]) == 2 and saved["machine"]["training_images"] == 256
    assert "| Free-8 example, step 0.5ε, noise 1 | 1 |" in (tmp_path / "m.md").read_text()
    assert "AutoAttack, standard version" in (tmp_path / "m.md").read_text()
    # --models: a second run loads the trained models instead of training them, and scores them alike (here with
    # torchattacks' port of AutoAttack).
    try:
        port = ["--autoattack-implementation", "torchattacks"]
        again = paper_budget.main([*sizes, "--methods", "FGSM-RS", *port, "--out", str(tmp_path / "c")])
    finally:
        torch.set_num_threads(threads)
    assert again[0]["cpu_minutes"] == second[0]["cpu_minutes"] and again[0]["PGD-20"] == second[0]["PGD-20"]
    scored_by = json.loads((tmp_path / "c.json").read_text())["machine"]["attacks"]["AutoAttack"]
    assert "torchattacks 3.5.1's port" in scored_by
    assert (tmp_path / "m.png").stat().st_size > 10_000
    # In L2 with TRADES rows: Free-2 TRADES (two passes a replay) runs N/4 epochs, natural's passes.
    l2 = [*sizes, "--norm", "l2", "--epsilon", "1.5", "--trades-pgd", "--free", "m=2,loss=trades"]
    try:
        rows = paper_budget.main(
            [*l2, "--methods", "natural", "Free", "PGD-10 TRADES, natural's cost", "--out", str(tmp_path / "l2")]
        )
    finally:
        torch.set_num_threads(threads)
    assert [row["method"] for row in rows] == [
        "natural",
        "PGD-10 TRADES, natural's cost",
        "Free-2 batch, step 1ε, loss trades",
    ]
    assert rows[2]["epochs"] == 2 and rows[2]["passes"] == rows[0]["passes"]
    assert rows[1]["arguments"] == {"steps": 10, "epsilon": 1.5, "step_size": 0.375, "loss": "trades", "norm": "l2"}
    saved = json.loads((tmp_path / "l2.json").read_text())
    assert saved["machine"]["attacks"]["PGD-20"] == "PGD-20 (CE loss, L2 ε = 1.5, step 0.375, 1 random start)"
    assert "L2 ε = 1.5" in saved["machine"]["attacks"]["AutoAttack"]


@needs_fashion_mnist
def test_frontier_runs_on_a_tiny_size_goes_on_where_it_stopped_and_merges(tmp_path):
    sizes = ["--train-size", "256", "--test-size", "64", "--epochs", "8", "--autoattack-size", "8"]
    threads = torch.get_num_threads()
    try:
        first = frontier.main([*sizes, "--rows", "natural", "N-FGSM", "--seeds", "0", "--out", str(tmp_path / "a")])
        more = frontier.main([*sizes, "--rows", "natural", "N-FGSM", "--seeds", "0", "1", "--out", str(tmp_path / "a")])
        other = frontier.main(
            [
                *sizes,
                "--rows",
                "7-PGD, 7× natural's cost",
                "--seeds",
                "0",
                "1",
                "--epsilons",
                "0.2",
                "--out",
                str(tmp_path / "b"),
            ]
        )
    finally:
        torch.set_num_threads(threads)  # main sets the process's thread count
    assert [(run["epsilon"], run["method"]) for run in first] == [
        (0.1, "natural"),
        (0.1, "N-FGSM"),
        (0.2, "natural"),
        (0.2, "N-FGSM"),
    ]
    assert len(first) == 4 and len(more) == 8, "ε 0.1 and 0.2 by default; seed 0 is not trained again"
    assert [run["cpu_minutes"] for run in more[:4]] == [run["cpu_minutes"] for run in first]
    assert len(other) == 1 and other[0]["seed"] == 0, "7-PGD at 7× runs at the first seed only"
    # The budget rule: natural 8 epochs, N-FGSM 4 (two passes each), 7-PGD at 7× natural's 8 epochs of 8 passes.
    natural, noisy = (next(run for run in more if run["method"] == name) for name in ("natural", "N-FGSM"))
    assert natural["passes"] == noisy["passes"] == other[0]["passes"] // 8
    assert "AutoAttack" in natural and "APGD-CE+DLR" in more[-1] and "AutoAttack" not in more[-1]
    merged = frontier.main(
        ["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")]
    )
    assert len(merged) == 9
    text = (tmp_path / "m.md").read_text()
    assert "| 0.1 | N-FGSM | 2 |" in text and "collapsed seeds" in text and "± " in text
    assert (tmp_path / "m.png").stat().st_size > 10_000


@needs_fashion_mnist
def test_recipe_seeds_trains_through_the_cli_at_each_seed_and_merges(tmp_path):
    configs = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
    quick = ["--config", str(configs / "free.yaml"), "--config", str(configs / "quick.yaml")]
    threads = torch.get_num_threads()
    try:
        rows = recipe_seeds.main([*quick, "--seeds", "0", "1", "--eval-size", "32", "--out", str(tmp_path / "a")])
        more = recipe_seeds.main(
            [
                *quick,
                "--seeds",
                "2",
                "--eval-size",
                "32",
                "--out",
                str(tmp_path / "b"),
                "--",
                "--model.init_args.lr_scheduler.init_args.max_lr",
                "0.01",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert [row["seed"] for row in rows] == [0, 1] and all(row["optimizer_steps"] == 8 for row in rows)
    assert all(0 <= row["PGD-20"] <= row["natural"] <= 100 for row in rows + more)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["machine"]["extra"] == ["--model.init_args.lr_scheduler.init_args.max_lr", "0.01"]
    merged = recipe_seeds.main(
        ["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")]
    )
    assert [row["seed"] for row in merged] == [0, 1, 2]
    assert "PGD-20 over 3 seeds: mean" in (tmp_path / "m.md").read_text()


def test_plots_redraws_every_missing_plot_from_the_committed_results(tmp_path):
    import matplotlib.image
    import plots

    written = plots.main(["--out", str(tmp_path)])
    assert sorted(path.name for path in written) == sorted(plots.PLOTS)
    for path in written:
        assert path.parent == tmp_path and path.stat().st_size > 10_000
        pixels = matplotlib.image.imread(path)[..., :3]
        assert (pixels < 0.9).any(axis=-1).mean() > 0.01, f"{path.name} is blank"


@needs_fashion_mnist
def test_collapse_signals_records_the_gain_and_the_guards_epochs(tmp_path):
    threads = torch.get_num_threads()
    try:
        rows = collapse_signals.main(
            ["--seeds", "0", "--epochs", "2", "--train-size", "256", "--out", str(tmp_path / "cs")]
        )
    finally:
        torch.set_num_threads(threads)
    assert [row["run"] for row in rows] == ["collapse", "recipe"]
    assert all(len(row["attack_gain"]) == len(row["pgd5"]) == 2 for row in rows)
    assert all(value > 0 for row in rows for value in row["attack_gain"])
    assert collapse_signals.pgd_guard_epoch([0.5, 0.4, 0.25]) == 2
    assert collapse_signals.first_below([1.2, 1.0], 1.05) == 1
    assert "gain < 1.05 first at epoch" in (tmp_path / "cs.md").read_text()


@needs_fashion_mnist
def test_autoattack_implementations_runs_both_on_the_same_images(tmp_path):
    configs = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
    quick = ["--train", "--config", str(configs / "free.yaml"), "--config", str(configs / "quick.yaml")]
    tiny = ["--size", "8", "--batch-size", "4", "--steps", "2", "--queries", "20", "--out", str(tmp_path / "aa")]
    threads = torch.get_num_threads()
    rows = autoattack_implementations.main([*quick, *tiny])
    assert torch.get_num_threads() == threads, "the script's --threads is put back"
    assert [row["implementation"] for row in rows] == ["official", "torchattacks"]
    assert all(row["examples"] == 8 and 0 <= row["robust"] <= row["clean"] for row in rows)
    assert rows[0]["clean"] == rows[1]["clean"], "the same images"
    saved = json.loads((tmp_path / "aa.json").read_text())
    assert saved["machine"]["epsilon"] == 0.1 and saved["machine"]["arguments"]["size"] == 8
    assert 0 <= saved["machine"]["disagreeing_examples"] <= 8
    markdown = (tmp_path / "aa.md").read_text()
    assert "| official | pyautoattack" in markdown and "| torchattacks | torchattacks" in markdown
    assert "Flags of official" in markdown
