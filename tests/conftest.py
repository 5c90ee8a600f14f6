"""Shared test helpers: tiny models and data (docs/design.md, "Tests"), a quiet CPU Trainer, and real Fashion-MNIST."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freeadv_pl.data.fashion_mnist import DEBIAN_DIR

FASHION_MNIST_AVAILABLE = (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_AVAILABLE, reason="real Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
)


def tiny_cnn(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """A conv + linear net on 1×6×6 images, deterministic on the CPU."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, num_classes)
    )


def tiny_dataset(n: int = 10, num_classes: int = 3, seed: int = 0) -> TensorDataset:
    """n random 1×6×6 images in [0, 1] with labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return TensorDataset(x, y)


def banded_dataset(n: int, seed: int = 0) -> TensorDataset:
    """Random 1×6×6 images labelled by their brightest band of two rows: learnable, and breakable at ε = 0.1."""
    x = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    y = x.view(n, 3, 12).mean(dim=2).argmax(dim=1)
    return TensorDataset(x, y)


class CountingNet(nn.Module):
    """A linear net on 1×6×6 images that counts its forward passes and the backward passes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(36, 3)
        self.forwards = self.backwards = 0
        self.register_full_backward_hook(self._count_backward)

    def _count_backward(self, module, grad_input, grad_output):
        self.backwards += 1

    def forward(self, x):
        self.forwards += 1
        return self.linear(x.flatten(1))


class ExplodingNet(nn.Module):
    """A linear net on 1×6×6 images whose logits turn non-finite on demand, as an fp16 overflow would make them."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(36, 3)
        self.explode = False

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return logits * float("inf") if self.explode else logits


def tiny_loader(n: int = 10, batch_size: int = 4, **kwargs) -> DataLoader:
    """A fixed-order loader; with the defaults the last batch is smaller (4, 4, 2)."""
    return DataLoader(tiny_dataset(n, **kwargs), batch_size=batch_size, shuffle=False)


def against_a_copy(module_class: type, **options) -> tuple[object, nn.Module]:
    """``module_class`` on :func:`tiny_cnn` (3 classes, no normalization, SGD lr 0.1, momentum 0.9, weight decay 1e-3)
    and an untouched copy of its backbone, for a hand-written loop to train beside it."""
    backbone = tiny_cnn()
    reference = copy.deepcopy(backbone)
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return module_class(backbone, 3, optimizer=sgd, mean=[0.0], std=[1.0], **options), reference


def assert_same_weights(module, reference: nn.Module) -> None:
    """The module's backbone has the reference model's weights, to float32 rounding."""
    for ours, theirs in zip(module.model.backbone.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def quiet_trainer(**kwargs) -> Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or sanity check, overridable by ``kwargs``."""
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=1,
    )
    settings.update(kwargs)
    return Trainer(**settings)


LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # what seed_everything writes into os.environ


def _global_state() -> dict[str, object]:
    """What one test could change and another test's result could depend on."""
    return {
        "torch threads": torch.get_num_threads(),
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "working directory": os.getcwd(),
        **{f"logger {name!r}'s level": logging.getLogger(name).level for name in ("", "lightning", *LIGHTNING_LOGGERS)},
    }


@pytest.fixture(autouse=True)
def independent_of_test_order(request: pytest.FixtureRequest):
    """Every test starts from the same global random state and must leave the rest of the global state as it found
    it, so that no result depends on which tests ran before (docs/design.md, "Tests"). The random generators of torch,
    numpy and ``random`` are seeded with 0 and Lightning's seed variables restored; a test that changes thread count,
    default dtype, grad or inference mode, deterministic algorithms, the working directory or a logger's level
    without putting it back fails here."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    seeds = {name: os.environ.get(name) for name in SEED_VARIABLES}
    before = _global_state()
    yield
    for name, value in seeds.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    after = _global_state()
    changed = {key: (value, after[key]) for key, value in before.items() if after[key] != value}
    assert not changed, f"{request.node.nodeid} left the global state changed (before, after): {changed}"


@pytest.fixture
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from an empty temporary folder (for code that writes to the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def lightning_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """``caplog`` for Lightning's INFO messages: its logger does not propagate to the root logger, and an earlier
    test (a benchmark's ``main``) may have raised its level; both are put back afterwards."""
    logger = logging.getLogger("lightning.pytorch")
    caplog.set_level(logging.INFO, logger=logger.name)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@dataclasses.dataclass(frozen=True)
class TorchattacksPGD:
    """torchattacks' L∞ PGD (step ε/4, no random start) as a user's own attack: an ``EvaluationAttack`` that is no
    spec of ours and takes no ``model_mode``, for the callbacks that take any attack."""

    steps: int = 5
    epsilon: float | None = None
    norm: str = "linf"

    @property
    def key(self) -> str:
        return f"torchattacks_pgd{self.steps}"

    @property
    def title(self) -> str:
        return f"torchattacks PGD-{self.steps}"

    def describe(self, epsilon: float, num_classes: int = 10) -> str:
        return f"torchattacks' PGD-{self.steps} (L∞ ε = {epsilon:g}, step ε/4, no random start)"

    def resolved(self, norm: str) -> TorchattacksPGD:
        return self

    def __call__(self, model, x, y, epsilon, generator=None):
        import torchattacks

        with torch.inference_mode(False), torch.enable_grad():
            attack = torchattacks.PGD(model, eps=epsilon, alpha=epsilon / 4, steps=self.steps, random_start=False)
            return attack(x.clone(), y.clone())
