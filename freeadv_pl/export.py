"""Export a trained classifier for use without freeadv_pl: a ``torch.export`` program that takes images in [0, 1]
(normalization inside), the backbone's ``state_dict`` and a JSON description beside it."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from freeadv_pl.models.normalization import InputNormalization

__all__ = ["export_classifier", "exported_files"]


def exported_files(path: str | os.PathLike) -> dict[str, Path]:
    """The three files an export writes: ``program`` (``model.pt2``), ``state_dict`` (``model.backbone.pt``) and
    ``info`` (``model.json``), for ``path = "model.pt2"``."""
    program = Path(path)
    if program.suffix != ".pt2":
        raise ValueError(f"the exported program's file must end in .pt2 (torch.export's format), got {str(path)!r}")
    return {
        "program": program,
        "state_dict": program.with_suffix(".backbone.pt"),
        "info": program.with_suffix(".json"),
    }


def export_classifier(
    model: InputNormalization,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    info: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Export ``model`` (normalization + backbone) on the CPU, in eval mode, with a dynamic batch dimension.

    Load the program with ``torch.export.load("model.pt2").module()``: it maps a ``(B, *input_shape)`` float32 batch
    of images in [0, 1] to logits, and needs only PyTorch. ``model.backbone.pt`` holds the backbone's
    ``state_dict`` (it expects normalized images; ``model.json`` gives the mean and std). Files are written to
    temporary names and renamed once all three exist, so a failure leaves none behind.

    Args:
        model: the classifier's :class:`~freeadv_pl.models.InputNormalization` (``module.model``).
        path: the program's file, ending in ``.pt2``.
        input_shape: one image's shape, e.g. ``(3, 32, 32)``.
        info: extra entries for ``model.json``.

    Returns:
        The written files, as :func:`exported_files` names them.

    Raises:
        ValueError: on a path not ending in ``.pt2``, a bad ``input_shape``, or a backbone ``torch.export`` cannot
            trace (the message gives torch's reason and the fixes).
    """
    files = exported_files(path)
    shape = tuple(int(size) for size in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be one image's shape, e.g. (3, 32, 32), got {tuple(input_shape)}")
    cpu_model = copy.deepcopy(model).cpu().float().eval()
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        program = torch.export.export(
            cpu_model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, strict=False
        )
    except Exception as error:  # torch.export raises many types (UserError, Unsupported, GuardOnDataDependent...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"torch.export cannot trace the backbone {type(model.backbone).__name__}: {reason}. Make its forward "
            "traceable (no Python branches on tensor values: use torch.where or torch.cond; no .item() or "
            "numpy), or rebuild the architecture yourself from the state_dict, "
            "module.model.backbone.state_dict(). Nothing was written."
        ) from error
    description = {
        "input": f"float32 images in [0, 1], shape (batch, {', '.join(map(str, shape))}); normalization is inside",
        "input_shape": list(shape),
        "output": "logits",
        "mean": None if model.mean is None else model.mean.flatten().tolist(),
        "std": None if model.std is None else model.std.flatten().tolist(),
        "backbone": f"{type(model.backbone).__module__}.{type(model.backbone).__qualname__}",
        "state_dict": f"{files['state_dict'].name}: the backbone's, for normalized inputs (x - mean) / std",
        "torch": torch.__version__,
        **(info or {}),
    }
    temporary = {name: file.with_name(f".{file.name}.tmp") for name, file in files.items()}
    files["program"].parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.export.save(program, temporary["program"])
        torch.save(cpu_model.backbone.state_dict(), temporary["state_dict"])
        temporary["info"].write_text(json.dumps(description, indent=2) + "\n")
        for name, file in files.items():
            temporary[name].replace(file)
    finally:
        for file in temporary.values():
            file.unlink(missing_ok=True)
    return files
