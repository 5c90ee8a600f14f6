"""LightningDataModules: images in [0, 1], normalization left to the model."""

from freeadv_pl.data.base import VisionDataModule
from freeadv_pl.data.fashion_mnist import FashionMNISTDataModule

__all__ = ["FashionMNISTDataModule", "VisionDataModule"]
