"""The report of ``freeadv_pl evaluate``: the figures with everything they depend on (model, data, threat model,
seed, device, versions, date), as JSON, CSV and the printed table."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

import freeadv_pl
from freeadv_pl._suite import EXAMPLES, WORST
from freeadv_pl.evaluation import SuiteAttack
from freeadv_pl.threat_models import ThreatModel, format_pixels, threat_model

_PACKAGES = ("torch", "torchvision", "lightning", "timm", "torchattacks", "pyautoattack")
_WORST_TITLE = "worst case"


def build_report(
    options: Any,
    loaded: Any,
    datamodule: LightningDataModule,
    suite: Sequence[SuiteAttack],
    threat: ThreatModel,
    epsilon: float,
    counts: dict[str, int],
    settings: dict[str, Any],
    args: Sequence[str] | None,
) -> dict[str, Any]:
    examples = counts[EXAMPLES]
    if not examples:
        raise ValueError(f"{type(datamodule).__name__}'s test split holds no example to evaluate")
    classes = getattr(datamodule, "num_classes", None) or 10
    worst = "per example, the worst of the columns: correct only if correct under every one"
    columns = [(attack.title, attack.key, attack.describe(epsilon, classes)) for attack in suite]
    rows = [
        {"attack": title, "key": key, "accuracy": counts[key] / examples, "correct": counts[key], "description": text}
        for title, key, text in [*columns, (_WORST_TITLE, WORST, worst)]
    ]
    data = type(datamodule)
    return {
        "model": options.model,
        "model_description": loaded.description,
        "model_kind": loaded.kind,
        "weights": options.weights,
        "data": f"{data.__module__}.{data.__qualname__}",
        "split": "test",
        "examples": examples,
        "subset": options.subset,
        "seed": options.seed,
        "batch_size": settings["batch_size"],
        "norm": threat.norm,
        "threat_model": threat.torchattacks_norm,
        "epsilon": epsilon,
        "eps": format_pixels(epsilon),
        "clean_acc": rows[0]["accuracy"],
        "worst_case_acc": rows[-1]["accuracy"],
        "accuracy": {row["key"]: row["accuracy"] for row in rows},
        "attacks": rows,
        "device": settings["device"],
        "world_size": settings["world_size"],
        "autoattack_flags": settings["autoattack_flags"],
        "warnings": settings["warnings"],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "command": ["freeadv_pl", "evaluate", *(sys.argv[1:] if args is None else args)],
    }


def write_report(report: dict[str, Any], path: str | os.PathLike) -> dict[str, Path]:
    """Write ``report`` to ``path`` with the suffix ``.json`` (all of it) and ``.csv`` (one row per column: natural,
    each attack and the worst case, with the model, data, ε and norm on every row); returns both files."""
    files = {"json": Path(path).with_suffix(".json"), "csv": Path(path).with_suffix(".csv")}
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    shared = {name: report[name] for name in ("model", "data", "examples", "norm", "epsilon", "eps", "seed")}
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*shared, "attack", "key", "accuracy", "correct", "description"])
        writer.writeheader()
        writer.writerows(shared | row for row in report["attacks"])
    return files


def report_table(report: dict[str, Any]) -> str:
    """The report as the paper's table, each column's description below it."""
    rows = report["attacks"]
    data = report["data"].rsplit(".", 1)[-1]
    heading = (
        f"Accuracy (%) on {report['examples']:,} test images of {data}, {threat_model(report['norm']).describe(report['epsilon'])}: "
        f"{report['model_description']}"
    )
    return "\n".join(
        [
            heading,
            "| " + " | ".join(row["attack"] for row in rows) + " |",
            "|" + "---|" * len(rows),
            "| " + " | ".join(f"{100 * row['accuracy']:.2f}" for row in rows) + " |",
            *(f"  {row['attack']}: {row['description']}" for row in rows),
            *(f"  AutoAttack flag ({flag['stage']}): {flag['message']}" for flag in report["autoattack_flags"]),
            *(f"  Warning: {message}" for message in report["warnings"]),
        ]
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def _versions() -> dict[str, str | None]:
    """The versions the numbers were computed with (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "freeadv_pl": freeadv_pl.__version__}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
