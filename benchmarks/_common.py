"""What every benchmark script shares: models by name, synthetic batches, the machine's description, result files."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import freeadv_pl
from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, NaturalModule, PGDAdversarialModule
from freeadv_pl.models import PreActResNet18, SmallCNN

RESULTS = Path(__file__).resolve().parent / "results"

# name: (input shape C×H×W, number of classes, backbone factory); each backbone as the package's configs use it.
MODELS = {
    # An MLP on 4×4 images, where compute is close to zero: what remains is each loop's own per-step overhead.
    "tiny": ((1, 4, 4), 10, lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))),
    "small_cnn": ((1, 28, 28), 10, lambda: SmallCNN()),
    "preact_resnet18": ((3, 32, 32), 10, lambda: PreActResNet18(num_classes=10)),
    "resnet50": ((3, 224, 224), 1000, lambda: torchvision.models.resnet50(num_classes=1000)),
}

EPSILON = 8 / 255


def quiet_lightning() -> None:
    """Keep Lightning's start-up messages (GPU available, tips, "max_epochs reached") out of the benchmark's output.

    Process-wide, so the scripts call it when run as scripts, not in ``main`` (which the smoke tests call)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def make_module(method: str, model: str, replays: int, **options: Any) -> nn.Module:
    """The package's module for ``method`` (natural, free, pgd3, pgd7, fgsm_rs) on a fresh ``model`` backbone.

    Optimizer: :func:`timing_sgd`.
    """
    _, num_classes, backbone = MODELS[model]
    common = dict(num_classes=num_classes, optimizer=timing_sgd, **options)
    if method == "natural":
        return NaturalModule(backbone(), **common)
    if method == "free":
        return FreeAdversarialModule(backbone(), replays=replays, epsilon=EPSILON, **common)
    if method in ("pgd3", "pgd7"):
        steps = int(method[3:])
        return PGDAdversarialModule(backbone(), steps=steps, epsilon=EPSILON, step_size=2 / 255, **common)
    if method == "fgsm_rs":
        return FastAdversarialModule(backbone(), epsilon=EPSILON, **common)
    raise ValueError(f"unknown method {method!r}: use natural, free, pgd3, pgd7 or fgsm_rs")


def timing_sgd(params: Any) -> torch.optim.SGD:
    """SGD at a small learning rate (timing runs on random data stay finite), momentum 0.9; fused on a GPU, where
    ``cuda_graph=True`` needs it, so that every loop compared steps the same way."""
    params = list(params)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=all(p.is_cuda for p in params) or None)


def synthetic_batches(model: str, count: int, batch_size: int, device: str, seed: int = 0) -> DataLoader:
    """A loader of ``count`` distinct batches of random images in [0, 1] and labels, already on ``device``: timing
    without data loading."""
    shape, num_classes, _ = MODELS[model]
    generator = torch.Generator().manual_seed(seed)
    batches = [
        (
            torch.rand(batch_size, *shape, generator=generator).to(device),
            torch.randint(0, num_classes, (batch_size,), generator=generator).to(device),
        )
        for _ in range(count)
    ]
    return DataLoader(batches, batch_size=None, shuffle=False)


def machine(device: str, arguments: argparse.Namespace | None = None) -> dict[str, Any]:
    """The device, the software versions, the date, the command line and the script's parsed ``arguments`` (but
    ``--out``), for a results file."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU: {cpu}",
        "cpu": cpu,
        "cpu_cores_visible": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "freeadv_pl": freeadv_pl.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "code": _git_version(),
    }
    if device == "cuda":
        info["cuda"] = torch.version.cuda
    if arguments is not None:
        info["arguments"] = {
            k: v if isinstance(v, (int, float, bool, list)) else str(v)
            for k, v in vars(arguments).items()
            if k != "out"
        }
    return info


def _git_version() -> str:
    """The checkout's commit, with "+changes" when the work tree differs from it ("unknown" outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if changed else "")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` as (key, header) pairs; floats with 3 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key, "")) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path: Path, title: str, info: dict[str, Any], rows: list[dict[str, Any]], table: str) -> None:
    """``path``.json with everything and ``path``.md with the title, how it was made and the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    made = "\n".join(f"- {key}: {value}" for key, value in info.items())
    path.with_suffix(".md").write_text(f"# {title}\n\n{made}\n\n{table}\n")
