"""LightningDataModules: images in [0, 1], normalization left to the model."""

from freeadv_pl.data.augmentation import CropFlip, RandomCropFlip
from freeadv_pl.data.base import VisionDataModule
from freeadv_pl.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from freeadv_pl.data.fashion_mnist import FashionMNISTDataModule
from freeadv_pl.data.image_folder import ImageFolderDataModule
from freeadv_pl.data.imagenet import ImageNetDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CropFlip",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "RandomCropFlip",
    "VisionDataModule",
]
