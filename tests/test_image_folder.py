"""ImageFolderDataModule on generated PNG class folders: a fit through the command line, the statistics against a
hand computation, the seeded split, and each bad input named with the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from dataset_files import write_png_folder
from PIL import Image

from freeadv_pl.cli import build_cli
from freeadv_pl.data import ImageFolderDataModule

CLASSES = ["cat", "dog", "fox"]


def _fit_config(tmp_path, data_dir, channels: int, model: dict, data: dict) -> list[str]:
    backbone = {"in_channels": channels, "num_classes": 3, "width": 4, "hidden": 8, "image_size": 16}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {
            **model,
            "init_args": {
                **model.get("init_args", {}),
                "backbone": {"class_path": "freeadv_pl.SmallCNN", "init_args": backbone},
            },
        },
        "data": {
            "class_path": "freeadv_pl.data.ImageFolderDataModule",
            "init_args": {"data_dir": str(data_dir), "batch_size": 4, **data},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


@pytest.mark.parametrize(
    "mode, splits, size, model, data",
    [
        pytest.param(
            "RGB",
            ("train", "val"),
            (16, 16),
            {
                "class_path": "freeadv_pl.FreeAdversarialModule",
                "init_args": {"replays": 2, "epsilon": 0.03, "delta_memory": "example"},
            },
            {"return_index": True},  # the crop and flip run on the batch, for the per-image δ
            id="val-folder-rgb-free-example",
        ),
        pytest.param(
            "L",
            ("train",),
            (20, 18),
            {"class_path": "freeadv_pl.NaturalModule"},
            {"image_size": 16, "val_size": 3, "test_fraction": 0.2},
            id="held-out-test-grayscale-natural",
        ),
    ],
)
def test_fit_through_the_command_line(tmp_path, mode, splits, size, model, data):
    write_png_folder(tmp_path / "images", CLASSES, per_class=5, size=size, splits=splits, mode=mode)
    channels = 3 if mode == "RGB" else 1
    cli = build_cli(_fit_config(tmp_path, tmp_path / "images", channels, model, data))
    module, datamodule = cli.model, cli.datamodule
    assert datamodule.image_shape == (channels, 16, 16) and datamodule.classes == CLASSES
    assert module.num_classes == 3, "num_classes is linked from the folders"
    assert torch.allclose(module.model.mean.flatten(), torch.tensor(datamodule.mean, dtype=torch.float32))
    assert torch.allclose(module.model.std.flatten(), torch.tensor(datamodule.std, dtype=torch.float32))
    assert cli.trainer.global_step == 2 * getattr(module, "replays", 1)
    assert "val/acc" in cli.trainer.callback_metrics
    datamodule.setup("test")
    assert len(datamodule.test_set) == (15 if "val" in splits else 3)


def test_statistics_equal_a_hand_computation(tmp_path):
    write_png_folder(tmp_path, CLASSES, per_class=8, size=(12, 10), splits=("train",))
    data = ImageFolderDataModule(tmp_path, stats_samples=7, test_fraction=0.25, seed=3)
    sample = data.stats_files
    assert len(sample) == len(set(sample)) == 7
    assert sample == ImageFolderDataModule(tmp_path, stats_samples=7, test_fraction=0.25, seed=3).stats_files
    assert sample != ImageFolderDataModule(tmp_path, stats_samples=7, test_fraction=0.25, seed=4).stats_files
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255 for path in sample])
    assert np.allclose(data.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-9)
    assert np.allclose(data.std, pixels.std(axis=(0, 1, 2)), atol=1e-9)
    data.setup("test")
    assert not set(_paths(data.test_set)) & set(sample), "the statistics never read a test image"


def test_given_statistics_are_kept_and_nothing_is_read(tmp_path):
    data = ImageFolderDataModule(tmp_path / "absent", image_size=8, channels=1, mean=[0.4], std=[0.2], num_classes=4)
    assert (data.num_classes, data.mean, data.std, data.image_shape) == (4, (0.4,), (0.2,), (1, 8, 8))


def _paths(subset) -> list[str]:
    """The files of a train/val/test subset, in its order."""
    return [subset.dataset.samples[index][0] for index in subset.indices]


def test_seeded_split_is_reproducible_and_disjoint(tmp_path):
    written = write_png_folder(tmp_path, CLASSES, per_class=10, splits=("train",))
    splits = []
    for seed in (0, 0, 1):
        data = ImageFolderDataModule(tmp_path, test_fraction=0.2, val_size=4, seed=seed)
        data.setup("fit")
        data.setup("test")
        splits.append((_paths(data.train_set), _paths(data.val_set), _paths(data.test_set)))
    train, val, test = (set(paths) for paths in splits[0])
    assert (len(train), len(val), len(test)) == (20, 4, 6)
    assert train | val | test == {str(path) for path in written} and not (train & val or train & test or val & test)
    assert splits[1] == splits[0], "the same seed gives the same split"
    assert set(splits[2][2]) != test, "another seed gives another test split"


def test_a_test_folder_is_the_test_split(tmp_path):
    write_png_folder(tmp_path, CLASSES, per_class=3, splits=("train", "val"))
    write_png_folder(tmp_path, CLASSES, per_class=2, splits=("test",))
    data = ImageFolderDataModule(tmp_path)
    data.setup("test")
    assert {path.split("/")[-3] for path in _paths(data.test_set)} == {"test"}, "test/ before val/"
    chosen = ImageFolderDataModule(tmp_path, test_split="val")
    chosen.setup("test")
    assert len(chosen.test_set) == 9 and {path.split("/")[-3] for path in _paths(chosen.test_set)} == {"val"}


def test_return_index_labels_and_class_names(tmp_path):
    write_png_folder(tmp_path, CLASSES, per_class=3, size=(16, 12), splits=("train", "val"))
    data = ImageFolderDataModule(tmp_path, return_index=True, val_size=2)
    assert data.classes == CLASSES and data.num_classes == 3 and data.image_shape == (3, 12, 16)
    data.setup("fit")
    data.setup("test")
    image, label, index = data.train_set[4]
    assert index == 4 and image.shape == (3, 12, 16) and image.dtype == torch.float32
    path, stored_label = data.train_set.dataset.samples[data.train_set.indices[4]]
    assert label == stored_label == CLASSES.index(path.split("/")[-2]), "labels follow the sorted class folders"
    assert torch.equal(image, data.train_set[4][0]), "with return_index the crop and flip run on the batch"
    assert data._batch_augmentation.padding == 1, "an eighth of the shorter side"
    image, label = data.test_set[0]
    assert 0 <= image.min() and image.max() <= 1


def test_image_size_resizes_and_crops(tmp_path):
    write_png_folder(tmp_path, CLASSES[:2], per_class=2, size=(30, 20), splits=("train",), mode="L")
    Image.new("L", (25, 40), 128).save(tmp_path / "train" / "cat" / "other_size.png")
    data = ImageFolderDataModule(tmp_path, image_size=16, resize_size=18)
    data.setup("fit")
    assert data.image_shape == (1, 16, 16)
    assert {data.train_set[index][0].shape for index in range(len(data.train_set))} == {(1, 16, 16)}
    torch.manual_seed(0)
    crops = torch.stack([data.train_set[0][0] for _ in range(6)])
    assert (crops != crops[:1]).flatten(1).any(dim=1).sum() >= 3, "crop and flip vary the training image"
    assert torch.equal(data.test_set[0][0], data.test_set[0][0]), "evaluation is deterministic"


def _one_class(root):
    write_png_folder(root, ["cat"], per_class=3)


def _sizes_differ(root):
    write_png_folder(root, CLASSES, per_class=2)
    Image.new("RGB", (20, 16)).save(root / "train" / "dog" / "wide.png")


@pytest.mark.parametrize(
    "write, error, match",
    [
        pytest.param(None, FileNotFoundError, r"train does not exist: data_dir must hold train/", id="empty-folder"),
        pytest.param(_one_class, ValueError, r"single class folder \(cat\).*Add a folder of images", id="one-class"),
        pytest.param(
            _sizes_differ, ValueError, r"differ in size .*wide.png is 20×16.*set image_size=\.\.\.", id="sizes-differ"
        ),
    ],
)
def test_bad_folders_are_named_with_the_fix(tmp_path, write, error, match):
    if write is not None:
        write(tmp_path)
    with pytest.raises(error, match=match):
        ImageFolderDataModule(tmp_path, stats_samples=100).setup("fit")
    data = ImageFolderDataModule(tmp_path)
    with pytest.raises(error, match=match):  # what the command line reads first, right after construction
        _ = data.num_classes, data.mean, data.std


def test_a_size_outside_the_sample_is_found_when_read(tmp_path):
    write_png_folder(tmp_path, CLASSES, per_class=4, splits=("train", "val"))
    data = ImageFolderDataModule(tmp_path, stats_samples=2, mean=[0.5] * 3, std=[0.25] * 3)
    data.setup("test")  # the headers of the sample are read: all 16×16
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "fox" / "3.png")
    with pytest.raises(ValueError, match=r"fox/3.png is 8×8, the sampled images are 16×16.*set image_size="):
        [data.test_set[index] for index in range(len(data.test_set))]


def test_root_with_class_folders_and_a_missing_test_split(tmp_path):
    write_png_folder(tmp_path, CLASSES, per_class=1, splits=("train",))
    (tmp_path / "train").rename(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match=r"flat itself holds class folders, cat, dog, fox: move them into"):
        ImageFolderDataModule(tmp_path / "flat").setup("fit")
    write_png_folder(tmp_path, CLASSES, per_class=1, splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"holdout does not exist: data_dir must hold train/ and holdout/"):
        ImageFolderDataModule(tmp_path, test_split="holdout").setup("test")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"image_size": 32, "resize_size": 24}, "image_size=32 must not exceed resize_size=24", id="crop"),
        pytest.param({"resize_size": 24}, "resize_size=24 needs an image_size: set image_size=", id="resize-alone"),
        pytest.param({"channels": 2}, "channels must be 1 .*, got 2", id="channels"),
        pytest.param({"mean": [0.5]}, "mean and std are given together", id="mean-alone"),
        pytest.param({"mean": [0.5], "std": [0.2], "channels": 3}, "must have 3 values each", id="mean-length"),
        pytest.param({"test_fraction": 1.0}, r"test_fraction must lie in \(0, 1\)", id="test-fraction"),
        pytest.param({"test_split": "train"}, "test_split must name the folder", id="test-split"),
        pytest.param({"augment": "mixup"}, "augment must be one of 'crop_flip'", id="augment"),
        pytest.param(
            {"augment": "resized_crop_flip", "return_index": True},
            "RandomResizedCrop has no inverse. Set augment='crop_flip'",
            id="resized-crop-with-index",
        ),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(tmp_path, **kwargs)


def test_statistics_that_do_not_match_the_images(tmp_path):
    write_png_folder(tmp_path, CLASSES, per_class=2, mode="L")
    with pytest.raises(ValueError, match=r"mean and std have 3 values but the images have 1 channel.*channels=3"):
        ImageFolderDataModule(tmp_path, mean=[0.5] * 3, std=[0.25] * 3).setup("fit")
