"""Backbones by name with pretrained weights (torchvision, timm), and any backbone initialised from a weights file.

A weights file is a plain ``state_dict`` (a torchvision or timm weight file, ``module.model.backbone.state_dict()``,
the ``model.backbone.pt`` of ``freeadv_pl export``) or a checkpoint of a ``freeadv_pl fit`` run. The functions return
``InputNormalization(net, mean, std)`` when the weights come with the statistics they were trained with, so that the
network keeps seeing its inputs normalized as in pre-training; otherwise the bare network. docs/finetuning.md has the
recipe and docs/models.md the list of sources.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from jsonargparse import class_from_function
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from freeadv_pl.models._heads import head_classes, set_classes
from freeadv_pl.models._weights_file import load_weights_file
from freeadv_pl.models.normalization import InputNormalization

# What makes a ``weights`` string a file rather than the name of published weights.
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")
_TIMM_EXTRA = 'pip install "freeadv_pl[timm]"'


def torchvision_backbone(
    name: str,
    weights: str | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A torchvision classification model by name, randomly initialised or with pretrained weights.

    With published weights the model is wrapped as ``InputNormalization(net, mean, std)`` with the statistics of the
    weights' own transforms (``weights.transforms().mean``/``.std``), so that it sees its inputs normalized as in
    pre-training; a training module then normalizes with these, not with the data's.

    Args:
        name: a name of ``torchvision.models.list_models()``, e.g. ``"resnet50"``.
        weights: None (random initialisation), ``"DEFAULT"``, the name of a weights enum member (``"IMAGENET1K_V2"``
            or ``"ResNet50_Weights.IMAGENET1K_V2"``), or a weights file (see
            :func:`~freeadv_pl.models.load_backbone_weights`). Published weights are downloaded into torch's hub cache
            (``torch.hub.get_dir()``) unless they are there already.
        num_classes: the number of logits; when it differs from the weights' (1,000 for ImageNet), the head is
            replaced by a freshly initialised one (:func:`~freeadv_pl.models.replace_head`). None: the weights' number.
        mean: per-channel means that replace the weights' (a file without statistics has none: give them here).
        std: per-channel standard deviations, given with ``mean``.
        model_kwargs: further arguments of the model's builder, e.g. ``{"dropout": 0.3}`` for an EfficientNet.

    Returns:
        The network, wrapped in :class:`InputNormalization` when statistics are known.

    Raises:
        ValueError: on an unknown model name (with the closest names) or weights name (with the model's weights),
            and as :func:`~freeadv_pl.models.load_backbone_weights` for a file.
        RuntimeError: when published weights cannot be downloaded; the message names the file to place in the cache
            or to pass as ``weights``.

    Example:
        >>> net = torchvision_backbone("resnet18", num_classes=10)  # random weights: no statistics, no wrapper
        >>> net.fc
        Linear(in_features=512, out_features=10, bias=True)
    """
    import torchvision.models

    _check_name(name, torchvision.models.list_models(), "torchvision.models.list_models()")
    kwargs = dict(model_kwargs or {})
    if weights is None:
        sized = {} if num_classes is None else {"num_classes": num_classes}
        return _wrap(torchvision.models.get_model(name, weights=None, **sized, **kwargs), mean, std)
    if _is_file(weights):
        return pretrained_backbone(torchvision.models.get_model(name, **kwargs), weights, num_classes, mean, std)
    published = _torchvision_weights(name, weights)
    try:
        net = torchvision.models.get_model(name, weights=published, **kwargs)
    except OSError as error:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(published.url).path).name
        raise RuntimeError(
            f"torchvision could not download {published} ({published.url}): {error}. Without a network, fetch the "
            f"file elsewhere and either put it at {cached}, where torchvision looks first, or pass its path: "
            f'weights="/path/to/{cached.name}" (from YAML: weights: /path/to/{cached.name}).'
        ) from error
    categories = published.meta.get("categories")
    if categories and num_classes is not None:
        set_classes(net, len(categories), num_classes)
    if mean is not None or std is not None:
        return _wrap(net, mean, std)
    transform = published.transforms()
    return _wrap(
        net, getattr(transform, "mean", None), getattr(transform, "std", None), f"the statistics of {published}"
    )


