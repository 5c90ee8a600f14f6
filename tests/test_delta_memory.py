"""``FreeAdversarialModule(delta_memory="example")`` against a hand-written Algorithm 2 loop with an index-keyed δ
(shuffled batches, a partial last batch, several epochs; without augmentation and with on-device crop + flip,
inverted by hand with torchvision's functions), resume, and the anti-collapse options (the bad inputs are in
test_bad_inputs.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, tiny_cnn
from dataset_files import write_cifar
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms.v2 import functional as TF

from freeadv_pl import CIFAR10DataModule, FreeAdversarialModule
from freeadv_pl.data.augmentation import RandomCropFlip
from freeadv_pl.modules._delta_bank import BANK_KEY

pytestmark = pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization:UserWarning")
EPSILON, STEP = 0.1, 0.03  # step ≠ ε, so that mixing them up shows
MEAN, STD = (0.4,), (0.3,)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _schedule(optimizer):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 11], gamma=0.5)


def _indexed(n: int = 10, seed: int = 0, shape=(1, 6, 6)) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=generator)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=generator), torch.arange(n))


def _shuffled(dataset: Dataset, batch_size: int = 4) -> DataLoader:
    """Shuffled batches of 4, 4 and 2, in an order that depends only on the seed."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(3))


def _free(backbone: nn.Module, replays: int, num_classes: int = 3, **options) -> FreeAdversarialModule:
    return FreeAdversarialModule(
        backbone,
        num_classes,
        replays=replays,
        epsilon=EPSILON,
        step_size=STEP,
        delta_memory="example",
        optimizer=_sgd,
        lr_scheduler=_schedule,
        **options,
    )


def reference_index_keyed_free(model, batches, size, *, replays, mean=MEAN, std=STD, frames=None):
    """Algorithm 2 with a per-image δ, written independently: ``bank[i]`` is image i's δ in its stored frame.

    ``batches`` yields (x, y, index) in the order the module saw them. With ``frames``, x is the augmented batch and
    ``frames[k]`` lists (top, left, flipped) per example: δ goes in through pad 4 → crop → flip and back through
    unflip → paste into the padded frame → un-pad, one example at a time with torchvision's functions."""
    optimizer = _sgd(model.parameters())
    scheduler = _schedule(optimizer)
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    bank = None
    for k, (x, y, index) in enumerate(batches):
        if bank is None:
            bank = torch.zeros(size, *(x.shape[1:] if frames is None else frames[k][0][3]))
        if frames is None:
            noise = bank[index].clone()
        else:
            noise = torch.stack([_crop(bank[i], frame) for i, frame in zip(index.tolist(), frames[k], strict=True)])
        for _ in range(replays):
            noise_batch = noise.clone().requires_grad_(True)
            loss = F.cross_entropy(model(((x + noise_batch).clamp(0, 1) - mean) / std), y)
            optimizer.zero_grad()
            loss.backward()
            noise = (noise_batch + STEP * torch.sign(noise_batch.grad)).clamp(-EPSILON, EPSILON).detach()
            optimizer.step()
            scheduler.step()
        for row, i in enumerate(index.tolist()):
            bank[i] = noise[row] if frames is None else _uncrop(noise[row], bank[i], frames[k][row])
    return bank


def _crop(image, frame):
    top, left, flipped, (_, height, width) = frame
    out = TF.crop(TF.pad(image, [4]), top, left, height, width)
    return TF.horizontal_flip(out) if flipped else out


def _uncrop(augmented, stored, frame):
    top, left, flipped, (_, height, width) = frame
    canvas = TF.pad(stored, [4]).clone()
    canvas[:, top : top + height, left : left + width] = TF.horizontal_flip(augmented) if flipped else augmented
    return canvas[:, 4 : 4 + height, 4 : 4 + width]


