"""CatastrophicOverfittingGuard: fires on a collapse of PGD accuracy (or of an attack-free signal: the gradient
alignment, Free-m's attack gain), restores the best weights, stays quiet otherwise."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from conftest import TorchattacksPGD, banded_dataset, quiet_trainer, tiny_cnn
from freeadv_pl import (
    AttackSpec,
    CatastrophicOverfittingGuard,
    FastAdversarialModule,
    FreeAdversarialModule,
    NaturalModule,
)

COLLAPSE_EPOCH = 4


class _CollapsingModule(NaturalModule):
    """Natural training that learns the banded task, then at ``collapse_epoch`` loses it for good: its logits are
    negated (every confident answer becomes a wrong one) and its learning rate set to 0."""

    collapse_epoch = COLLAPSE_EPOCH

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.collapse_epoch:
            with torch.no_grad():
                for parameter in self.model.backbone[-1].parameters():
                    parameter.neg_()
            for group in self.optimizers().param_groups:
                group["lr"] = 0.0


class _Recorder(Callback):
    """Keeps the weights the guard sees at each epoch's check (it runs before the guard)."""

    def __init__(self) -> None:
        self.weights = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append({key: value.clone() for key, value in pl_module.state_dict().items()})


def _fit(module, guard, *more_callbacks, epochs=8, ckpt_path=None, extra_guard=None, **trainer_kwargs):
    loader = DataLoader(banded_dataset(1024), batch_size=128, shuffle=False)
    guards = [guard] if extra_guard is None else [guard, extra_guard]
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*more_callbacks, *guards], **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def _guard_state(path):
    checkpoint = torch.load(path, weights_only=True)
    (state,) = (value for key, value in checkpoint["callbacks"].items() if "CatastrophicOverfittingGuard" in key)
    return state, checkpoint["state_dict"]


def _collapsing_module():
    optimizer = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return _CollapsingModule(tiny_cnn(), 3, optimizer=optimizer)


def test_fires_on_a_collapse_stops_and_restores_the_best_weights(lightning_log):
    module = _collapsing_module()
    guard = CatastrophicOverfittingGuard(epsilon=0.01, threshold=0.2)
    recorder = _Recorder()
    trainer = _fit(module, guard, recorder)
    assert len(guard.history) == COLLAPSE_EPOCH + 1, "the guard stops the training at the epoch of the collapse"
    assert trainer.current_epoch == COLLAPSE_EPOCH + 1 and trainer.should_stop
    assert guard.fired_epoch == COLLAPSE_EPOCH and guard.best_epoch < COLLAPSE_EPOCH
    assert guard.best_accuracy == max(guard.history) >= 0.7 and guard.history[-1] < guard.best_accuracy - 0.2
    for key, value in recorder.weights[guard.best_epoch].items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    assert trainer.callback_metrics["guard/best_robust_acc"] == pytest.approx(guard.best_accuracy)
    assert trainer.callback_metrics["guard/robust_acc"] == pytest.approx(guard.history[-1])
    assert f"catastrophic overfitting at epoch {COLLAPSE_EPOCH}: PGD-5 accuracy" in lightning_log.text
    assert "(PGD-5 (CE loss, ε = 0.01, step 0.0025, 1 random start))" in lightning_log.text


def test_the_guard_attacks_in_the_modules_norm_unless_given_its_own(lightning_log):
    module = _collapsing_module()
    module.norm = "l2"  # what a training module in L2 declares
    guard = CatastrophicOverfittingGuard(epsilon=0.05, threshold=0.2)
    _fit(module, guard)
    assert guard.fired_epoch == COLLAPSE_EPOCH
    assert "(PGD-5 (CE loss, L2 ε = 0.05, step 0.0125, 1 random start))" in lightning_log.text
    attack, epsilon = CatastrophicOverfittingGuard(epsilon=0.05, norm="linf")._attack_and_epsilon(module)
    assert (attack.key, attack.norm, epsilon) == ("pgd5", "linf", 0.05)
    attack, _ = CatastrophicOverfittingGuard(AttackSpec(steps=5, norm="linf"), epsilon=0.05)._attack_and_epsilon(module)
    assert attack.norm == "linf", "the attack's own norm wins"


