"""Backbones by name with pretrained weights (torchvision, timm), and any backbone initialised from a weights file.

A weights file is a plain ``state_dict`` (a torchvision or timm weight file, ``module.model.backbone.state_dict()``,
the ``model.backbone.pt`` of ``freeadv_pl export``) or a checkpoint of a ``freeadv_pl fit`` run. The functions return
``InputNormalization(net, mean, std)`` when the weights come with the statistics they were trained with, so that the
network keeps seeing its inputs normalized as in pre-training; otherwise the bare network. docs/finetuning.md has the
recipe and docs/models.md the list of sources.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from jsonargparse import class_from_function
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from freeadv_pl._checks import check_int
from freeadv_pl.models.normalization import InputNormalization

Statistics = tuple[list[float], list[float]]

# What makes a ``weights`` string a file rather than the name of published weights.
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")
_TIMM_EXTRA = 'pip install "freeadv_pl[timm]"'
_SHOWN = 8  # keys listed per kind of mismatch


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
            or ``"ResNet50_Weights.IMAGENET1K_V2"``), or a weights file (see :func:`load_backbone_weights`). Published
            weights are downloaded into torch's hub cache (``torch.hub.get_dir()``) unless they are there already.
        num_classes: the number of logits; when it differs from the weights' (1,000 for ImageNet), the head is
            replaced by a freshly initialised one (:func:`replace_head`). None: the weights' number.
        mean: per-channel means that replace the weights' (a file without statistics has none: give them here).
        std: per-channel standard deviations, given with ``mean``.
        model_kwargs: further arguments of the model's builder, e.g. ``{"dropout": 0.3}`` for an EfficientNet.

    Returns:
        The network, wrapped in :class:`InputNormalization` when statistics are known.

    Raises:
        ValueError: on an unknown model name (with the closest names) or weights name (with the model's weights),
            and as :func:`load_backbone_weights` for a file.
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
        _set_classes(net, len(categories), num_classes)
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
            file (see :func:`load_backbone_weights`). Published weights come from the Hugging Face hub (or a URL)
            through timm's cache.
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
            :func:`load_backbone_weights` for a file.
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
        _set_classes(net, net.pretrained_cfg.get("num_classes"), num_classes)
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
        weights: a weights file, as :func:`load_backbone_weights` reads it; None: no file, ``backbone`` keeps its
            weights (how ``load_from_checkpoint`` rebuilds a fine-tuned model before loading the checkpoint's).
        num_classes: the number of logits; when it differs from the file's, the head is replaced by a fresh one
            (:func:`replace_head`). None: the file's number.
        mean: per-channel means that replace the file's statistics, or give them to a file without any.
        std: per-channel standard deviations, given with ``mean``.

    Returns:
        ``InputNormalization(backbone, mean, std)`` with the file's (or the given) statistics; ``backbone`` itself
        when there are none (one log line says so for a file: the training module then takes the data's).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_backbone_weights`.

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
            _set_classes(backbone, _head_classes(backbone), num_classes)
        return _wrap(backbone, mean, std)
    file_classes, statistics = _load(backbone, weights)
    if num_classes is not None:
        _set_classes(backbone, file_classes, num_classes)
    if mean is None and std is None and statistics is not None:
        mean, std = statistics
        return _wrap(backbone, mean, std, f"the statistics of {weights}")
    if mean is None and std is None:
        rank_zero_info(
            f"{weights} carries no normalization statistics: the model normalizes with the data's (give mean and std "
            "to use the ones the weights were trained with)."
        )
    return _wrap(backbone, mean, std)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> Statistics | None:
    """Load a weights file into ``backbone`` (in place) and return the normalization statistics the file carries.

    The file is read with ``torch.load(..., weights_only=True)`` (or safetensors for ``.safetensors``). It may be:

    * a plain ``state_dict`` of the backbone: a torchvision or timm weight file, ``net.state_dict()``, the
      ``model.backbone.pt`` of ``freeadv_pl export`` (the statistics are then read from the ``model.json`` beside
      it); a dict holding it under ``"state_dict"`` or ``"model"`` is unpacked, a DDP ``module.`` prefix removed;
    * a checkpoint of a ``freeadv_pl fit`` run (any training module): the backbone's weights are its
      ``model.backbone.*`` entries and the statistics its ``model.mean``/``model.std``.

    Every entry must fit: no key missing or left over, every shape equal, except the head, which takes the file's
    number of classes (:func:`replace_head`; the returned backbone then has as many outputs as the file).

    Args:
        backbone: the network to fill, without :class:`InputNormalization` around it.
        path: the weights file.

    Returns:
        ``(mean, std)`` as lists of floats, or None when the file carries no statistics.

    Raises:
        FileNotFoundError: when ``path`` is no file.
        ValueError: when the file holds no state_dict, or one that does not fit ``backbone``; the message lists the
            missing, unexpected and mismatching keys and names the fix.
    """
    return _load(backbone, path)[1]


def replace_head(backbone: nn.Module, num_classes: int) -> nn.Module:
    """Give ``backbone`` a freshly initialised classification head with ``num_classes`` outputs, in place.

    The head is found generically: a timm model's own ``reset_classifier``; otherwise the last ``nn.Linear``
    registered in the network, which is the head of torchvision's classifiers (``fc``, ``classifier[-1]``,
    ``heads.head``) and of this package's backbones. Auxiliary heads (GoogLeNet, Inception v3) are left as they are.

    Args:
        backbone: the network.
        num_classes: the new head's outputs.

    Returns:
        ``backbone``.

    Raises:
        ValueError: when ``num_classes`` < 1, or the network has no ``nn.Linear`` (SqueezeNet's head is a
            convolution): replace its head yourself.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> replace_head(SmallCNN(num_classes=10), 3).classifier[-1]
        Linear(in_features=128, out_features=3, bias=True)
    """
    check_int(num_classes, "num_classes", minimum=1)
    if callable(getattr(backbone, "reset_classifier", None)):
        backbone.reset_classifier(num_classes)
        return backbone
    name, head = _head(backbone)
    if not isinstance(head, nn.Linear):
        raise ValueError(  # noqa: TRY004  (a network without the expected layer: a value error for users)
            f"{type(backbone).__name__} has no nn.Linear classification head to replace: give it {num_classes} "
            "outputs yourself (replace its last layer) and leave num_classes out."
        )
    fresh = nn.Linear(
        head.in_features, num_classes, bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype
    )
    parent, _, attribute = name.rpartition(".")
    setattr(backbone.get_submodule(parent), attribute, fresh)
    return backbone


def _head(backbone: nn.Module) -> tuple[str, nn.Module | None]:
    """The classification head and its name: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    if callable(getattr(backbone, "get_classifier", None)):
        classifier = backbone.get_classifier()
        for name, module in backbone.named_modules():
            if module is classifier:
                return name, module
    linears = [(name, module) for name, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else ("", None)


def _head_classes(backbone: nn.Module) -> int | None:
    head = _head(backbone)[1]
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) else None


