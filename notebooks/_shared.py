"""What the notebooks share: the quick switch, where files go, one training recipe with a checkpoint cache, and
saving a figure with a JSON description of what it plots.

Environment variables (read once, at import):

- ``FREEADV_PL_NOTEBOOK_QUICK=1``: quick mode, a training subset and a small budget (what the test suite runs);
  unset or ``0``: the full settings (the Fashion-MNIST configs' budget, minutes per model on a CPU).
- ``FREEADV_PL_NOTEBOOK_CACHE``: the folder of cached checkpoints (default: ``<temp dir>/freeadv_pl_notebooks``).
  A checkpoint's name holds every setting that shapes it, so a quick model is never reused for a full run.
- ``FREEADV_PL_NOTEBOOK_OUTPUT``: where figures are saved as PNG, each with a JSON twin (default: ``figures/`` in
  the cache folder, never inside the repository).

Only the public API of ``freeadv_pl`` is used here.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

from freeadv_pl import FashionMNISTDataModule, FreeAdversarialModule, NaturalModule, SmallCNN

QUICK = os.environ.get("FREEADV_PL_NOTEBOOK_QUICK", "0").strip().lower() not in ("", "0", "false", "no")
CACHE = Path(os.environ.get("FREEADV_PL_NOTEBOOK_CACHE") or Path(tempfile.gettempdir()) / "freeadv_pl_notebooks")
FIGURES = Path(os.environ.get("FREEADV_PL_NOTEBOOK_OUTPUT") or CACHE / "figures")

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
"""Fashion-MNIST's class names, by label."""


@dataclass(frozen=True)
class Settings:
    """One training recipe for every notebook: SmallCNN, batch 128, SGD (momentum 0.9, weight decay 5e-4), ε = 0.1 and
    ε_step = 0.05 for Free-m, as configs/fashion_mnist/. Natural training runs at lr 0.05 (×0.1 at 50% and 75% of the
    budget); Free-m at a one-cycle lr peaking at 0.05 (a linear warm-up over 40 % of the budget): Free-m at 0.05 from
    the first step loses up to 25 points of PGD-20 accuracy at some seeds (docs/design.md, "Free-m's learning rate")."""

    mode: str
    train_size: int | None  # training images (None: all 55,000 left after the 5,000 held out)
    budget: int  # optimizer steps = forward/backward passes of a batch, the same for every method (a multiple of 40)
    test_size: int  # test images the notebooks evaluate on (a seeded subset of the 10,000)
    batch_size: int = 128
    epsilon: float = 0.1
    step_size: float = 0.05
    seed: int = 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-(self.train_size or 55000) // self.batch_size)

    def natural_epochs(self) -> float:
        """The budget in epochs of natural training (one pass per batch): Free-m runs this divided by m."""
        return self.budget / self.batches_per_epoch


SETTINGS = (
    # 5,120 training images (40 batches), 400 steps = 10 natural epochs; about 10 s per model on two cores.
    Settings(mode="quick", train_size=5120, budget=400, test_size=500)
    if QUICK
    # The Fashion-MNIST configs' budget: 5,160 steps = 12 natural epochs of 430 batches; minutes per model.
    else Settings(mode="full", train_size=None, budget=5160, test_size=2000)
)


def data_module(**overrides: Any) -> FashionMNISTDataModule:
    """Fashion-MNIST with the recipe's training subset and test subset (seeded)."""
    settings = {
        "batch_size": SETTINGS.batch_size,
        "train_size": SETTINGS.train_size,
        "test_size": SETTINGS.test_size,
        "seed": SETTINGS.seed,
    }
    return FashionMNISTDataModule(**(settings | overrides))