class _Batches(Callback):
    """The training batches as the module receives them (after the DataModule's on-device augmentation)."""

    def __init__(self) -> None:
        self.batches, self.frames = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(tuple(item.clone() for item in batch[:3]))
        if len(batch) == 4:
            crop_flip, shape = batch[3], tuple(batch[0].shape[1:])
            self.frames.append(
                [
                    (int(rows[0]), int(cols.min()), bool(cols[0] > cols[-1]), shape)
                    for rows, cols in zip(crop_flip.rows, crop_flip.cols, strict=True)
                ]
            )


@pytest.mark.parametrize("replays", [1, 3])
def test_example_memory_equals_a_hand_written_index_keyed_loop(replays):
    backbone = tiny_cnn()
    reference_model = copy.deepcopy(backbone)
    module = _free(backbone, replays, mean=MEAN, std=STD)
    recorder = _Batches()
    trainer = quiet_trainer(max_epochs=3, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=_shuffled(_indexed()))

    orders = [batch[2].tolist() for batch in recorder.batches]
    assert orders[0] != orders[3] and [len(order) for order in orders[:3]] == [4, 4, 2]  # shuffled, partial last
    bank = reference_index_keyed_free(reference_model, recorder.batches, 10, replays=replays)
    assert module.delta.shape == (10, 1, 6, 6) and trainer.global_step == 3 * 3 * replays
    torch.testing.assert_close(module.delta, bank, atol=1e-6, rtol=0)
    for ours, theirs in zip(module.model.backbone.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert (module.delta.flatten(1).abs().amax(1) > 0).all(), "every image's δ moved"


def _cifar_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))


