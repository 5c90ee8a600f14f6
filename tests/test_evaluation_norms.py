"""Evaluation in either threat model: robust_accuracy and RobustEvaluation take the norm from the training module or
their argument, name it in keys, titles and the report, check ε against it, compare PGD-20 and AutoAttack of the
same norm; a suite takes a user's own attack through the EvaluationAttack protocol."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader

from conftest import banded_dataset, quiet_trainer, tiny_cnn
from freeadv_pl import (
    AttackSpec,
    AutoAttackSpec,
    EvaluationAttack,
    FreeAdversarialModule,
    NaturalModule,
    RobustEvaluation,
    robust_accuracy,
)
from freeadv_pl.evaluation import attack_suite
from freeadv_pl.threat_models import threat_model

L2_EPSILON = 1.0  # on 1×6×6 images: a change of 1/6 per pixel if spread evenly


class _Classifier(LightningModule):
    """A trained tiny CNN with ``epsilon`` and ``norm`` attributes, as a training module in either norm has."""

    def __init__(self, model: nn.Module, norm: str | None, epsilon: float | None) -> None:
        super().__init__()
        self.model = model
        if norm is not None:
            self.norm = norm
        self.epsilon = epsilon

    def forward(self, x):
        return self.model(x)

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A tiny CNN trained on the banded task, so that attacks in either norm have accuracy to remove."""
    module = NaturalModule(tiny_cnn(), 3, optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    torch.manual_seed(0)
    loader = DataLoader(banded_dataset(256, seed=1), batch_size=32, shuffle=True)
    quiet_trainer(max_epochs=15).fit(module, train_dataloaders=loader)
    return module.model.eval()


def _validate(module: LightningModule, callback: RobustEvaluation, n: int = 64) -> dict[str, float]:
    loader = DataLoader(banded_dataset(n, seed=2), batch_size=16)
    (result,) = quiet_trainer(callbacks=[callback]).validate(module, loader, verbose=False)
    return result


def test_the_norm_comes_from_the_module_and_the_numbers_are_robust_accuracys(trained):
    module = _Classifier(trained, "l2", L2_EPSILON)
    suite = [AttackSpec(steps=0), AttackSpec(steps=10), AttackSpec(steps=10, loss="cw")]
    logged = _validate(module, RobustEvaluation(suite, num_samples=None, seed=3))
    assert set(logged) == {f"val/robust/{key}" for key in ("natural", "pgd10_l2", "cw10_l2", "worst")}
    loader = DataLoader(banded_dataset(64, seed=2), batch_size=16)
    ours = robust_accuracy(trained, loader, suite, L2_EPSILON, norm="l2", seed=3)
    for key in ("natural", "pgd10_l2", "cw10_l2", "worst"):
        assert ours[key] == pytest.approx(logged[f"val/robust/{key}"], abs=1e-7)
    assert ours["natural"] - ours["worst"] > 0.2, "the L2 attacks remove accuracy"
    linf = robust_accuracy(trained, loader, suite, 0.1, seed=3)
    assert linf["pgd10"] != ours["pgd10_l2"], "another threat model, another number"


def test_the_free_module_in_l2_is_evaluated_in_l2():
    module = FreeAdversarialModule(tiny_cnn(), 3, replays=2, norm="l2", epsilon=0.5)
    callback = RobustEvaluation(num_samples=16)
    robust = {key for key in _validate(module, callback) if key.startswith("val/robust/")}
    assert robust == {"val/robust/natural", "val/robust/pgd20_l2", "val/robust/worst"}
    assert (callback.results["validate"]["norm"], callback.results["validate"]["epsilon"]) == ("l2", 0.5)


@pytest.mark.parametrize(
    "norm, epsilon, module_norm, key",
    [
        pytest.param("linf", 0.1, "l2", "pgd10", id="linf-over-an-l2-module"),
        pytest.param("l2", L2_EPSILON, "linf", "pgd10_l2", id="l2-over-an-linf-module"),
        pytest.param(None, 0.1, None, "pgd10", id="a-module-without-norm-is-linf"),
    ],
)
def test_an_explicit_norm_overrides_the_modules(trained, norm, epsilon, module_norm, key):
    module = _Classifier(trained, module_norm, epsilon=0.5)
    callback = RobustEvaluation([AttackSpec(steps=10)], epsilon=epsilon, norm=norm, num_samples=32)
    assert f"val/robust/{key}" in _validate(module, callback)


def test_the_report_names_the_norm(trained, tmp_path, capsys):
    module = _Classifier(trained, "l2", L2_EPSILON)
    callback = RobustEvaluation([AttackSpec(steps=0), AttackSpec(steps=5, restarts=2)], test_num_samples=24)
    loader = DataLoader(banded_dataset(40, seed=4), batch_size=16)
    (tested,) = quiet_trainer(callbacks=[callback], default_root_dir=tmp_path).test(module, loader, verbose=False)
    assert {"test/robust/natural", "test/robust/pgd5x2_l2", "test/robust/worst"} == set(tested)
    printed = capsys.readouterr().out
    assert "on 24 test images (L2):" in printed and "| natural | 2-restart PGD-5 (L2) | worst case |" in printed
    assert "PGD-5 (CE loss, L2 ε = 1, step 0.25, 2 random restarts)" in printed
    saved = json.loads((tmp_path / "robust_accuracy.json").read_text())
    assert (saved["norm"], saved["epsilon"]) == ("l2", 1.0)
    assert [row["key"] for row in saved["attacks"]] == ["natural", "pgd5x2_l2", "worst"]


def test_an_epsilon_out_of_the_norms_range_is_refused_before_training(trained):
    callback = RobustEvaluation(epsilon=1.5, num_samples=8)  # fine in L2, not in L∞: the module says which
    with pytest.raises(ValueError, match=r"RobustEvaluation\(epsilon=1.5\) does not fit.*norm='l2'"):
        _validate(_Classifier(trained, None, None), callback)
    assert "val/robust/pgd20_l2" in _validate(_Classifier(trained, "l2", None), callback)


def test_keys_that_clash_once_resolved_are_refused(trained):
    suite = [AttackSpec(steps=10), AttackSpec(steps=10, norm="l2")]
    assert "val/robust/pgd10_l2" in _validate(_Classifier(trained, "linf", 0.1), RobustEvaluation(suite, epsilon=0.1))
    with pytest.raises(ValueError, match=r"same name.*\['pgd10_l2', 'pgd10_l2'\].*distinct `name`s"):
        _validate(_Classifier(trained, "l2", 0.5), RobustEvaluation(suite))


def test_an_l2_preset_runs_at_an_l2_radius_whatever_the_evaluations_norm(trained):
    loader = [banded_dataset(16, seed=5).tensors]
    assert sorted(robust_accuracy(trained, loader, "pgd20_l2", 1.5)) == ["examples", "natural", "pgd20_l2", "worst"]
    with pytest.raises(ValueError, match=r"epsilon must lie in \[0, 1\].*got 1.5 \(PGD-20 runs in L∞\)"):
        robust_accuracy(trained, loader, "pgd20", 1.5)
    assert [a.key for a in attack_suite("autoattack_l2", "linf")] == ["natural", "pgd20_l2", "autoattack_l2"]


@pytest.mark.parametrize(
    "suite, results, warns",
    [
        pytest.param("autoattack_l2", {"pgd20_l2": 0.50, "autoattack_l2": 0.44}, True, id="l2-gap"),
        pytest.param("autoattack_l2", {"pgd20_l2": 0.50, "autoattack_l2": 0.46}, False, id="l2-close"),
        pytest.param(
            [AttackSpec(steps=20, norm="linf"), AutoAttackSpec(norm="l2")],
            {"pgd20": 0.50, "autoattack_l2": 0.30},
            False,
            id="other-norms-are-not-compared",
        ),
    ],
)
def test_the_masking_check_compares_pgd20_and_autoattack_of_one_norm(suite, results, warns, recwarn):
    callback = RobustEvaluation(test_attacks=suite, epsilon=0.5, norm="l2")
    callback._check_masking(callback.test_attacks, {"natural": 0.9, **results}, 0.5)
    flagged = [str(w.message) for w in recwarn if "masks its gradients" in str(w.message)]
    assert bool(flagged) == warns
    assert not warns or "AutoAttack (L2)'s accuracy (44.0 %) is 6.0 points below PGD-20 (L2)'s" in flagged[0]


# A user's own attack


@dataclasses.dataclass(frozen=True)
class _Noise:
    """The best of a few random points of the ball: an EvaluationAttack that is neither spec."""

    tries: int = 4
    norm: str | None = None
    epsilon: float | None = None

    @property
    def key(self) -> str:
        return threat_model(self.norm or "linf").key(f"noise{self.tries}")

    @property
    def title(self) -> str:
        return threat_model(self.norm or "linf").title(f"Noise-{self.tries}")

    def describe(self, epsilon, num_classes=10):
        return f"{self.tries} random points ({threat_model(self.norm or 'linf').describe(epsilon)})"

    def resolved(self, norm):
        return self if self.norm else dataclasses.replace(self, norm=norm)

    def __call__(self, model, x, y, epsilon, generator=None):
        threat, best = threat_model(self.norm or "linf"), x
        with torch.no_grad():
            for _ in range(self.tries):
                point = threat.project_images(x + threat.random_start(x, epsilon, generator), x, epsilon)
                best = torch.where((model(point).argmax(dim=1) != y).view(-1, 1, 1, 1), point, best)
        return best


def test_a_users_attack_is_a_column_named_in_the_evaluations_norm(trained, capsys, tmp_path):
    assert isinstance(_Noise(), EvaluationAttack) and isinstance(AutoAttackSpec(), EvaluationAttack)
    module = _Classifier(trained, "l2", 3.0)
    callback = RobustEvaluation([AttackSpec(steps=0), _Noise()], num_samples=None, test_num_samples=32)
    logged = _validate(module, callback)
    assert logged["val/robust/noise4_l2"] < logged["val/robust/natural"], "random L2 noise of radius 3 breaks some"
    assert logged["val/robust/worst"] == pytest.approx(logged["val/robust/noise4_l2"])
    loader = DataLoader(banded_dataset(40, seed=4), batch_size=16)
    quiet_trainer(callbacks=[callback], default_root_dir=tmp_path).test(module, loader, verbose=False)
    assert "Noise-4 (L2): 4 random points (L2 ε = 3)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "attack, missing",
    [
        pytest.param(object(), "key, title, epsilon, describe, resolved, __call__", id="nothing"),
        pytest.param(lambda model, x, y, epsilon: x, "key, title, epsilon, describe, resolved", id="a-function"),
    ],
)
def test_an_object_without_the_protocols_members_is_refused_by_name(attack, missing):
    with pytest.raises(TypeError, match=rf"attacks\[1\] \(\w+\) is no attack of a suite: it lacks {missing}\."):
        RobustEvaluation([AttackSpec(steps=0), attack])