def images_from_test_set(count: int | None = None, last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (or with ``last=True`` the last) ``count`` images of the recipe's test subset, or of the whole
    test set when ``last=True``: the authors show the last images of the test set, to avoid cherry-picking."""
    data = data_module(test_size=None) if last else data_module()
    data.setup("test")
    dataset = data.test_set
    indices = range(len(dataset) - count, len(dataset)) if last else range(min(count or len(dataset), len(dataset)))
    images, labels = zip(*(dataset[i] for i in indices), strict=True)
    return torch.stack(images), torch.tensor(labels)


@dataclass
class Trained:
    """A trained module and how it was trained."""

    module: torch.nn.Module
    steps: int  # optimizer steps taken (forward/backward passes)
    epochs: float  # passes over the training images
    seconds: float  # training wall time (of the run that made the checkpoint)
    cached: bool  # loaded from the cache rather than trained now


def _module(method: str, replays: int) -> torch.nn.Module:
    def optimizer(params):
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def lr_scheduler(opt):
        if method == "natural":
            return torch.optim.lr_scheduler.MultiStepLR(opt, [SETTINGS.budget // 2, 3 * SETTINGS.budget // 4], 0.1)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, 0.05, total_steps=SETTINGS.budget, pct_start=0.4, anneal_strategy="linear", cycle_momentum=False
        )

    common = {
        "num_classes": 10,
        "mean": FashionMNISTDataModule.mean,
        "std": FashionMNISTDataModule.std,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
    }
    if method == "natural":
        return NaturalModule(SmallCNN(), **common)
    if method == "free":
        return FreeAdversarialModule(
            SmallCNN(), replays=replays, epsilon=SETTINGS.epsilon, step_size=SETTINGS.step_size, **common
        )
    raise ValueError(f"method must be 'natural' or 'free', got {method!r}")


def checkpoint_path(method: str, replays: int = 1) -> Path:
    """The cache file of a model: its name holds every setting that shapes the model."""
    s = SETTINGS
    name = "natural" if method == "natural" else f"free-m{replays}-eps{s.epsilon:g}-step{s.step_size:g}-onecycle"
    return CACHE / f"{name}-{s.mode}-n{s.train_size or 'all'}-b{s.batch_size}-steps{s.budget}-seed{s.seed}.ckpt"


def train_or_load(method: str, replays: int = 1) -> Trained:
    """The recipe's model (``"natural"`` or ``"free"`` with ``replays`` = m), from the cache or trained now with a
    Lightning Trainer for exactly ``SETTINGS.budget`` optimizer steps (Free-m: budget/m minibatches), then cached.
    The module is returned in eval mode. A cached checkpoint is read with ``torch.load(..., weights_only=True)``
    (it holds tensors and plain Python values only; PyTorch's restricted unpickler rejects anything else)."""
    path = checkpoint_path(method, replays)
    info_path = path.with_suffix(".json")
    module = _module(method, replays)
    if path.is_file() and info_path.is_file():
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        info = json.loads(info_path.read_text())
        return Trained(module.eval(), info["steps"], info["epochs"], info["seconds"], cached=True)
    seed_everything(SETTINGS.seed, verbose=False)
    module = _module(method, replays)  # made again after seeding: the same initial weights every time
    trainer = Trainer(
        max_steps=SETTINGS.budget,  # global_step counts optimizer steps, m per minibatch for Free-m
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=CACHE,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data_module())
    seconds = time.perf_counter() - start
    minibatches = trainer.global_step // (replays if method == "free" else 1)
    info = {
        "steps": trainer.global_step,
        "epochs": minibatches / SETTINGS.batches_per_epoch,
        "seconds": seconds,
        "settings": asdict(SETTINGS),
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    trainer.save_checkpoint(partial)
    partial.replace(path)  # a crash never leaves a half-written checkpoint under the final name
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return Trained(module.eval(), info["steps"], info["epochs"], seconds, cached=False)


def describe_axes(fig: Any) -> list[dict[str, Any]]:
    """What each axes of a matplotlib figure shows: titles, axis labels, lines (label, number of points, data),
    images, legend entries. Read off the figure itself, for the tests."""
    described = []
    for ax in fig.axes:
        lines = [
            {
                "label": line.get_label(),
                "points": len(line.get_xdata()),
                "x": [float(v) for v in line.get_xdata()],
                "y": [float(v) for v in line.get_ydata()],
            }
            for line in ax.get_lines()
        ]
        legend = ax.get_legend()
        described.append(
            {
                "title": ax.get_title(),
                "xlabel": ax.get_xlabel(),
                "ylabel": ax.get_ylabel(),
                "zlabel": ax.get_zlabel() if hasattr(ax, "get_zlabel") else None,
                "lines": lines,
                "images": len(ax.get_images()),
                "collections": len(ax.collections),
                "legend": [text.get_text() for text in legend.get_texts()] if legend else [],
            }
        )
    return described


def save_figure(fig: Any, name: str, **claims: Any) -> Path:
    """Save ``fig`` as ``<FIGURES>/<name>.png`` and, beside it, ``<name>.json``: the figure's own description
    (:func:`describe_axes`), its suptitle, the settings, and ``claims`` (the key numbers the notebook found)."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    suptitle = fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""  # matplotlib ≥ 3.8
    record = {
        "png": str(path),
        "suptitle": suptitle,
        "axes": describe_axes(fig),
        "settings": asdict(SETTINGS),
        "claims": claims,
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"saved {path} (and {path.with_suffix('.json').name})")
    return path