def test_example_memory_with_on_device_crop_and_flip_equals_the_reference(tmp_path):
    write_cifar(tmp_path, n_train=10, n_test=4)
    data = CIFAR10DataModule(tmp_path, batch_size=4, val_size=0, return_index=True)
    backbone = _cifar_net()
    reference_model = copy.deepcopy(backbone)
    mean, std = (0.5, 0.4, 0.3), (0.3, 0.3, 0.3)
    module = _free(backbone, 2, num_classes=10, mean=mean, std=std)
    recorder = _Batches()
    trainer = quiet_trainer(max_epochs=2, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(module, datamodule=data)

    data.setup("fit")
    originals = torch.stack([data.train_set[i][0] for i in range(10)])
    for (x, _, index), frames in zip(recorder.batches, recorder.frames, strict=True):
        expected = torch.stack([_crop(originals[i], frame) for i, frame in zip(index.tolist(), frames, strict=True)])
        assert torch.equal(x, expected), "the DataModule's on-device crop + flip is torchvision's"
    assert any(frame[2] for frames in recorder.frames for frame in frames), "some example was flipped"
    assert any(frame[:2] != (4, 4) for frames in recorder.frames for frame in frames), "some example was shifted"
    bank = reference_index_keyed_free(
        reference_model, recorder.batches, 10, replays=2, mean=mean, std=std, frames=recorder.frames
    )
    assert module.delta.shape == (10, 3, 32, 32)
    torch.testing.assert_close(module.delta, bank, atol=1e-6, rtol=0)
    for ours, theirs in zip(module.model.backbone.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_crop_flip_round_trips_and_matches_torchvision():
    augment = RandomCropFlip(padding=4, generator=torch.Generator().manual_seed(0))
    images, delta = torch.rand(32, 3, 32, 32), torch.rand(32, 3, 32, 32)
    crop_flip = augment.draw(images)
    augmented = crop_flip.apply(images)
    flips = 0
    for b in range(32):
        top, left, flipped = (
            int(crop_flip.rows[b, 0]),
            int(crop_flip.cols[b].min()),
            bool(crop_flip.cols[b, 0] > crop_flip.cols[b, -1]),
        )
        flips += flipped
        assert torch.equal(augmented[b], _crop(images[b], (top, left, flipped, (3, 32, 32))))
    assert 0 < flips < 32
    assert torch.equal(crop_flip.invert(crop_flip.apply(delta), delta), delta)
    # A pixel the crop left out keeps its stored value; one it kept takes the augmented one.
    changed = crop_flip.invert(torch.zeros_like(delta), delta)
    kept_out = changed != 0
    assert kept_out.any() and torch.equal(changed[kept_out], delta[kept_out])


def _ckpt_fit(module, loader, epochs, tmp_path, ckpt_path=None):
    trainer = quiet_trainer(
        max_epochs=epochs, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def test_resuming_from_an_epoch_end_checkpoint_gives_the_uninterrupted_weights_and_bank(tmp_path):
    # A fixed order (the one-process shuffle's RNG is not in checkpoints); the bank is what is under test.
    loader = DataLoader(_indexed(), batch_size=4)
    whole = _free(tiny_cnn(), 2)
    quiet_trainer(max_epochs=3).fit(whole, train_dataloaders=loader)
    _ckpt_fit(_free(tiny_cnn(), 2), loader, 1, tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved[BANK_KEY].shape == (10, 1, 6, 6) and saved[BANK_KEY].abs().max() > 0
    resumed = _free(tiny_cnn(seed=1), 2)
    trainer = _ckpt_fit(resumed, loader, 3, tmp_path / "again", ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 3 * 3 * 2
    assert torch.equal(resumed.delta, whole.delta)
    for ours, theirs in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    restored = FreeAdversarialModule.load_from_checkpoint(tmp_path / "again" / "last.ckpt", backbone=tiny_cnn())
    assert torch.equal(restored.delta, whole.delta)


def test_a_resumed_bank_of_another_size_names_the_fix(tmp_path):
    _ckpt_fit(_free(tiny_cnn(), 1), DataLoader(_indexed(), batch_size=4), 1, tmp_path)
    with pytest.raises(ValueError, match="resume with the training set of the run that wrote it"):
        _ckpt_fit(
            _free(tiny_cnn(), 1), DataLoader(_indexed(n=8), batch_size=4), 2, tmp_path / "b", tmp_path / "last.ckpt"
        )


class _Starts(Callback):
    def __init__(self) -> None:
        self.before = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(None if module.delta is None else module.delta.clone())


def test_reset_every_zeroes_the_bank_at_those_epochs_only():
    starts = _Starts()
    module = _free(tiny_cnn(), 2, delta_reset_every=2)
    quiet_trainer(max_epochs=3, callbacks=[starts]).fit(module, train_dataloaders=DataLoader(_indexed(), batch_size=4))
    first_of_epoch = starts.before[0::3]  # 3 batches per epoch
    assert not first_of_epoch[0].any() and first_of_epoch[1].any() and not first_of_epoch[2].any()


def test_epsilon_warmup_bounds_delta_by_the_ramped_epsilon():
    module = _free(tiny_cnn(), 3, epsilon_warmup_epochs=2)
    module.step_size = EPSILON  # sign steps reach the bound in force
    quiet_trainer(max_epochs=1).fit(module, train_dataloaders=DataLoader(_indexed(), batch_size=4))
    # After epoch 0 of 2 the ramp is at 1/2 (the last batch held images 8 and 9, at 3/6 of the ramp).
    assert float(module.delta.abs().max()) == pytest.approx(EPSILON / 2)
    assert float(module.delta[:4].abs().max()) == pytest.approx(EPSILON / 6)  # batch 0: 1/6 of the ramp


def test_start_noise_moves_the_stored_delta_and_stays_in_the_ball():
    quiet = _free(tiny_cnn(), 1)
    noisy = _free(tiny_cnn(), 1, delta_start_noise=1.0)
    for module in (quiet, noisy):
        torch.manual_seed(0)
        quiet_trainer(max_epochs=1).fit(module, train_dataloaders=DataLoader(_indexed(), batch_size=4))
    # From δ = 0 one sign step gives ±STEP exactly; the noise spreads the values inside [-ε, ε].
    moved = quiet.delta[quiet.delta != 0].abs()
    torch.testing.assert_close(moved, torch.full_like(moved, STEP))
    assert noisy.delta.abs().max() <= EPSILON + 1e-7 and len(noisy.delta.unique()) > 20
