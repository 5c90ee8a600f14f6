"""PriorGuidedFGSMModule (FGSM-MEP) against a hand-written loop of Jia et al.'s training step (banks, momentum,
regulariser; without augmentation and with on-device crop + flip), exact resume with both banks, and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import CountingNet, ExplodingNet, quiet_trainer, tiny_cnn, tiny_loader
from dataset_files import write_cifar
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.v2 import functional as TF

from freeadv_pl import CIFAR10DataModule, PriorGuidedFGSMModule
from freeadv_pl._step_random import step_seed
from freeadv_pl.modules._delta_bank import BANK_KEY
from freeadv_pl.modules.mep import MOMENTUM_KEY

pytestmark = pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization:UserWarning")
# α ≠ ε, μ and λ off the defaults, so that mixing them up shows; the authors' label smoothing (true class 0.6).
EPSILON, ALPHA, DECAY, LAMBDA, FACTOR, RESET, SEED = 0.1, 0.07, 0.5, 2.0, 0.6, 2, 7


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _net(channels: int = 1, side: int = 6, classes: int = 3) -> nn.Module:
    """Conv (stride 2 on CIFAR's 32×32) + batch-norm + linear; batch-norm makes the model's mode at the prior matter."""
    torch.manual_seed(0)
    stride = 1 if side == 6 else 2
    out = (side - 1) // stride + 1
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, stride=stride, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * out * out, classes),
    )


def _mep(backbone: nn.Module, num_classes: int = 3, **options) -> PriorGuidedFGSMModule:
    smoothing = (1 - FACTOR) * num_classes / (num_classes - 1)  # the authors' factor in torch's convention
    settings = {"epsilon": EPSILON, "step_size": ALPHA, "momentum_decay": DECAY, "regularizer_weight": LAMBDA}
    settings.update(label_smoothing=smoothing, delta_reset_every=RESET, optimizer=_sgd)
    return PriorGuidedFGSMModule(backbone, num_classes, **{**settings, **options})


def _smoothed(label, factor, num_classes):
    """The authors' smoothed target: ``factor`` on the true class, the rest shared by the others."""
    one_hot = torch.eye(num_classes, dtype=torch.float64)[label]
    return one_hot * factor + (one_hot - 1.0) * ((factor - 1) / float(num_classes - 1))


def _smooth_loss(output, target):
    return (-target * F.log_softmax(output, dim=-1)).sum(dim=-1).mean()


def reference_mep_training(model, batches, size, *, per_epoch, num_classes, lamda, attack_in_train_mode, frames=None):
    """FGSM-MEP as the authors' loop writes it (index-keyed ``all_delta``/``all_momentum``, the smoothed loss, the
    L1-normalised momentum, ``next_delta`` stored and ``delta`` trained on, MSE between the two points' logits), in
    [0, 1] pixel space. The fresh banks of epochs 0, RESET, ... are drawn per batch from the generator the module seeds
    for that step, and the prior is projected onto valid pixels first (the two changes of docs/mep_notes.md). With
    ``frames``, x is the augmented batch and the banks' rows go in and out through pad → crop → flip per example.
    Returns the two banks."""
    opt = _sgd(model.parameters())
    all_delta = all_momentum = None
    for k, (X, y, index) in enumerate(batches):
        X, fresh = X.double(), (k // per_epoch) % RESET == 0
        shape = X.shape[1:] if frames is None else frames[k][0][3]
        if all_delta is None:
            all_delta, all_momentum = torch.zeros(size, *shape), torch.zeros(size, *shape)
        stored_delta, stored_momentum = all_delta[index], all_momentum[index]
        if fresh:
            generator = torch.Generator().manual_seed(step_seed(SEED, 0, k))
            temp = torch.empty(len(index), *shape).uniform_(-EPSILON, EPSILON, generator=generator)
            stored_delta = torch.clamp(ALPHA * torch.sign(temp), -EPSILON, EPSILON)
            stored_momentum = torch.zeros_like(stored_momentum)
        delta = _frame(stored_delta, frames, k).double()
        momentum = _frame(stored_momentum, frames, k).double()
        label_smoothing = _smoothed(y, FACTOR, num_classes)

        delta = torch.clamp(delta, -X, 1 - X)
        delta.requires_grad = True
        model.train(attack_in_train_mode)
        ori_output = model(X + delta)
        ori_loss = _smooth_loss(ori_output, label_smoothing)
        ori_loss.backward(retain_graph=True)
        x_grad = delta.grad.detach()
        grad_norm = torch.norm(x_grad, p=1)
        momentum = x_grad / grad_norm + momentum * DECAY
        next_delta = torch.clamp(torch.clamp(delta + ALPHA * torch.sign(momentum), -EPSILON, EPSILON), -X, 1 - X)
        delta = torch.clamp(torch.clamp(delta + ALPHA * torch.sign(x_grad), -EPSILON, EPSILON), -X, 1 - X).detach()
        model.train()
        output = model(X + delta)
        loss = _smooth_loss(output, label_smoothing) + lamda * F.mse_loss(output, ori_output)
        opt.zero_grad()
        loss.backward()
        opt.step()

        all_momentum[index] = _unframe(momentum.detach(), stored_momentum, frames, k)
        all_delta[index] = _unframe(next_delta.detach(), stored_delta, frames, k)
    return all_delta, all_momentum


def _frame(stored, frames, k):
    if frames is None:
        return stored
    out = []
    for image, (top, left, flipped, (_, height, width)) in zip(stored, frames[k], strict=True):
        crop = TF.crop(TF.pad(image, [4]), top, left, height, width)
        out.append(TF.horizontal_flip(crop) if flipped else crop)
    return torch.stack(out)


def _unframe(augmented, stored, frames, k):
    augmented = augmented.to(stored.dtype)
    if frames is None:
        return augmented
    out = []
    for image, old, (top, left, flipped, (_, height, width)) in zip(augmented, stored, frames[k], strict=True):
        canvas = TF.pad(old, [4]).clone()
        canvas[:, top : top + height, left : left + width] = TF.horizontal_flip(image) if flipped else image
        out.append(canvas[:, 4 : 4 + height, 4 : 4 + width])
    return torch.stack(out)


class _Batches(Callback):
    """The training batches as the module receives them, and the crop and flip of each example."""

    def __init__(self) -> None:
        self.batches, self.frames = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(tuple(item.clone() for item in batch[:3]))
        if len(batch) == 4:
            shape = tuple(batch[0].shape[1:])
            self.frames.append(
                [
                    (int(rows[0]), int(cols.min()), bool(cols[0] > cols[-1]), shape)
                    for rows, cols in zip(batch[3].rows, batch[3].cols, strict=True)
                ]
            )


def _indexed(n: int = 10, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=generator)
    # Some pixels at 0 and 1, where the fresh ±α prior leaves the valid range.
    x[:, :, 0] = 0.0
    x[:, :, -1] = 1.0
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=generator), torch.arange(n))


