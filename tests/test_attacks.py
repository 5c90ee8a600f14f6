"""Tests of freeadv_pl.attacks: the ε-ball and [0, 1], torchattacks as a reference (PGD, PGDL2, FGSM), restarts, the
CW margin, L2 CW-k against a hand-written loop."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from conftest import needs_cuda, needs_fashion_mnist, quiet_trainer, tiny_cnn
from freeadv_pl import AttackSpec, FashionMNISTDataModule, NaturalModule, SmallCNN
from freeadv_pl.attacks import cw_loss, fgsm, pgd, uniform_perturbation
from freeadv_pl.evaluation import count_correct


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # Values at 0 and 1 make the [0, 1] clamp matter.
    x = torch.rand(16, 1, 6, 6, generator=generator).round(decimals=1)
    return x, torch.randint(0, 3, (16,), generator=generator)


ATTACKS = [
    pytest.param(functools.partial(pgd, steps=10, step_size=0.02), id="pgd-ce"),
    pytest.param(functools.partial(pgd, steps=10, step_size=0.02, loss="cw"), id="pgd-cw"),
    pytest.param(functools.partial(pgd, steps=3, step_size=0.05, restarts=3), id="pgd-restarts"),
    pytest.param(functools.partial(pgd, steps=5, step_size=0.05, random_start=False), id="pgd-zero-start"),
    pytest.param(fgsm, id="fgsm"),
]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("epsilon", [0.0, 8 / 255, 0.3])
def test_adversarial_examples_stay_in_the_ball_and_in_unit_range(attack, epsilon, batch):
    x, y = batch
    x_adv = attack(tiny_cnn(), x, y, epsilon=epsilon)
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= epsilon + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_pgd_without_random_start_equals_torchattacks_pgd(batch):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    model = tiny_cnn()
    ours = pgd(model, x, y, epsilon=0.1, step_size=0.01, steps=10, random_start=False)
    reference = torchattacks.PGD(model, eps=0.1, alpha=0.01, steps=10, random_start=False)(x, y)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_fgsm_equals_torchattacks_fgsm(batch):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    model = tiny_cnn()
    torch.testing.assert_close(fgsm(model, x, y, epsilon=0.1), torchattacks.FGSM(model, eps=0.1)(x, y))


def _l2_norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 3.0])
def test_l2_adversarial_examples_stay_in_the_l2_ball_and_in_unit_range(attack, epsilon, batch):
    x, y = batch
    x_adv = attack(tiny_cnn(), x, y, epsilon=epsilon, norm="l2")
    assert x_adv.shape == x.shape
    assert _l2_norms(x_adv - x).max() <= epsilon + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


@pytest.mark.parametrize("random_start", [False, True], ids=["zero-start", "random-start"])
def test_l2_pgd_equals_torchattacks_pgdl2(random_start, batch):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    model = tiny_cnn()
    # Our L2 start draws as PGDL2's does (a normal draw shaped like x, then a uniform radius per example), so the same
    # global seed gives the same start.
    torch.manual_seed(5)
    ours = pgd(model, x, y, epsilon=0.5, step_size=0.1, steps=10, random_start=random_start, norm="l2")
    torch.manual_seed(5)
    reference = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=10, random_start=random_start)(x, y)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    assert _l2_norms(ours - x).max() == pytest.approx(0.5, abs=1e-5), "the sphere is reached: the projection acts"
    assert not torch.equal(ours, pgd(model, x, y, epsilon=0.5, step_size=0.1, steps=10, random_start=False)), (
        "L2 differs from L∞ at the same ε"
    )


def test_l2_cw_equals_a_hand_written_loop(batch):
    x, y = batch
    model = tiny_cnn()
    epsilon, alpha = 0.5, 0.1
    x_adv = x.clone()
    for _ in range(10):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        true_logit = logits.gather(1, y[:, None]).squeeze(1)
        wrong_logit = logits.masked_fill(F.one_hot(y, 3).bool(), float("-inf")).amax(dim=1)
        (grad,) = torch.autograd.grad((wrong_logit - true_logit).sum(), x_adv)
        step = alpha * grad / _l2_norms(grad).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = x_adv.detach() + step - x
        delta = delta * torch.clamp(epsilon / _l2_norms(delta).clamp_min(1e-12), max=1.0).view(-1, 1, 1, 1)
        x_adv = (x + delta).clamp(0.0, 1.0)
    cw10 = AttackSpec(steps=10, loss="cw", step_size=alpha, random_start=False, norm="l2")
    assert cw10.key == "cw10_l2" and cw10.describe(epsilon) == "CW-10 (CW loss, L2 ε = 0.5, step 0.1, start at δ = 0)"
    torch.testing.assert_close(cw10(model, x, y, epsilon), x_adv, atol=1e-6, rtol=0)
    assert (model(x_adv).argmax(dim=1) != y).any(), "the attack breaks some examples"


def test_l2_fgsm_is_one_normalized_gradient_step_of_size_epsilon(batch):
    x, y = batch
    model = tiny_cnn()
    inputs = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(inputs), y, reduction="sum"), inputs)
    by_hand = (x + 0.5 * grad / _l2_norms(grad).view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    torch.testing.assert_close(fgsm(model, x, y, epsilon=0.5, norm="l2"), by_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(epsilon=-0.5), r"epsilon must be a finite number ≥ 0 \(an L2 radius", id="epsilon<0"),
        pytest.param(dict(epsilon=float("inf")), "epsilon must be a finite number ≥ 0.*got inf", id="epsilon-inf"),
        pytest.param(dict(epsilon=float("nan")), "epsilon must be a finite number ≥ 0.*got nan", id="epsilon-nan"),
        pytest.param(dict(step_size=0), "step_size must be a finite number > 0", id="step=0"),
        pytest.param(dict(norm="l1"), "norm must be one of 'linf', 'l2', got 'l1'", id="norm"),
    ],
)
def test_bad_l2_arguments_are_named(kwargs, match, batch):
    arguments = dict(epsilon=0.5, step_size=0.1, steps=2, norm="l2") | kwargs
    with pytest.raises(ValueError, match=match):
        pgd(tiny_cnn(), *batch, **arguments)


def test_an_l2_radius_above_one_is_accepted(batch):
    x, y = batch
    x_adv = pgd(tiny_cnn(), x, y, epsilon=3.0, step_size=1.0, steps=3, norm="l2")
    assert 1.0 < _l2_norms(x_adv - x).max() <= 3.0 + 1e-5


def test_cw_loss_matches_hand_computed_margins():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, -1.0]])
    assert cw_loss(logits, torch.tensor([0, 0])).tolist() == [2.0, -5.0]  # 3 - 1, 0 - 5
    wide = torch.tensor([[0.0, 0.5, 4.0, 7.0, -2.0]])  # 5 classes: not hard-coded to 10
    assert cw_loss(wide, torch.tensor([2])).tolist() == [3.0]  # 7 - 4
    with pytest.raises(ValueError, match="logits must have shape"):
        cw_loss(torch.zeros(3), torch.tensor([0]))


def test_restarts_take_the_per_example_worst_case(batch):
    x, y = batch
    model = tiny_cnn()
    kwargs = dict(epsilon=0.15, step_size=0.01, steps=2)
    generator = torch.Generator().manual_seed(7)
    fooled_by_each = [model(pgd(model, x, y, generator=generator, **kwargs)).argmax(1) != y for _ in range(4)]
    fooled_by_any = torch.stack(fooled_by_each).any(dim=0)
    assert 0 < int(fooled_by_each[0].sum()) < int(fooled_by_any.sum()) < len(y), "the case must be informative"
    x_adv = pgd(model, x, y, restarts=4, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(model(x_adv).argmax(1) != y, fooled_by_any)


def test_model_modes_and_parameter_gradients_are_restored():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Flatten(), nn.Linear(32, 3))
    model.train()
    model[1].eval()  # a frozen batch-norm inside a model in training
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    model[4].bias.grad = None
    modes = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    pgd(model, torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 0]), epsilon=0.1, step_size=0.02, steps=3)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, stats), "the eval-mode attack must not touch batch-norm statistics"
    assert model[4].bias.grad is None
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters() if p.grad is not None)


def test_attacks_work_under_inference_mode(batch):
    model = tiny_cnn()
    with torch.inference_mode():
        x, y = batch[0].clone(), batch[1].clone()
        x_adv = pgd(model, x, y, epsilon=0.1, step_size=0.02, steps=3)
    assert (x_adv - x).abs().max() > 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(dict(loss="l2"), ValueError, "loss must be one of 'ce', 'cw', got 'l2'", id="unknown-loss"),
        pytest.param(dict(restarts=0), ValueError, "restarts must be an integer ≥ 1, got 0", id="restarts<1"),
        pytest.param(dict(steps=-1), ValueError, "steps must be an integer ≥ 0", id="steps<0"),
        pytest.param(dict(steps=2.5), TypeError, "steps must be an integer", id="steps-float"),
        pytest.param(dict(epsilon=-0.1), ValueError, r"epsilon must lie in \[0, 1\]", id="epsilon<0"),
        pytest.param(dict(epsilon=8), ValueError, r"epsilon must lie in \[0, 1\].*8/255", id="epsilon>1"),
        pytest.param(dict(epsilon="8/256x"), ValueError, "fraction string like '8/255', got '8/256x'", id="eps-str"),
        pytest.param(dict(step_size=0), ValueError, r"step_size must lie in \(0, 1\]", id="step=0"),
        pytest.param(dict(model_mode="test"), ValueError, "model_mode must be one of", id="model-mode"),
        pytest.param(dict(init=torch.zeros(1)), ValueError, "init must have the shape of x", id="init-shape"),
    ],
)
def test_bad_attack_arguments_are_named(kwargs, error, match, batch):
    arguments = dict(epsilon=0.1, step_size=0.01, steps=2) | kwargs
    with pytest.raises(error, match=match):
        pgd(tiny_cnn(), *batch, **arguments)


def test_fraction_strings_are_accepted(batch):
    x, y = batch
    x_adv = pgd(tiny_cnn(), x, y, epsilon="8/255", step_size="2/255", steps=5)
    assert (x_adv - x).abs().max() == pytest.approx(8 / 255, abs=1e-6)


@pytest.fixture(scope="module")
def trained_fashion_mnist_model() -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    data = FashionMNISTDataModule(batch_size=128, train_size=10000, val_size=1000)
    module = NaturalModule(
        SmallCNN(), num_classes=10, mean=data.mean, std=data.std,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(module, datamodule=data)
    data.setup("test")
    return module.model, DataLoader(Subset(data.test_set, range(1000)), batch_size=500)


@needs_fashion_mnist
def test_stronger_attacks_never_help_a_trained_model(trained_fashion_mnist_model):
    model, loader = trained_fashion_mnist_model
    epsilon = 0.02  # small enough that no attack drives the accuracy to 0, so the comparisons say something

    def accuracy(attack) -> float:
        correct, total = count_correct(model, loader, attack)
        return 100.0 * correct / total

    clean = accuracy(None)
    fgsm_acc = accuracy(functools.partial(fgsm, epsilon=epsilon))
    pgd5 = accuracy(functools.partial(pgd, epsilon=epsilon, step_size=epsilon / 4, steps=5))
    pgd20 = accuracy(functools.partial(pgd, epsilon=epsilon, step_size=epsilon / 4, steps=20))
    assert clean > 70
    assert 5 < pgd20 <= pgd5 + 1.0
    assert pgd20 < fgsm_acc < clean


@needs_cuda
@pytest.mark.gpu
def test_a_cpu_generator_gives_gpu_images_the_starts_it_gives_cpu_images():
    x = torch.rand(4, 1, 6, 6)
    on_cpu = uniform_perturbation(x, 0.1, torch.Generator().manual_seed(3))
    on_gpu = uniform_perturbation(x.cuda(), 0.1, torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)
