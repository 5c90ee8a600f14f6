"""The official AutoAttack against torchattacks' port of it, on the same test images: the two implementations of
:class:`freeadv_pl.AutoAttackSpec` (standard version) on one model, at L∞ ε = 0.1 by default.

The model is a ``freeadv_pl fit`` run's (``--ckpt_path``; rebuilt from the run's ``config.yaml`` beside the
checkpoints folder, or ``--config``, as ``freeadv_pl export`` does), or the shipped Free-4 recipe trained here
(``--train``; other ``--config`` files replace it, arguments after ``--`` go to ``freeadv_pl fit``). Both
implementations attack the same ``--size`` seeded test images (default 1,000), batch ``b`` seeded with
``--seed + b`` as RobustEvaluation seeds it. The result files give the clean accuracy, each implementation's robust
accuracy and the robust accuracy after each of its attacks, how many examples the two judge differently, the
checks' flags (the official code's own checks; torchattacks': the official rule on Square) and the wall time.

    python benchmarks/autoattack_implementations.py --train          # trains configs/fashion_mnist/free.yaml first
    python benchmarks/autoattack_implementations.py --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from freeadv_pl import AutoAttackSpec
from freeadv_pl.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
FREE = ROOT / "configs" / "fashion_mnist" / "free.yaml"
IMPLEMENTATIONS = ("official", "torchattacks")
STAGES = ("APGD-CE", "APGD-T", "FAB-T", "Square")


def trained(configs: list[str], extra: list[str], workdir: Path) -> tuple[nn.Module, Dataset, str]:
    """The model of ``freeadv_pl fit`` on ``configs`` (+ ``extra``), its test set and how it was made."""
    arguments = ["fit", *(item for config in configs for item in ("--config", config))]
    arguments += ["--trainer.default_root_dir", str(workdir), "--trainer.enable_progress_bar", "false", *extra]
    start = time.perf_counter()
    cli = build_cli(arguments)
    minutes = (time.perf_counter() - start) / 60
    cli.datamodule.setup("test")
    made = f"trained here: freeadv_pl fit {' '.join(f'--config {c}' for c in configs)} {' '.join(extra)}".rstrip()
    made += f" ({minutes:.1f} min)"
    return cli.model.model, cli.datamodule.test_set, made


def loaded(ckpt_path: Path, config: Path | None) -> tuple[nn.Module, Dataset, str]:
    """The model of a ``freeadv_pl fit`` checkpoint, rebuilt from the run's config, and its data's test set."""
    config = config or ckpt_path.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        raise ValueError(f"no config for --ckpt_path {ckpt_path}: {config} does not exist; pass --config")
    settings = yaml.safe_load(config.read_text())
    for key in ("ckpt_path", "weights_only"):  # fit's own arguments, not the model's
        settings.pop(key, None)
    cli = build_cli(settings, run=False)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cli.model.load_state_dict(checkpoint["state_dict"], strict=False)
    cli.model.on_load_checkpoint(checkpoint)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("test")
    return cli.model.model, cli.datamodule.test_set, f"checkpoint {ckpt_path} (config {config})"


def evaluate(
    model: nn.Module, loader: DataLoader, spec: AutoAttackSpec, seed: int, device: str
) -> tuple[dict[str, Any], torch.Tensor]:
    """``spec`` on every batch of ``loader`` (batch ``b`` seeded with ``seed + b``): a row of results and the
    per-example robust mask."""
    generator = torch.Generator(device=device)
    stages: dict[str, int] = {}
    masks, flags = [], []
    start = time.perf_counter()
    for number, (x, y) in enumerate(loader):
        generator.manual_seed(seed + number)
        result = spec.run(model, x.to(device), y.to(device), spec.epsilon_for(0.0), generator)
        masks.append(result.robust.cpu())
        for stage, count in result.stages.items():
            stages[stage] = stages.get(stage, 0) + count
        flags += [{"batch": number, "attack": attack, "message": message} for attack, message in result.flags]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    robust = torch.cat(masks)
    examples = len(robust)
    row = {
        "implementation": spec.implementation,
        "code": spec.code,
        "examples": examples,
        "clean": 100.0 * stages["clean"] / examples,
        "robust": 100.0 * float(robust.float().mean()),
        **{f"after {stage}": 100.0 * stages[stage] / examples for stage in STAGES if stage in stages},
        "flag_count": len(flags),
        "seconds": seconds,
        "attack": spec.describe(spec.epsilon_for(0.0)) + f", on {examples} seeded test images",
        "flags": flags,
    }
    return row, robust


def write(rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> None:
    columns = [
        ("implementation", "implementation"),
        ("code", "code"),
        ("clean", "clean %"),
        *((f"after {stage}", f"after {stage} %") for stage in STAGES),
        ("robust", "robust %"),
        ("flag_count", "flags"),
        ("seconds", "seconds"),
    ]
    table = markdown_table(rows, columns)
    if "difference" in info:
        table += (
            f"\n\nofficial − torchattacks: {info['difference']:+.2f} points; the two judge "
            f"{info['disagreeing_examples']} of {rows[0]['examples']} examples differently."
        )
    for row in rows:
        seen: dict[tuple[str, str], int] = {}
        for flag in row["flags"]:
            seen[(flag["attack"], flag["message"])] = seen.get((flag["attack"], flag["message"]), 0) + 1
        lines = [f"- {attack}: {message}" + (f" (×{n})" if n > 1 else "") for (attack, message), n in seen.items()]
        table += f"\n\nFlags of {row['implementation']} ({row['code']}):\n" + ("\n".join(lines) or "- none")
    write_results(out, "AutoAttack: the official code and torchattacks' port on the same images", info, rows, table)
    print(table, flush=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", type=Path, help="a checkpoint of `freeadv_pl fit`")
    source.add_argument("--train", action="store_true", help="train --config (default: the shipped Free-4 recipe)")
    parser.add_argument("--config", action="append", default=None, help="the run's config, or the configs to train")
    parser.add_argument("--size", type=int, default=1000, help="seeded test images attacked")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the attacks")
    parser.add_argument("--steps", type=int, default=100, help="APGD's and FAB's steps (the official 100)")
    parser.add_argument("--queries", type=int, default=5000, help="Square's queries (the official 5,000)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="results path without suffix (.json, .md)")
    parser.add_argument("extra", nargs="*", help="with --train: arguments passed on to `freeadv_pl fit` (after --)")
    args = parser.parse_args(argv)
    if args.ckpt_path is not None and (len(args.config or []) > 1 or args.extra):
        parser.error("with --ckpt_path give at most one --config (the run's) and no fit arguments")
    out = Path(args.out) if args.out else RESULTS / f"autoattack_implementations_{args.device}"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            if args.train:
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                model, test_set, made = trained(args.config or [str(FREE)], args.extra, Path(workdir))
            else:
                config = Path(args.config[0]) if args.config else None
                model, test_set, made = loaded(args.ckpt_path, config)
        model = model.to(args.device).eval()
        order = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(args.seed))
        subset = Subset(test_set, sorted(order[: min(args.size, len(test_set))].tolist()))
        loader = DataLoader(subset, batch_size=args.batch_size)
        info = machine(args.device, args) | {"model": made, "epsilon": args.epsilon, "norm": args.norm}
        rows, masks = [], []
        for implementation in args.implementations:
            spec = AutoAttackSpec(
                steps=args.steps, queries=args.queries, epsilon=args.epsilon, norm=args.norm,
                implementation=implementation,
            )  # fmt: skip
            row, mask = evaluate(model, loader, spec, args.seed, args.device)  # run: flags in the row, not warned
            rows.append(row)
            masks.append(mask)
            print(f"{implementation}: {row['robust']:.2f} % robust, {row['seconds']:.0f} s", flush=True)
        if len(rows) == 2:
            info["difference"] = rows[0]["robust"] - rows[1]["robust"]
            info["disagreeing_examples"] = int((masks[0] != masks[1]).sum())
        write(rows, info, out)
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    quiet_lightning()
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    main()