def test_without_restore_best_the_weights_stay_and_training_still_stops():
    module = _collapsing_module()
    guard = CatastrophicOverfittingGuard(epsilon=0.01, restore_best=False)
    trainer = _fit(module, guard)
    assert guard.fired_epoch == COLLAPSE_EPOCH and trainer.current_epoch == COLLAPSE_EPOCH + 1
    loader = DataLoader(banded_dataset(1024), batch_size=1024)
    x, y = next(iter(loader))
    with torch.no_grad():
        accuracy = (module.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy < guard.best_accuracy - 0.2, "the collapsed weights are kept"


def test_a_healthy_run_never_fires():
    module = FreeAdversarialModule(
        tiny_cnn(), 3, replays=2, epsilon=0.01, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    )
    guard = CatastrophicOverfittingGuard(threshold=0.2)
    trainer = _fit(module, guard, epochs=6)
    assert guard.fired_epoch is None and len(guard.history) == 6 and trainer.current_epoch == 6
    assert guard.best_accuracy > 0.6, "the run learns; the guard has something to watch"


def test_the_state_survives_a_checkpoint(tmp_path):
    module = _collapsing_module()
    guard = CatastrophicOverfittingGuard(epsilon=0.01)
    recorder = _Recorder()
    trainer = _fit(module, guard, recorder, epochs=2)
    guard.best_step = -1  # as if the weights had moved on since the best epoch: the checkpoint keeps a copy
    trainer.save_checkpoint(tmp_path / "guard.ckpt")
    restored = CatastrophicOverfittingGuard(epsilon=0.01)
    restored.load_state_dict(_guard_state(tmp_path / "guard.ckpt")[0])
    assert restored.history == guard.history and restored.best_epoch == guard.best_epoch
    for key, value in recorder.weights[guard.best_epoch].items():
        torch.testing.assert_close(restored._best_state[key], value, rtol=0, atol=0)


def test_a_checkpoint_holds_a_weight_copy_only_when_the_best_epoch_is_older(tmp_path):
    module, recorder = _collapsing_module(), _Recorder()
    guard = CatastrophicOverfittingGuard(epsilon=0.01, restore_best=False)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    _fit(module, guard, recorder, every_epoch, enable_checkpointing=True)
    kinds = []
    for epoch in range(COLLAPSE_EPOCH + 1):
        state, weights = _guard_state(tmp_path / f"epoch={epoch}.ckpt")
        if state["best_epoch"] == epoch:  # taken right after an improving check: its own weights are the best
            assert isinstance(state["best_state"], str), "no second copy of the weights"
            torch.testing.assert_close(weights, recorder.weights[epoch], rtol=0, atol=0)
        else:
            torch.testing.assert_close(state["best_state"], recorder.weights[state["best_epoch"]], rtol=0, atol=0)
        kinds.append(isinstance(state["best_state"], str))
    assert kinds[0] and not kinds[COLLAPSE_EPOCH], "both cases are seen: the collapse epoch's best is older"


def test_a_resumed_guard_that_fires_restores_the_best_weights_of_the_checkpoint(tmp_path, lightning_log):
    first = _collapsing_module()
    _fit(
        first,
        CatastrophicOverfittingGuard(epsilon=0.01),
        ModelCheckpoint(dirpath=tmp_path),
        epochs=1,
        enable_checkpointing=True,
    )
    (path,) = tmp_path.glob("*.ckpt")
    state, weights = _guard_state(path)
    assert state["best_epoch"] == 0 and isinstance(state["best_state"], str), "the best weights are the checkpoint's"
    module, guard = _collapsing_module(), CatastrophicOverfittingGuard(epsilon=0.01, threshold=0.1)
    module.collapse_epoch = 1  # from about 43 % after one epoch to about 24 %
    trainer = _fit(module, guard, ckpt_path=path)
    assert guard.fired_epoch == 1 and trainer.current_epoch == 2 and guard.best_epoch == 0
    torch.testing.assert_close(module.state_dict(), weights, rtol=0, atol=0)
    assert "restoring the weights of epoch 0" in lightning_log.text


def test_a_module_without_epsilon_needs_one():
    with pytest.raises(
        ValueError, match=r"NaturalModule has no `epsilon`.*CatastrophicOverfittingGuard\(epsilon=...\)"
    ):
        _fit(NaturalModule(tiny_cnn(), 3), CatastrophicOverfittingGuard(), epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"threshold": 0}, r"threshold must be a fraction in \(0, 1\]", id="threshold-zero"),
        pytest.param({"threshold": 20}, r"threshold must be a fraction in \(0, 1\] \(0.2 = 20 points", id="percent"),
        pytest.param({"attack": AttackSpec(steps=0)}, r"steps ≥ 1.*AttackSpec\(steps=5\)", id="steps"),
        pytest.param({"num_samples": 0}, "num_samples must be an integer ≥ 1", id="samples"),
        pytest.param({"epsilon": "8/256x"}, "epsilon must be a number in", id="epsilon"),
        pytest.param({"epsilon": -0.1}, r"epsilon must lie in \[0, 1\].*norm='l2'", id="epsilon<0"),
        pytest.param({"epsilon": 1.5, "norm": "linf"}, r"epsilon must lie in \[0, 1\]", id="epsilon>1-linf"),
        pytest.param({"epsilon": float("nan"), "norm": "l2"}, "finite number ≥ 0.*got nan", id="epsilon-nan-l2"),
        pytest.param({"norm": "L2"}, "norm must be one of 'linf', 'l2', got 'L2'", id="norm"),
        pytest.param({"model_mode": "inference"}, "model_mode must be one of", id="mode"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CatastrophicOverfittingGuard(**kwargs)


def test_an_object_that_is_no_attack_is_refused_by_its_missing_members():
    with pytest.raises(TypeError, match=r"attack must be an attack such as AttackSpec\(steps=5\).*EvaluationAttack.*"
                       r"got str, which lacks key, epsilon, describe, resolved, __call__"):  # fmt: skip
        CatastrophicOverfittingGuard(attack="pgd5")


def test_the_guard_watches_an_attack_of_ones_own_as_torchattacks_scores_it(lightning_log):
    module, recorder = _collapsing_module(), _Recorder()
    guard = CatastrophicOverfittingGuard(TorchattacksPGD(steps=5), epsilon=0.01, threshold=0.2)
    _fit(module, guard, recorder)
    assert guard.fired_epoch == COLLAPSE_EPOCH
    assert "torchattacks PGD-5 accuracy (torchattacks' PGD-5 (L∞ ε = 0.01" in lightning_log.text
    x, y = banded_dataset(1024)[:128]  # the first training batch, which the guard attacks every epoch
    for epoch in (0, COLLAPSE_EPOCH):
        reference = tiny_cnn()
        reference.load_state_dict({k.removeprefix("model.backbone."): v for k, v in recorder.weights[epoch].items()})
        attack = torchattacks.PGD(reference.eval(), eps=0.01, alpha=0.0025, steps=5, random_start=False)
        x_adv = attack(x, y)
        with torch.no_grad():
            expected = (reference(x_adv).argmax(dim=1) == y).float().mean().item()
        assert guard.history[epoch] == pytest.approx(expected, abs=1e-6), f"epoch {epoch}"


def test_training_mode_needs_an_attack_that_takes_model_mode():
    with pytest.raises(ValueError, match="model_mode='train' needs an attack.*TorchattacksPGD takes no model_mode"):
        CatastrophicOverfittingGuard(TorchattacksPGD(), model_mode="train")
    CatastrophicOverfittingGuard(AttackSpec(steps=5), model_mode="train")  # AttackSpec takes it


class _ScriptedAlignment(FastAdversarialModule):
    """FGSM-RS whose epoch alignment is scripted: healthy, then collapsed from ``COLLAPSE_EPOCH`` on."""

    def grad_alignment(self):
        return 0.05 if self.current_epoch >= COLLAPSE_EPOCH else 0.6 - 0.02 * self.current_epoch


def test_the_alignment_alarm_fires_without_an_attack_and_restores_the_last_healthy_epoch(lightning_log):
    module = _ScriptedAlignment(tiny_cnn(), 3, epsilon=0.01, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    guard, recorder = CatastrophicOverfittingGuard(alignment_threshold=0.2), _Recorder()
    trainer = _fit(module, guard, recorder)
    assert guard.fired_epoch == COLLAPSE_EPOCH and trainer.current_epoch == COLLAPSE_EPOCH + 1
    assert guard.history == pytest.approx([0.6, 0.58, 0.56, 0.54, 0.05])
    assert guard.best_epoch == COLLAPSE_EPOCH - 1 and guard._batch is None, "no batch kept: no attack runs"
    torch.testing.assert_close(module.state_dict(), recorder.weights[COLLAPSE_EPOCH - 1], rtol=0, atol=0)
    assert "guard/robust_acc" not in trainer.callback_metrics
    assert "the gradient alignment fell to 0.050, below alignment_threshold 0.2" in lightning_log.text


def test_the_alignment_alarm_stays_quiet_on_a_healthy_fgsm_rs_run():
    module = FastAdversarialModule(tiny_cnn(), 3, epsilon=0.01, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    guard = CatastrophicOverfittingGuard(alignment_threshold=0.2)
    trainer = _fit(module, guard, epochs=6)
    assert guard.fired_epoch is None and len(guard.history) == 6 and trainer.current_epoch == 6
    assert min(guard.history) > 0.5, guard.history


def test_the_alignment_alarm_needs_a_module_that_records_the_alignment():
    with pytest.raises(ValueError, match=r"NaturalModule recorded none in epoch 0.*alignment_threshold=None"):
        _fit(NaturalModule(tiny_cnn(), 3), CatastrophicOverfittingGuard(alignment_threshold=0.2), epochs=1)


@pytest.mark.parametrize("value", [1.5, -1.01, float("nan"), True, "0.2"])
def test_an_alignment_threshold_must_be_a_cosine(value):
    with pytest.raises(ValueError, match=r"alignment_threshold must be a cosine in \[-1, 1\]"):
        CatastrophicOverfittingGuard(alignment_threshold=value)


class _ScriptedGain(FreeAdversarialModule):
    """Free-4 whose epoch attack gain is scripted: its δ steps raise the loss, then from ``COLLAPSE_EPOCH`` on stop."""

    def attack_gain(self):
        return 0.98 if self.current_epoch >= COLLAPSE_EPOCH else 1.2 + 0.01 * self.current_epoch


def test_the_gain_alarm_fires_without_an_attack_and_restores_the_last_healthy_epoch(lightning_log):
    module = _ScriptedGain(tiny_cnn(), 3, replays=4, epsilon=0.01, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    guard, recorder = CatastrophicOverfittingGuard(gain_threshold=1.05), _Recorder()
    trainer = _fit(module, guard, recorder)
    assert guard.fired_epoch == COLLAPSE_EPOCH and trainer.current_epoch == COLLAPSE_EPOCH + 1
    assert guard.history == pytest.approx([1.2, 1.21, 1.22, 1.23, 0.98])
    assert guard.best_epoch == COLLAPSE_EPOCH - 1 and guard._batch is None, "no batch kept: no attack runs"
    torch.testing.assert_close(module.state_dict(), recorder.weights[COLLAPSE_EPOCH - 1], rtol=0, atol=0)
    assert "the attack gain fell to 0.980, below gain_threshold 1.05" in lightning_log.text


def test_the_gain_alarm_stays_quiet_on_a_healthy_free_m_run():
    # On this tiny task the δ steps raise the loss by 2-18 % per batch (1.019 → 1.181 over 6 epochs): the level is
    # the setting's own, which is why gain_threshold is calibrated per setting (docs/design.md, "The attack gain").
    module = FreeAdversarialModule(
        tiny_cnn(), 3, replays=4, epsilon=0.1, step_size=0.05, optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    guard = CatastrophicOverfittingGuard(gain_threshold=1.0)
    trainer = _fit(module, guard, epochs=6)
    assert guard.fired_epoch is None and len(guard.history) == 6 and trainer.current_epoch == 6
    assert min(guard.history) > 1.0 and guard.history[-1] > guard.history[0], guard.history


def test_a_gain_guard_and_an_attack_guard_work_side_by_side(tmp_path):
    module = FreeAdversarialModule(
        tiny_cnn(), 3, replays=2, epsilon=0.01, optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    on_gain, on_pgd = CatastrophicOverfittingGuard(gain_threshold=0.5), CatastrophicOverfittingGuard()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="last")
    _fit(module, on_gain, checkpoints, epochs=2, enable_checkpointing=True, extra_guard=on_pgd)
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    assert len([key for key in states if "CatastrophicOverfittingGuard" in key]) == 2
    assert len(on_gain.history) == len(on_pgd.history) == 2


def test_the_gain_alarm_needs_free_m():
    module = FastAdversarialModule(tiny_cnn(), 3, epsilon=0.01)
    with pytest.raises(ValueError, match=r"attack gain, but FastAdversarialModule recorded none.*gain_threshold=None"):
        _fit(module, CatastrophicOverfittingGuard(gain_threshold=1.05), epochs=1)


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True, "1.05"])
def test_a_gain_threshold_must_be_a_positive_ratio(value):
    with pytest.raises(ValueError, match=r"gain_threshold must be a ratio > 0"):
        CatastrophicOverfittingGuard(gain_threshold=value)


def test_one_guard_watches_one_signal():
    with pytest.raises(ValueError, match="alignment_threshold or gain_threshold, not both"):
        CatastrophicOverfittingGuard(alignment_threshold=0.2, gain_threshold=1.05)
