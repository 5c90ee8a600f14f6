"""ImageNetDataModule on ImageFolder trees of JPEGs written here: preprocessing, a fit, and each layout mistake."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import quiet_trainer
from dataset_files import write_image_folder
from freeadv_pl import ImageNetDataModule, NaturalModule, PreActResNet18

CLASSES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture
def tree(tmp_path):
    write_image_folder(tmp_path, CLASSES, per_class=4, size=(50, 40))
    return tmp_path


def test_preprocessing_and_labels(tree):
    data = ImageNetDataModule(tree, num_classes=3, image_size=32, resize_size=36, batch_size=4)
    data.setup("fit")
    assert data.classes == CLASSES and data.image_shape == (3, 32, 32)
    assert len(data.train_set) == 12 and len(data.test_set) == 12, "val_size=0: validation runs on val/"
    image, label = data.test_set[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert label == 1, "labels follow the sorted class folders"
    assert torch.equal(data.test_set[5][0], image), "evaluation preprocessing is deterministic"
    torch.manual_seed(0)
    crops = torch.stack([data.train_set[0][0] for _ in range(6)])
    assert crops.shape == (6, 3, 32, 32)
    assert (crops != crops[:1]).flatten(1).any(dim=1).sum() >= 4, "RandomResizedCrop + flip vary the image"


def test_fit_and_test_through_a_trainer(tree):
    data = ImageNetDataModule(tree, num_classes=3, image_size=32, resize_size=36, batch_size=4, test_size=6)
    module = NaturalModule(PreActResNet18(num_classes=3), num_classes=3, mean=data.mean, std=data.std)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    (result,) = trainer.test(module, datamodule=data, verbose=False)
    assert 0 <= result["test/acc"] <= 1 and len(data.test_set) == 6


def test_held_out_validation_needs_only_train(tree):
    shutil.rmtree(tree / "val")
    data = ImageNetDataModule(tree, num_classes=3, val_size=3)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (9, 3)


def _remove_val(root):
    shutil.rmtree(root / "val")


def _flatten_val(root):
    for image in list((root / "val").rglob("*.JPEG")):
        image.rename(root / "val" / image.name)
    for folder in CLASSES:
        (root / "val" / folder).rmdir()


def _extra_val_class(root):
    write_image_folder(root, ["n09999999"], per_class=1, splits=("val",))


def _missing_val_class(root):
    shutil.rmtree(root / "val" / CLASSES[2])


def _empty_class(root):
    for image in (root / "train" / CLASSES[1]).iterdir():
        image.unlink()


@pytest.mark.parametrize(
    "damage, num_classes, error, match",
    [
        pytest.param(
            _remove_val, 3, FileNotFoundError, r"val does not exist: data_dir must hold train/ and val/", id="no-val"
        ),
        pytest.param(_flatten_val, 3, ValueError, r"holds images directly.*val/<wnid>/", id="flat-val"),
        pytest.param(_extra_val_class, 3, ValueError, r"only in val/: n09999999", id="extra-class"),
        pytest.param(_missing_val_class, 3, ValueError, r"missing from val/: n01484850", id="missing-class"),
        pytest.param(
            _empty_class, 3, ValueError, r"1 class folder\(s\) of .*train hold no image.*n01443537", id="empty"
        ),
        pytest.param(
            None,
            1000,
            ValueError,
            r"has 3 classes but num_classes=1000: set data.init_args.num_classes to 3",
            id="num-classes",
        ),
    ],
)
def test_layout_mistakes_are_named_with_the_fix(tree, damage, num_classes, error, match):
    if damage is not None:
        damage(tree)
    with pytest.raises(error, match=match):
        ImageNetDataModule(tree, num_classes=num_classes).setup("fit")


def test_a_missing_folder_and_bad_sizes(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: set data_dir"):
        ImageNetDataModule(tmp_path / "imagenet").setup("test")
    with pytest.raises(ValueError, match="image_size=256 must not exceed resize_size=224"):
        ImageNetDataModule(tmp_path, image_size=256, resize_size=224)


@pytest.mark.parametrize("setting", [{"stats_samples": 5}, {"mean": [0.5, 0.5, 0.5]}, {"test_split": "test"}])
def test_the_folder_settings_imagenet_fixes_are_refused(setting, tmp_path):
    with pytest.raises(ValueError, match=f"ImageNetDataModule fixes {next(iter(setting))} .*use ImageFolderDataModule"):
        ImageNetDataModule(tmp_path, **setting)
