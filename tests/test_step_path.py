"""The direct optimizer step (``loss.backward()`` and the wrapped optimizer's ``step()``, taken when nothing else
needs to take part) trains to exactly the weights, δ, LR and global_step of Lightning's ``manual_backward`` +
``LightningOptimizer.step``, for every training module; and it is refused where something does take part."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from conftest import quiet_trainer, tiny_cnn, tiny_loader
from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, NaturalModule, PGDAdversarialModule
from freeadv_pl.modules import ClassifierModule
from freeadv_pl.modules._step_path import direct_step_blocker


class ObservesEachStep(Callback):
    """Implements a per-step hook, so the module must step through Lightning; counts the calls it gets."""

    def __init__(self) -> None:
        self.calls = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.calls += 1


def sgd_with_schedule(**options):
    return dict(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5], gamma=0.1),
        **options,
    )


MODULES = [
    pytest.param(lambda: NaturalModule(tiny_cnn(), 3, **sgd_with_schedule()), id="natural"),
    pytest.param(
        lambda: FreeAdversarialModule(tiny_cnn(), 3, replays=3, epsilon=0.1, **sgd_with_schedule()), id="free"
    ),
    pytest.param(
        lambda: FreeAdversarialModule(
            tiny_cnn(), 3, replays=2, epsilon=0.1, on_nonfinite_loss="skip", **sgd_with_schedule(gradient_clip_norm=0.5)
        ),
        id="free-skip-clip",
    ),
    pytest.param(lambda: PGDAdversarialModule(tiny_cnn(), 3, steps=2, epsilon=0.1, **sgd_with_schedule()), id="pgd"),
    pytest.param(lambda: FastAdversarialModule(tiny_cnn(), 3, epsilon=0.1, **sgd_with_schedule()), id="fgsm-rs"),
]


@pytest.mark.parametrize("make", MODULES)
def test_the_direct_step_equals_lightnings_step_exactly(make):
    runs = []
    for observer in (None, ObservesEachStep()):
        torch.manual_seed(0)  # the same random starts in both runs
        module = make()
        trainer = quiet_trainer(max_epochs=2, callbacks=[observer] if observer else [])
        trainer.fit(module, tiny_loader())
        assert module._steps.direct is (observer is None)
        runs.append((module, trainer, observer))
    (direct, direct_trainer, _), (through, through_trainer, observer) = runs
    assert direct_trainer.global_step == through_trainer.global_step == observer.calls > 0
    assert direct.optimizers().param_groups[0]["lr"] == through.optimizers().param_groups[0]["lr"]
    for key, value in direct.state_dict().items():
        assert torch.equal(value, through.state_dict()[key]), key
    if getattr(direct, "delta", None) is not None:
        assert torch.equal(direct.delta, through.delta)


def test_the_direct_step_is_refused_where_something_takes_part():
    module = NaturalModule(tiny_cnn(), 3)
    assert direct_step_blocker(quiet_trainer(), module, ClassifierModule) is None
    assert direct_step_blocker(quiet_trainer(precision="bf16-mixed"), module, ClassifierModule) is None
    reasons = {
        "callback": direct_step_blocker(quiet_trainer(callbacks=[ObservesEachStep()]), module, ClassifierModule),
        "precision": direct_step_blocker(quiet_trainer(precision="bf16-true"), module, ClassifierModule),
        "ddp": direct_step_blocker(Trainer(accelerator="cpu", devices=1, strategy="ddp"), module, ClassifierModule),
    }
    assert reasons["callback"] == "the callback ObservesEachStep implements on_before_optimizer_step"
    assert reasons["precision"].startswith("precision='bf16-true' takes part in every step")
    assert reasons["ddp"].startswith("the DDPStrategy strategy takes part in every step")

    class ClipsItself(NaturalModule):
        def on_after_backward(self) -> None:
            pass

    assert direct_step_blocker(quiet_trainer(), ClipsItself(tiny_cnn(), 3), ClassifierModule) == (
        "ClipsItself overrides on_after_backward"
    )
