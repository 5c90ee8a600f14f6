"""CIFAR10DataModule and CIFAR100DataModule on pickled batches written here in the exact format torchvision reads."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets.cifar

from conftest import quiet_trainer
from dataset_files import write_cifar
from freeadv_pl import CIFAR10DataModule, CIFAR100DataModule, NaturalModule, WideResNet
from freeadv_pl.data.cifar import read_cifar_batches

def edit_batch(path, key, change) -> None:
    """Replace ``entry[key]`` of a pickled CIFAR batch by ``change(entry[key])``."""
    with open(path, "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    entry[key] = change(entry[key])
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)


DATAMODULES = [
    pytest.param(CIFAR10DataModule, 10, "CIFAR10", id="cifar10"),
    pytest.param(CIFAR100DataModule, 100, "CIFAR100", id="cifar100"),
]


@pytest.mark.parametrize("datamodule, num_classes, torchvision_name", DATAMODULES)
def test_reads_what_torchvision_reads(tmp_path, monkeypatch, datamodule, num_classes, torchvision_name):
    write_cifar(tmp_path, num_classes, n_train=50, n_test=20)
    # torchvision checks the MD5 sums of the real files; skip only that check to read the generated ones.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    reference_class = getattr(torchvision.datasets, torchvision_name)
    data = datamodule(tmp_path, val_size=0, augment=False)
    data.setup("fit")
    data.setup("test")
    for train, ours in ((True, data.train_set), (False, data.test_set)):
        reference = reference_class(str(tmp_path), train=train)
        images = torch.stack([ours[i][0] for i in range(len(ours))])
        labels = [int(ours[i][1]) for i in range(len(ours))]
        # torchvision keeps HWC images; the training split is shuffled by the seeded split.
        expected = torch.from_numpy(reference.data).permute(0, 3, 1, 2)[list(ours.indices)]
        assert torch.equal((images * 255).round().to(torch.uint8), expected)
        assert labels == [reference.targets[i] for i in ours.indices]
        assert sorted(ours.indices) == list(range(len(reference)))
    assert data.classes == reference.classes


@pytest.mark.parametrize("datamodule, num_classes, torchvision_name", DATAMODULES)
def test_training_images_are_augmented_and_evaluation_images_are_not(
    tmp_path, datamodule, num_classes, torchvision_name
):
    write_cifar(tmp_path, num_classes)
    data = datamodule(tmp_path, val_size=10, seed=0)
    data.setup("fit")
    torch.manual_seed(0)
    train_draws = torch.stack([data.train_set[0][0] for _ in range(8)])
    val_draws = torch.stack([data.val_set[0][0] for _ in range(3)])
    assert train_draws.shape == (8, 3, 32, 32) and train_draws.dtype == torch.float32
    assert 0 <= train_draws.min() and train_draws.max() <= 1
    assert (train_draws != train_draws[:1]).flatten(1).any(dim=1).sum() >= 6, "random crop/flip vary the image"
    assert (train_draws == 0).any(), "the 4-pixel zero padding shows in some crops"
    assert (val_draws == val_draws[:1]).all(), "validation images are not augmented"
    raw = data.train_set.dataset.tensors[0][data.train_set.indices[0]]
    torch.testing.assert_close(datamodule(tmp_path, augment=False).train_transform()(raw), raw.float() / 255)


def test_split_subsets_and_a_full_fit_through_a_trainer(tmp_path):
    write_cifar(tmp_path, 10, n_train=50, n_test=20)
    data = CIFAR10DataModule(tmp_path, batch_size=8, val_size=10, train_size=24, test_size=12)
    data.setup("fit")
    data.setup("test")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (24, 10, 12)
    assert not set(data.train_set.indices) & set(data.val_set.indices)
    module = NaturalModule(WideResNet(depth=10, widen_factor=1), num_classes=10, mean=data.mean, std=data.std)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    assert trainer.callback_metrics["val/acc"].numel() == 1


def test_finds_the_files_in_data_dir_itself(tmp_path):
    folder = write_cifar(tmp_path, 100, n_train=30, n_test=10)
    data = CIFAR100DataModule(folder, val_size=0)
    data.setup("test")
    assert len(data.test_set) == 10 and data.classes[:2] == ["fine_0", "fine_1"]


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/.*download=True.*cifar-10-python\.tar\.gz"):
        CIFAR10DataModule(tmp_path).setup("fit")


def test_a_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(root, train, download):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(RuntimeError, match=r"could not download into .*name resolution.*cifar-100-python/.*extract"):
        CIFAR100DataModule(tmp_path, download=True).prepare_data()
    write_cifar(tmp_path, 100)
    CIFAR100DataModule(tmp_path, download=True).prepare_data()  # the files are there: nothing to download


def test_cifar10_files_are_not_taken_for_cifar100(tmp_path):
    folder = write_cifar(tmp_path, 10)
    (folder / "train").write_bytes((folder / "data_batch_1").read_bytes())
    (folder / "test").write_bytes((folder / "test_batch").read_bytes())
    (folder / "meta").write_bytes((folder / "batches.meta").read_bytes())
    with pytest.raises(ValueError, match="has no .fine_label_names.*is this CIFAR-100"):
        CIFAR100DataModule(folder).setup("fit")


def test_read_cifar_batches_rejects_a_truncated_batch(tmp_path):
    folder = write_cifar(tmp_path, 10, n_train=10)
    edit_batch(folder / "data_batch_1", "data", lambda data: data[:, :100])
    with pytest.raises(ValueError, match="N×3072 bytes"):
        read_cifar_batches([folder / "data_batch_1"], "labels")


@pytest.mark.parametrize("world_size, expected", [(1, 128), (4, 32)])
def test_global_batch_size_is_split_across_processes(tmp_path, world_size, expected):
    write_cifar(tmp_path, 10)
    data = CIFAR10DataModule(tmp_path, batch_size=128, val_size=0, batch_size_is_global=True)
    data.setup("fit")
    data.trainer = SimpleNamespace(world_size=world_size, global_rank=0)
    assert data.train_dataloader().batch_size == expected
    data.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(ValueError, match="batch_size=128 is a total over 3 processes.*multiple of 3"):
        data.train_dataloader()


def test_labels_outside_the_classes_are_rejected(tmp_path):
    folder = write_cifar(tmp_path, 10, n_train=10)
    edit_batch(folder / "test_batch", "labels", lambda labels: [12] * len(labels))
    with pytest.raises(ValueError, match=r"range over \[12, 12\], expected \[0, 9\]"):
        CIFAR10DataModule(tmp_path, val_size=0).setup("test")
