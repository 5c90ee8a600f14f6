"""AutoAttack: our cascade agrees with torchattacks' four attacks run one after another on a model trained on real
Fashion-MNIST, and in L2 with torchattacks' AutoAttack(norm="L2"); it is never above PGD-20 of its norm, breaks most
of a naturally trained model, and its bad inputs name the fix."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from conftest import needs_fashion_mnist, quiet_trainer, tiny_cnn, tiny_dataset
from torch import nn
from torch.utils.data import DataLoader

from freeadv_pl import (
    AttackSpec,
    AutoAttackSpec,
    FashionMNISTDataModule,
    NaturalModule,
    RobustEvaluation,
)
from freeadv_pl.evaluation import attack_suite
from freeadv_pl.models import InputNormalization

EPSILON = 0.1
L2_EPSILON = 1.0  # on 28×28 images; L∞ 0.1 allows an L2 change of up to 2.8
N_TEST = 100


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return InputNormalization(nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)))


@pytest.fixture(scope="module")
def fashion_mnist():
    data = FashionMNISTDataModule(batch_size=100, train_size=4000, val_size=0, test_size=N_TEST, seed=0)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    test = next(iter(DataLoader(data.test_set, batch_size=N_TEST)))
    return data, test


def _train(data: FashionMNISTDataModule, adversarial: bool, norm: str = "linf", epsilon: float = EPSILON) -> nn.Module:
    """Three epochs of plain SGD, on PGD-3 examples of the ``norm`` (step ε/2, random start) when ``adversarial``."""
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for x, y in DataLoader(data.train_set, batch_size=100, shuffle=True, generator=generator):
            if adversarial:
                x = AttackSpec(steps=3, step_size=epsilon / 2, norm=norm)(model, x, y, epsilon, generator)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _torchattacks_one_after_another(model: nn.Module, x, y) -> float:
    """torchattacks' APGD-CE, APGD-T, FAB-T and Square, each on every example, with the standard version's
    parameters: an example is robust if it is correct clean and none of the four breaks it."""
    attacks = [
        torchattacks.APGD(model, eps=EPSILON, steps=100, n_restarts=1, loss="ce", seed=1),
        torchattacks.APGDT(model, eps=EPSILON, steps=100, n_restarts=1, n_classes=10, seed=2),
        torchattacks.FAB(model, eps=EPSILON, steps=100, n_restarts=1, multi_targeted=True, n_classes=10, seed=3),
        torchattacks.Square(model, eps=EPSILON, n_queries=5000, n_restarts=1, seed=4),
    ]
    with torch.no_grad():
        robust = model(x).argmax(dim=1) == y
    for attack in attacks:
        x_adv = attack(x, y)
        inside = (x_adv - x).abs().flatten(1).amax(dim=1) <= EPSILON + 1e-5
        with torch.no_grad():
            robust &= ~((model(x_adv).argmax(dim=1) != y) & inside)
    return float(robust.float().mean())


@needs_fashion_mnist
def test_agrees_with_torchattacks_and_is_below_pgd20(fashion_mnist):
    data, (x, y) = fashion_mnist
    model = _train(data, adversarial=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours = float((model(AutoAttackSpec()(model, x, y, EPSILON, generator)).argmax(dim=1) == y).float().mean())
        pgd20 = float((model(AttackSpec(steps=20)(model, x, y, EPSILON, generator)).argmax(dim=1) == y).float().mean())
    reference = _torchattacks_one_after_another(model, x, y)
    assert ours > 0.2, "an adversarially trained model keeps some robust accuracy"
    assert abs(ours - reference) <= 0.01, (ours, reference)
    assert ours <= pgd20


@needs_fashion_mnist
def test_breaks_a_naturally_trained_model(fashion_mnist):
    data, (x, y) = fashion_mnist
    model = _train(data, adversarial=False)
    x_adv = AutoAttackSpec()(model, x, y, EPSILON)
    with torch.no_grad():
        clean = float((model(x).argmax(dim=1) == y).float().mean())
        robust = float((model(x_adv).argmax(dim=1) == y).float().mean())
    # This small MLP, trained for 3 epochs, keeps ~12 % (PGD-20: ~16 %) of its ~71 % at ε = 0.1.
    assert clean > 0.6 and robust < 0.2 * clean
    assert float((x_adv - x).abs().max()) <= EPSILON + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1


@needs_fashion_mnist
@pytest.mark.slow  # ~25 s on an idle 2-core machine, ~100 s on a busy one: Square's 5,000 queries, twice
def test_the_l2_preset_agrees_with_torchattacks_autoattack_l2_and_is_below_l2_pgd20(fashion_mnist):
    data, (x, y) = fashion_mnist
    model = _train(data, adversarial=True, norm="l2", epsilon=L2_EPSILON)
    natural, pgd20, autoattack = attack_suite("autoattack_l2", "linf")  # L2 whatever the evaluation's norm
    assert (natural.key, pgd20.key, autoattack.key) == ("natural", "pgd20_l2", "autoattack_l2")
    x_pgd20 = pgd20(model, x, y, L2_EPSILON, torch.Generator().manual_seed(0))
    x_ours = autoattack(model, x, y, L2_EPSILON, torch.Generator().manual_seed(0))
    # torchattacks' standard version, with the official 100 steps of APGD, APGD-T and FAB (torchattacks' default: 10).
    reference = torchattacks.AutoAttack(model, norm="L2", eps=L2_EPSILON, version="standard", n_classes=10, seed=0)
    for attack in reference._autoattack.attacks:
        if hasattr(attack, "steps"):
            attack.steps = 100
    x_reference = reference(x, y)
    with torch.no_grad():
        clean, ours, theirs, below = (
            int((model(images).argmax(dim=1) == y).sum()) for images in (x, x_ours, x_reference, x_pgd20)
        )
    assert clean - ours > 10, "the L2 attacks remove accuracy"
    assert ours > 30, "an L2-trained model keeps some L2 robustness (so that the two can differ)"
    assert abs(ours - theirs) <= 1, (ours, theirs)  # within 1 point: 1 image of 100
    assert ours <= below, "AutoAttack is never above PGD-20 of its norm"
    assert float((x_ours - x).flatten(1).norm(dim=1).max()) <= L2_EPSILON + 1e-5, "inside the L2 ball"
    assert 0 <= float(x_ours.min()) and float(x_ours.max()) <= 1


def test_the_l2_spec_builds_torchattacks_l2_attacks():
    spec = AutoAttackSpec(norm="l2")
    assert (spec.key, spec.title) == ("autoattack_l2", "AutoAttack (L2)")
    assert "; L2 ε = 0.5;" in spec.describe(0.5) and "L∞" not in spec.describe(0.5)
    built = [build(tiny_cnn(10), 0.5, 0) for build in spec._attacks(10)]
    assert [type(attack).__name__ for attack in built] == ["APGD", "APGDT", "FAB", "Square"]
    assert {attack.norm for attack in built} == {"L2"}
    assert {attack.norm for attack in (build(tiny_cnn(10), 0.5, 0) for build in AutoAttackSpec()._attacks(10))} == {
        "Linf"
    }
    assert AutoAttackSpec().resolved("l2") == spec and spec.resolved("linf") is spec, "a norm of its own stays"


def test_keeps_the_global_random_state():
    model, (x, y) = tiny_cnn(4), tiny_dataset(8, num_classes=4).tensors
    state = torch.random.get_rng_state()
    AutoAttackSpec(steps=3, queries=10)(model, x, y, EPSILON, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state()), "torchattacks reseeds the global generator"


def test_fewer_than_ten_classes_take_the_other_classes_as_targets():
    model, (x, y) = tiny_cnn(5), tiny_dataset(8, num_classes=5).tensors
    with pytest.warns(UserWarning, match="APGD-T and FAB-T target the 4 other classes"):
        AutoAttackSpec(steps=3, queries=10)(model, x, y, EPSILON)
    assert "APGD-T (4 target classes)" in AutoAttackSpec().describe(EPSILON, num_classes=5)


def test_too_few_classes_for_the_dlr_loss_name_the_fix():
    model, (x, y) = tiny_cnn(3), tiny_dataset(8, num_classes=3).tensors
    with pytest.raises(ValueError, match="at least 4 classes.*test_attacks='pgd20'"):
        AutoAttackSpec()(model, x, y, EPSILON)


def test_without_torchattacks_the_preset_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchattacks" else real(name))
    with pytest.raises(ModuleNotFoundError, match=r'pip install "freeadv_pl\[autoattack\]"'):
        RobustEvaluation(test_attacks="autoattack", epsilon=0.1)


def test_a_preset_without_epsilon_on_a_natural_module_names_the_fix():
    module = NaturalModule(tiny_cnn(4), 4)
    callback = RobustEvaluation(attacks="apgd", test_attacks="autoattack")
    with pytest.raises(ValueError, match=r"RobustEvaluation\(epsilon=\.\.\.\)"):
        quiet_trainer(callbacks=[callback]).test(module, DataLoader(tiny_dataset(8, num_classes=4)), verbose=False)


@pytest.mark.parametrize("pgd20, autoattack, warns", [(0.50, 0.44, True), (0.50, 0.46, False)])
def test_gradient_masking_is_flagged_beyond_five_points(pgd20, autoattack, warns, recwarn):
    callback = RobustEvaluation(test_attacks="autoattack", epsilon=0.1)
    callback._check_masking(callback.test_attacks, {"natural": 0.9, "pgd20": pgd20, "autoattack": autoattack})
    flagged = [w for w in recwarn if "masks its gradients" in str(w.message)]
    assert bool(flagged) == warns
