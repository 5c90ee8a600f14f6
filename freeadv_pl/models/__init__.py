"""Backbones and the input-normalization wrapper."""

from freeadv_pl.models.normalization import InputNormalization
from freeadv_pl.models.small_cnn import SmallCNN

__all__ = ["InputNormalization", "SmallCNN"]
