"""Every bad argument of the training modules gives an error that names it and the fix."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer, tiny_cnn, tiny_dataset, tiny_loader
from freeadv_pl import FreeAdversarialModule, NaturalModule, PGDAdversarialModule
from freeadv_pl.modules.manual_optimization import check_trainer_for_manual_optimization


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(lambda: NaturalModule(tiny_cnn(), 3, lr_scheduler_interval="batch"), ValueError,
                     "lr_scheduler_interval must be one of 'step', 'epoch', got 'batch'", id="interval"),
        pytest.param(lambda: FreeAdversarialModule(tiny_cnn(), 3, replays=0), ValueError,
                     "replays must be an integer ≥ 1, got 0", id="replays<1"),
        pytest.param(lambda: FreeAdversarialModule(tiny_cnn(), 3, replays=2.5), TypeError,
                     r"replays must be an integer ≥ 1, got 2.5 \(float\)", id="replays-float"),
        pytest.param(lambda: FreeAdversarialModule(tiny_cnn(), 3, epsilon=-0.1), ValueError,
                     r"epsilon must lie in \[0, 1\]", id="epsilon<0"),
        pytest.param(lambda: FreeAdversarialModule(tiny_cnn(), 3, epsilon=8), ValueError,
                     r"epsilon must lie in \[0, 1\] \(pixel units.*8/255", id="epsilon>1"),
        pytest.param(lambda: FreeAdversarialModule(tiny_cnn(), 3, epsilon="8/256x"), ValueError,
                     "fraction string like '8/255'", id="epsilon-typo"),
        pytest.param(lambda: FreeAdversarialModule(tiny_cnn(), 3, step_size=0), ValueError,
                     r"step_size must lie in \(0, 1\]", id="free-step<=0"),
        pytest.param(lambda: PGDAdversarialModule(tiny_cnn(), 3, step_size=-1 / 255), ValueError,
                     r"step_size must lie in \(0, 1\]", id="pgd-step<=0"),
        pytest.param(lambda: PGDAdversarialModule(tiny_cnn(), 3, steps=0), ValueError,
                     "steps must be an integer ≥ 1", id="pgd-steps<1"),
        pytest.param(lambda: PGDAdversarialModule(tiny_cnn(), 3, attack_mode="inference"), ValueError,
                     "attack_mode must be one of 'train', 'eval'", id="attack-mode"),
        pytest.param(lambda: NaturalModule("resnet18", 3), TypeError,
                     "backbone must be a torch.nn.Module such as freeadv_pl.models.SmallCNN", id="backbone-str"),
        pytest.param(lambda: NaturalModule(tiny_cnn(), 1), ValueError,
                     "num_classes must be an integer ≥ 2", id="num_classes<2"),
        pytest.param(lambda: NaturalModule(tiny_cnn(), 3, mean=[0.5]), ValueError,
                     "mean and std must be given together", id="mean-without-std"),
        pytest.param(lambda: NaturalModule(tiny_cnn(), 3, mean=[0.5], std=[0.0]), ValueError,
                     "every std must be > 0", id="std=0"),
    ],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _fit(module, loader=None, **trainer_kwargs):
    quiet_trainer(**trainer_kwargs).fit(module, train_dataloaders=loader or tiny_loader())


def test_data_outside_unit_range_is_detected_on_the_first_batch():
    x, y = tiny_dataset().tensors
    normalized = DataLoader(TensorDataset((x - 0.5) / 0.25, y), batch_size=4)
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space.*Remove any Normalize transform"):
        _fit(NaturalModule(tiny_cnn(), 3), normalized)


def test_backbone_with_the_wrong_number_of_logits():
    with pytest.raises(ValueError, match="backbone outputs 3 logits but num_classes=10"):
        _fit(FreeAdversarialModule(tiny_cnn(num_classes=3), 10, replays=2))


def test_reduce_lr_on_plateau_is_rejected():
    module = NaturalModule(tiny_cnn(), 3, lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ValueError, match="ReduceLROnPlateau is not supported.*MultiStepLR"):
        _fit(module)


@pytest.mark.parametrize(
    "trainer_kwargs, match",
    [
        pytest.param(dict(accumulate_grad_batches=2), r"Remove `Trainer\(accumulate_grad_batches=2\)`", id="accum"),
        pytest.param(dict(gradient_clip_val=1.0), r"Remove `Trainer\(gradient_clip_val=1.0\)`", id="clip"),
    ],
)
def test_trainer_flags_manual_optimization_cannot_honour(trainer_kwargs, match):
    # Lightning's own check, for users of a bare Trainer: it names the flag and the fix.
    with pytest.raises(MisconfigurationException, match=match):
        _fit(FreeAdversarialModule(tiny_cnn(), 3, replays=2), **trainer_kwargs)
    # The package's earlier check (used by the CLI) says why and what to do instead.
    with pytest.raises(ValueError, match="not supported: freeadv_pl modules use manual optimization"):
        check_trainer_for_manual_optimization(quiet_trainer(**trainer_kwargs))
