"""Backbones and the input-normalization wrapper."""

from freeadv_pl.models.normalization import InputNormalization
from freeadv_pl.models.preact_resnet import PreActResNet18
from freeadv_pl.models.small_cnn import SmallCNN
from freeadv_pl.models.wide_resnet import WideResNet

__all__ = ["InputNormalization", "PreActResNet18", "SmallCNN", "WideResNet"]