def _set_classes(backbone: nn.Module, file_classes: int | None, num_classes: int) -> None:
    if num_classes != file_classes:
        name = _head(backbone)[0] or "head"
        replace_head(backbone, num_classes)
        rank_zero_info(
            f"{type(backbone).__name__}'s head {name} ({file_classes} outputs) is replaced by a freshly initialised one "
            f"with {num_classes}."
        )


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


def _load(backbone: nn.Module, path: str | Path) -> tuple[int | None, Statistics | None]:
    """Load ``path`` into ``backbone`` (:func:`load_backbone_weights`); return the file's number of classes (that of
    the head now) and its statistics."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist: give the path of a state_dict (.pt, .pth, .safetensors) or of a "
            "checkpoint of `freeadv_pl fit` (lightning_logs/version_N/checkpoints/last.ckpt); on the command line, "
            "--model.init_args.backbone.init_args.weights PATH."
        )
    state, statistics = _backbone_entries(_read_state_dict(path), set(backbone.state_dict()))
    head_weight = state.get(f"{_head(backbone)[0]}.weight")
    file_classes = int(head_weight.shape[0]) if isinstance(head_weight, Tensor) and head_weight.ndim > 1 else None
    if file_classes is not None and file_classes != _head_classes(backbone):
        replace_head(backbone, file_classes)  # the file's number of classes, to receive its head
    _check_fit(backbone, state, path)
    backbone.load_state_dict(state, strict=False)  # _check_fit allows only num_batches_tracked to be missing
    json_statistics = _exported_statistics(path)
    return _head_classes(backbone), statistics or json_statistics


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or others on a file it cannot read
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise ValueError(
            f"{path} cannot be read as weights with torch.load(..., weights_only=True) ({reason}): it holds more than "
            "tensors, e.g. a pickled nn.Module. Save a plain state_dict instead: "
            "torch.save(net.state_dict(), 'weights.pt')."
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(value, Tensor) for value in loaded.values()):
        raise ValueError(
            f"{path} holds no state_dict (a dict of tensors), got {type(loaded).__name__}: save one with "
            "torch.save(net.state_dict(), 'weights.pt')."
        )
    return loaded


def _backbone_entries(state: Mapping[str, Tensor], target: set[str]) -> tuple[dict[str, Tensor], Statistics | None]:
    """The backbone's entries of ``state``, from under a training module's ``model.`` (or DDP's ``module.``) prefix
    and any ``InputNormalization`` (``mean``, ``std``, ``backbone.*``) around it, and the statistics of those
    wrappers (nested ones composed): stops at the level whose keys are ``target``'s."""
    state = dict(state)
    statistics = None
    while not target & set(state):
        first = {key.split(".", 1)[0] for key in state}
        if first in ({"model"}, {"module"}):
            state = {key.split(".", 1)[1]: value for key, value in state.items()}
        elif "backbone" in first and first <= {"backbone", "mean", "std"}:
            if "mean" in state and "std" in state:
                mean, std = state["mean"].flatten().double(), state["std"].flatten().double()
                if statistics is not None:  # outer (m1, s1) then inner (m2, s2): mean m1 + m2·s1, std s1·s2
                    outer_mean, outer_std = (torch.tensor(values, dtype=torch.float64) for values in statistics)
                    mean, std = outer_mean + mean * outer_std, outer_std * std
                statistics = (mean.tolist(), std.tolist())
            state = {key[len("backbone.") :]: value for key, value in state.items() if key.startswith("backbone.")}
        else:
            break
    return state, statistics


def _check_fit(backbone: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    own = backbone.state_dict()
    missing = [key for key in own if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in own]
    shapes = [
        f"{key} (file {tuple(state[key].shape)}, backbone {tuple(own[key].shape)})"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("missing in the file", missing), ("not in the backbone", unexpected), ("shapes", shapes)):
        if keys:
            shown = ", ".join(keys[:_SHOWN]) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")
            parts.append(f"{label}: {shown}")
    raise ValueError(
        f"the weights in {path} do not fit {type(backbone).__name__} ({'; '.join(parts)}). Build the backbone as the "
        "run that wrote them did: the same class and arguments (for a `freeadv_pl fit` checkpoint, those of "
        "model.init_args.backbone in its config.yaml); only the number of classes may differ (pass num_classes)."
    )


def _exported_statistics(path: Path) -> Statistics | None:
    """The mean and std in the ``model.json`` that ``freeadv_pl export`` writes beside ``model.backbone.pt``."""
    if not path.name.endswith(".backbone.pt"):
        return None
    info = path.with_name(path.name.removesuffix(".backbone.pt") + ".json")
    if not info.is_file():
        return None
    described = json.loads(info.read_text())
    mean, std = described.get("mean"), described.get("std")
    return (mean, std) if mean is not None and std is not None else None


# The functions as classes, for a YAML ``class_path``: jsonargparse takes a function there in a plain parser, but not
# under a LightningCLI model whose arguments are linked (jsonargparse 4.40-4.53 pass the link targets on to
# add_function_arguments, which rejects them). Instantiating one of these calls the function and returns its result.
TorchvisionBackbone = class_from_function(torchvision_backbone, nn.Module, name="TorchvisionBackbone")
TimmBackbone = class_from_function(timm_backbone, nn.Module, name="TimmBackbone")
PretrainedBackbone = class_from_function(pretrained_backbone, nn.Module, name="PretrainedBackbone")
for _factory in (TorchvisionBackbone, TimmBackbone, PretrainedBackbone):
    _factory.__doc__ = f"{_factory.wrapped_function.__name__} for a YAML ``class_path``; calling it returns its result."
