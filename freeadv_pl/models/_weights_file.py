"""Weights files: a backbone filled from a plain ``state_dict`` (torchvision's, timm's, an export's) or from a
checkpoint of ``freeadv_pl fit``, with the normalization statistics the file carries."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from freeadv_pl.models._heads import head_classes, head_of, replace_head

Statistics = tuple[list[float], list[float]]

_SHOWN = 8  # keys listed per kind of mismatch


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> Statistics | None:
    """Load a weights file into ``backbone`` (in place) and return the normalization statistics the file carries.

    The file is read with ``torch.load(..., weights_only=True)`` (or safetensors for ``.safetensors``). It may be:

    * a plain ``state_dict`` of the backbone: a torchvision or timm weight file, ``net.state_dict()``, the
      ``model.backbone.pt`` of ``freeadv_pl export`` (the statistics are then read from the ``model.json`` beside
      it); a dict holding it under ``"state_dict"`` or ``"model"`` is unpacked, a DDP ``module.`` prefix removed;
    * a checkpoint of a ``freeadv_pl fit`` run (any training module): the backbone's weights are its
      ``model.backbone.*`` entries and the statistics its ``model.mean``/``model.std``.

    Every entry must fit: no key missing or left over, every shape equal, except the head, which takes the file's
    number of classes (:func:`~freeadv_pl.models.replace_head`; the returned backbone then has as many outputs as the
    file).

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
    return load_weights_file(backbone, path)[1]


def load_weights_file(backbone: nn.Module, path: str | Path) -> tuple[int | None, Statistics | None]:
    """Load ``path`` into ``backbone`` (:func:`~freeadv_pl.models.load_backbone_weights`); return the file's number
    of classes (that of the head now) and its statistics."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist: give the path of a state_dict (.pt, .pth, .safetensors) or of a "
            "checkpoint of `freeadv_pl fit` (lightning_logs/version_N/checkpoints/last.ckpt); on the command line, "
            "--model.init_args.backbone.init_args.weights PATH."
        )
    state, statistics = _backbone_entries(_read_state_dict(path), set(backbone.state_dict()))
    head_weight = state.get(f"{head_of(backbone)[0]}.weight")
    file_classes = int(head_weight.shape[0]) if isinstance(head_weight, Tensor) and head_weight.ndim > 1 else None
    if file_classes is not None and file_classes != head_classes(backbone):
        replace_head(backbone, file_classes)  # the file's number of classes, to receive its head
    _check_fit(backbone, state, path)
    backbone.load_state_dict(state, strict=False)  # _check_fit allows only num_batches_tracked to be missing
    json_statistics = _exported_statistics(path)
    return head_classes(backbone), statistics or json_statistics


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