def _assert_close(ours, theirs, what):
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6, msg=what)


@pytest.mark.parametrize(
    ("attack_mode", "lamda"),
    [
        pytest.param("train", LAMBDA, id="train"),
        pytest.param("eval", LAMBDA, id="eval"),
        pytest.param("train", 0.0, id="no-reg"),
    ],
)
def test_matches_the_reference_mep_loop_with_shuffled_indices(attack_mode, lamda):
    backbone = _net()
    reference = copy.deepcopy(backbone).double()
    module = _mep(backbone, attack_mode=attack_mode, regularizer_weight=lamda)
    recorder = _Batches()
    trainer = quiet_trainer(max_epochs=4, precision="64-true", callbacks=[recorder])
    loader = DataLoader(_indexed(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(SEED)  # the run's seed, from which the module seeds each step's draws
    trainer.fit(module, train_dataloaders=loader)  # batches of 4, 4 and 2; fresh banks at epochs 0 and 2 only

    orders = [batch[2].tolist() for batch in recorder.batches]
    assert orders[0] != orders[3] and [len(order) for order in orders[:3]] == [4, 4, 2]
    delta, momentum = reference_mep_training(
        reference, recorder.batches, 10, per_epoch=3, num_classes=3, lamda=lamda,
        attack_in_train_mode=attack_mode == "train",
    )  # fmt: skip
    assert trainer.global_step == 12
    _assert_close(module.delta, delta, "prior bank")
    _assert_close(module.momentum, momentum, "momentum bank")
    for key, value in reference.state_dict().items():
        _assert_close(module.model.backbone.state_dict()[key].double(), value.double(), key)
    assert module.delta.abs().max() <= EPSILON and module.momentum.abs().max() > 0


def test_with_on_device_crop_and_flip_matches_the_reference(tmp_path):
    write_cifar(tmp_path, n_train=10, n_test=4)
    data = CIFAR10DataModule(tmp_path, batch_size=4, val_size=0, return_index=True)
    backbone = _net(channels=3, side=32, classes=10)
    reference = copy.deepcopy(backbone).double()
    module = _mep(backbone, num_classes=10, mean=None, std=None)
    recorder = _Batches()
    trainer = quiet_trainer(max_epochs=2, precision="64-true", callbacks=[recorder], limit_val_batches=0)
    torch.manual_seed(SEED)
    trainer.fit(module, datamodule=data)
    assert any(frame[2] for frames in recorder.frames for frame in frames), "some example was flipped"
    assert any(frame[:2] != (4, 4) for frames in recorder.frames for frame in frames), "some example was shifted"
    # The DataModule's mean and std were taken: the reference model normalises the same way.
    mean, std = module.model.mean.double(), module.model.std.double()
    normalised = nn.Sequential(_Normalise(mean, std), reference)
    delta, momentum = reference_mep_training(
        normalised, recorder.batches, 10, per_epoch=3, num_classes=10, lamda=LAMBDA, attack_in_train_mode=True,
        frames=recorder.frames,
    )  # fmt: skip
    assert module.delta.shape == (10, 3, 32, 32)
    _assert_close(module.delta, delta, "prior bank")
    _assert_close(module.momentum, momentum, "momentum bank")
    for key, value in reference.state_dict().items():
        _assert_close(module.model.backbone.state_dict()[key].double(), value.double(), key)


class _Normalise(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


@pytest.mark.parametrize("reset", [pytest.param(40, id="bank-carried"), pytest.param(1, id="fresh-every-epoch")])
def test_resuming_at_an_epoch_boundary_is_bitwise_the_uninterrupted_run(reset, tmp_path):
    loader = DataLoader(_indexed(n=4), batch_size=2)  # 2 steps per epoch, fixed order

    def fit(seed: int, epochs: int, ckpt_path=None, folder=None):
        module = _mep(tiny_cnn(seed=seed), delta_reset_every=reset)  # seeds the run: seed
        saver = [] if folder is None else [ModelCheckpoint(dirpath=folder, save_last=True)]
        trainer = quiet_trainer(max_epochs=epochs, enable_checkpointing=bool(saver), callbacks=saver)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
        assert trainer.global_step == 2 * epochs
        return module, trainer

    whole, whole_trainer = fit(seed=0, epochs=2)
    fit(seed=0, epochs=1, folder=tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved[BANK_KEY].shape == saved[MOMENTUM_KEY].shape == (4, 1, 6, 6) and saved[MOMENTUM_KEY].abs().max() > 0
    resumed, resumed_trainer = fit(seed=1, epochs=2, ckpt_path=tmp_path / "last.ckpt")  # another seed and weights
    assert torch.equal(resumed.delta, whole.delta) and torch.equal(resumed.momentum, whole.momentum)
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for ours, theirs in zip(
        resumed_trainer.optimizers[0].state_dict()["state"].values(),
        whole_trainer.optimizers[0].state_dict()["state"].values(),
        strict=True,
    ):
        assert torch.equal(ours["momentum_buffer"], theirs["momentum_buffer"])
    restored = PriorGuidedFGSMModule.load_from_checkpoint(tmp_path / "last.ckpt", backbone=tiny_cnn())
    assert torch.equal(restored.delta, saved[BANK_KEY]) and torch.equal(restored.momentum, saved[MOMENTUM_KEY])


def test_batches_without_indices_name_the_fix():
    with pytest.raises(ValueError, match=r"needs training batches \(x, y, index\).*return_index=True"):
        quiet_trainer().fit(_mep(tiny_cnn()), train_dataloaders=tiny_loader())


@pytest.mark.parametrize(("lamda", "passes", "backwards"), [(LAMBDA, 3, 3), (0.0, 2, 2)])
def test_passes_per_batch_count_the_backward_through_the_prior_point(lamda, passes, backwards):
    net = CountingNet()
    module = _mep(net, regularizer_weight=lamda)
    assert module.passes_per_batch == passes
    quiet_trainer().fit(module, train_dataloaders=DataLoader(_indexed(), batch_size=4))
    assert net.forwards == 2 * 3  # the prior point and the adversarial point, × 3 batches
    # FGSM step, optimizer step, and (λ > 0) the regulariser's gradient through the prior point's logits.
    assert net.backwards == backwards * 3


def test_the_defaults_are_the_authors():
    module = PriorGuidedFGSMModule(_net(), 3)
    assert module.epsilon == pytest.approx(8 / 255) and module.step_size == module.epsilon
    assert (module.momentum_decay, module.regularizer_weight, module.delta_reset_every) == (0.3, 10.0, 40)
    assert (module.label_smoothing, module.attack_mode, module.delta, module.momentum) == (0.0, "train", None, None)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"epsilon": 1.5}, ValueError, r"epsilon must lie in \[0, 1\]", id="epsilon"),
        pytest.param({"step_size": 0}, ValueError, r"step_size must lie in \(0, 1\]", id="step"),
        pytest.param({"momentum_decay": -0.1}, ValueError, "momentum_decay must be a finite number ≥ 0", id="decay"),
        pytest.param({"momentum_decay": "0.3"}, TypeError, "momentum_decay must be a finite number", id="decay-type"),
        pytest.param(
            {"regularizer_weight": float("inf")}, ValueError, "regularizer_weight must be a finite", id="lambda-inf"
        ),
        pytest.param({"label_smoothing": 1.2}, ValueError, r"label_smoothing must be a number in \[0, 1\]", id="ls"),
        pytest.param({"delta_reset_every": 0}, ValueError, "delta_reset_every must be an integer ≥ 1", id="reset"),
        pytest.param({"delta_bank": "gpu"}, ValueError, "delta_bank must be one of 'device', 'cpu'", id="bank"),
        pytest.param({"attack_mode": "test"}, ValueError, "attack_mode must be one of 'train', 'eval'", id="mode"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        PriorGuidedFGSMModule(_net(), 3, **kwargs)


def test_skipped_steps_keep_each_images_prior_and_momentum():
    net = ExplodingNet()
    net.explode = True
    module = _mep(net, on_nonfinite_loss="skip")
    quiet_trainer(max_epochs=1).fit(module, train_dataloaders=DataLoader(_indexed(), batch_size=4))
    # Every step was skipped: the fresh ±α priors and zero momenta are stored as they were drawn.
    assert torch.equal(module.delta.abs(), torch.full_like(module.delta, ALPHA)) and not module.momentum.any()