def timm_backbone(
    name: str,
    weights: str | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm model by name, randomly initialised or with pretrained weights (the optional extra
    ``pip install "freeadv_pl[timm]"``).

    With published weights the model is wrapped as ``InputNormalization(net, mean, std)`` with the statistics of
    their ``pretrained_cfg``, as :func:`torchvision_backbone` does.

    Args:
        name: a name of ``timm.list_models()``, optionally with a weights tag (``"resnet18.a1_in1k"``).
        weights: None (random initialisation), ``"DEFAULT"`` (the tag in ``name``, else timm's default tag), a tag
            (``"a1_in1k"`` or ``"resnet18.a1_in1k"``; ``timm.list_pretrained("resnet18.*")`` lists them), or a weights
            file (see :func:`~freeadv_pl.models.load_backbone_weights`). Published weights come from the Hugging Face
            hub (or a URL) through timm's cache.
        num_classes: the number of logits; when it differs from the weights', the head is replaced by a fresh one
            (``reset_classifier``). None: the weights' number.
        mean: per-channel means that replace the weights' (a file without statistics has none: give them here).
        std: per-channel standard deviations, given with ``mean``.
        model_kwargs: further arguments of ``timm.create_model``, e.g. ``{"in_chans": 1, "drop_rate": 0.2}``.

    Returns:
        The network, wrapped in :class:`InputNormalization` when statistics are known.

    Raises:
        ImportError: without timm; the message names the extra to install.
        ValueError: on an unknown model name or tag (with the closest names or the model's tags), and as
            :func:`~freeadv_pl.models.load_backbone_weights` for a file.
        RuntimeError: when published weights cannot be downloaded; the message names the cache and the local-file
            option.
    """
    timm = _import_timm()
    architecture, _, tag = name.partition(".")
    _check_name(architecture, timm.list_models(), "timm.list_models()")
    kwargs = dict(model_kwargs or {})
    if weights is None:
        sized = {} if num_classes is None else {"num_classes": num_classes}
        return _wrap(timm.create_model(name, pretrained=False, **sized, **kwargs), mean, std)
    if _is_file(weights):
        return pretrained_backbone(timm.create_model(name, pretrained=False, **kwargs), weights, num_classes, mean, std)
    if weights != "DEFAULT":
        tag = weights.removeprefix(architecture + ".")
    published = timm.list_pretrained(f"{architecture}.*")
    tag = tag or getattr(timm.models.get_pretrained_cfg(architecture), "tag", None)
    full_name = f"{architecture}.{tag}" if tag else architecture
    if full_name not in published:
        raise ValueError(
            f"timm has no weights {full_name!r}: those of {architecture} are "
            f"{', '.join(published) or 'none (use weights=None, or a file)'}; weights may also be a file path."
        )
    try:
        net = timm.create_model(full_name, pretrained=True, **kwargs)
    except OSError as error:
        raise RuntimeError(_timm_download_advice(full_name, error)) from error
    if num_classes is not None:
        set_classes(net, net.pretrained_cfg.get("num_classes"), num_classes)
    if mean is not None or std is not None:
        return _wrap(net, mean, std)
    config = net.pretrained_cfg
    return _wrap(net, config.get("mean"), config.get("std"), f"the statistics of timm's {full_name}")


def pretrained_backbone(
    backbone: nn.Module,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """``backbone`` initialised from a weights file, its head replaced for ``num_classes``, wrapped in
    :class:`InputNormalization` when the file carries statistics: what a fine-tuning config gives as its backbone.

    From YAML, as :class:`PretrainedBackbone`::

        backbone:
          class_path: freeadv_pl.models.PretrainedBackbone
          init_args:
            backbone: {class_path: freeadv_pl.SmallCNN, init_args: {in_channels: 1}}
            weights: natural/lightning_logs/version_0/checkpoints/last.ckpt

    Args:
        backbone: the network, built as the run that wrote the weights built it (the same class and arguments; the
            number of classes may differ).
        weights: a weights file, as :func:`~freeadv_pl.models.load_backbone_weights` reads it; None: no file,
            ``backbone`` keeps its weights (how ``load_from_checkpoint`` rebuilds a fine-tuned model before loading the
            checkpoint's).
        num_classes: the number of logits; when it differs from the file's, the head is replaced by a fresh one
            (:func:`~freeadv_pl.models.replace_head`). None: the file's number.
        mean: per-channel means that replace the file's statistics, or give them to a file without any.
        std: per-channel standard deviations, given with ``mean``.

    Returns:
        ``InputNormalization(backbone, mean, std)`` with the file's (or the given) statistics; ``backbone`` itself
        when there are none (one log line says so for a file: the training module then takes the data's).

    Raises:
        FileNotFoundError, ValueError: as :func:`~freeadv_pl.models.load_backbone_weights`.

    Example:
        >>> import tempfile
        >>> from freeadv_pl.models import SmallCNN
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save(SmallCNN().state_dict(), f"{folder}/natural.pt")
        ...     net = pretrained_backbone(SmallCNN(), f"{folder}/natural.pt", num_classes=5, mean=[0.3], std=[0.4])
        >>> type(net).__name__, net.backbone.classifier[-1].out_features, net.mean.flatten().tolist()
        ('InputNormalization', 5, [0.30000001192092896])
    """
    if weights is None:
        if num_classes is not None:
            set_classes(backbone, head_classes(backbone), num_classes)
        return _wrap(backbone, mean, std)
    file_classes, statistics = load_weights_file(backbone, weights)
    if num_classes is not None:
        set_classes(backbone, file_classes, num_classes)
    if mean is None and std is None and statistics is not None:
        mean, std = statistics
        return _wrap(backbone, mean, std, f"the statistics of {weights}")
    if mean is None and std is None:
        rank_zero_info(
            f"{weights} carries no normalization statistics: the model normalizes with the data's (give mean and std "
            "to use the ones the weights were trained with)."
        )
    return _wrap(backbone, mean, std)


def _wrap(net: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None, source: str = "") -> nn.Module:
    if mean is None and std is None:
        return net
    mean = None if mean is None else [float(value) for value in mean]
    std = None if std is None else [float(value) for value in std]
    if source:
        rank_zero_info(f"{type(net).__name__} normalizes its inputs with {source}: mean={mean}, std={std}.")
    return InputNormalization(net, mean, std)


def _is_file(weights: str | os.PathLike) -> bool:
    """Whether ``weights`` names a file (it exists, has a folder or a weight file's suffix) rather than weights."""
    text = os.fspath(weights)
    return isinstance(weights, os.PathLike) or Path(text).is_file() or os.sep in text or text.endswith(_FILE_SUFFIXES)


def _check_name(name: str, known: Sequence[str], listing: str) -> None:
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown model name {name!r}.{hint} {listing} lists them all.")


def _torchvision_weights(name: str, weights: str) -> Any:
    import torchvision.models

    enum = torchvision.models.get_model_weights(name)
    owner, _, member = weights.rpartition(".")
    if owner in ("", enum.__name__) and (member == "DEFAULT" or member in enum.__members__):
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    raise ValueError(
        f"torchvision has no weights {weights!r} for {name}: they are DEFAULT, "
        f"{', '.join(enum.__members__)} (or {enum.__name__}.<name>); weights may also be a file path."
    )


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"timm_backbone needs timm, an optional dependency: {_TIMM_EXTRA}") from error
    return timm


def _timm_download_advice(full_name: str, error: OSError) -> str:
    import timm.models

    config = timm.models.get_pretrained_cfg(full_name)
    hub_id = getattr(config, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE

        where = f"the Hugging Face hub's {hub_id}, cached under {HF_HUB_CACHE} (HF_HUB_CACHE)"
    else:
        where = f"{getattr(config, 'url', None)}, cached under {Path(torch.hub.get_dir()) / 'checkpoints'}"
    return (
        f"timm could not download the weights {full_name} from {where}: {error}. Without a network, copy a filled "
        'cache there from a machine that has one, or download the weight file and pass weights="/path/to/file.pth" '
        "(or .safetensors; from YAML: weights: /path/to/file.pth)."
    )


# The functions as classes, for a YAML ``class_path``: jsonargparse takes a function there in a plain parser, but not
# under a LightningCLI model whose arguments are linked (jsonargparse 4.40-4.53 pass the link targets on to
# add_function_arguments, which rejects them). Instantiating one of these calls the function and returns its result.
TorchvisionBackbone = class_from_function(torchvision_backbone, nn.Module, name="TorchvisionBackbone")
TimmBackbone = class_from_function(timm_backbone, nn.Module, name="TimmBackbone")
PretrainedBackbone = class_from_function(pretrained_backbone, nn.Module, name="PretrainedBackbone")
for _factory in (TorchvisionBackbone, TimmBackbone, PretrainedBackbone):
    _factory.__doc__ = f"{_factory.wrapped_function.__name__} for a YAML ``class_path``; calling it returns its result."
