"""Backbones, the input-normalization wrapper, and backbones by name or from a file with pretrained weights."""

from freeadv_pl.models._heads import replace_head
from freeadv_pl.models._weights_file import load_backbone_weights
from freeadv_pl.models.normalization import InputNormalization
from freeadv_pl.models.preact_resnet import PreActResNet18
from freeadv_pl.models.pretrained import (
    PretrainedBackbone,
    TimmBackbone,
    TorchvisionBackbone,
    pretrained_backbone,
    timm_backbone,
    torchvision_backbone,
)
from freeadv_pl.models.small_cnn import SmallCNN
from freeadv_pl.models.wide_resnet import WideResNet

__all__ = [
    "InputNormalization",
    "PreActResNet18",
    "PretrainedBackbone",
    "SmallCNN",
    "TimmBackbone",
    "TorchvisionBackbone",
    "WideResNet",
    "load_backbone_weights",
    "pretrained_backbone",
    "replace_head",
    "timm_backbone",
    "torchvision_backbone",
]
