"""FashionMNISTDataModule on IDX files written here in the exact format, and on the real files when installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_fashion_mnist
from dataset_files import write_fashion_mnist, write_idx
from freeadv_pl import FashionMNISTDataModule
from freeadv_pl.data.fashion_mnist import read_idx


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_reads_idx_files_into_unit_range_tensors(tmp_path, compress):
    write_fashion_mnist(tmp_path, compress=compress)
    data = FashionMNISTDataModule(tmp_path, batch_size=8, val_size=10)
    data.setup("fit")
    assert len(data.train_set) == 50 and len(data.val_set) == 10
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    data.setup("test")
    assert len(data.test_set) == 20


def test_split_is_seeded_disjoint_and_train_size_caps_it(tmp_path):
    write_fashion_mnist(tmp_path)

    def split(seed, **kwargs):
        data = FashionMNISTDataModule(tmp_path, val_size=10, seed=seed, **kwargs)
        data.setup("fit")
        return data.train_set.indices, data.val_set.indices

    train, val = split(0)
    assert split(0) == (train, val)
    assert split(1) != (train, val)
    assert not set(train) & set(val) and len(set(train) | set(val)) == 60
    assert split(0, train_size=7)[0] == train[:7]


def test_val_size_zero_validates_on_the_test_split(tmp_path):
    write_fashion_mnist(tmp_path)
    data = FashionMNISTDataModule(tmp_path, val_size=0, batch_size=32)
    data.setup("fit")
    assert len(data.train_set) == 60 and len(data.val_dataloader().dataset) == 20


def test_finds_torchvision_layout(tmp_path):
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    data = FashionMNISTDataModule(tmp_path, val_size=0)
    data.setup("test")
    assert len(data.test_set) == 20


def test_missing_files_say_how_to_get_them(tmp_path):
    data = FashionMNISTDataModule(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*download=True.*data_dir"):
        data.setup("fit")


def test_a_corrupt_file_is_reported(tmp_path):
    write_fashion_mnist(tmp_path, compress=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(20))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8)[:, :, :27], compress=False)
    with pytest.raises(ValueError, match="do not match"):
        FashionMNISTDataModule(tmp_path, val_size=1).setup("fit")


def test_val_size_must_leave_training_examples(tmp_path):
    write_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="val_size=60 leaves no training example"):
        FashionMNISTDataModule(tmp_path, val_size=60).setup("fit")


@needs_fashion_mnist
def test_the_real_dataset():
    data = FashionMNISTDataModule(val_size=5000)
    data.setup("fit")
    data.setup("test")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (55000, 5000, 10000)
    images, labels = data.test_set.dataset.tensors
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert images.min() == 0 and images.max() == 1
    # The dataset's published statistics, which the model's normalization uses.
    train_images = data.train_set.dataset.tensors[0]
    assert train_images.mean().item() == pytest.approx(data.mean[0], abs=1e-3)
    assert train_images.std().item() == pytest.approx(data.std[0], abs=1e-3)
