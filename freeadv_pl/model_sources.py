"""A classifier to evaluate, from wherever it comes: a ``freeadv_pl fit`` checkpoint, an exported program, a
torchvision or timm model by name, or a function of the user's (``freeadv_pl evaluate --model``).

Every model returned maps images in [0, 1] to logits: the normalization is inside it, so ε means pixels.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import os
import pickle
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import Tensor, nn

from freeadv_pl.models.pretrained import timm_backbone, torchvision_backbone

__all__ = ["LoadedModel", "load_model", "module_from_fit_checkpoint"]

_HUBS = ("torchvision", "timm")
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # package.module:function
_FORMS = (
    "a checkpoint of `freeadv_pl fit` (path/to/last.ckpt), an exported program (model.pt2, from `freeadv_pl export`), "
    "torchvision:NAME or timm:NAME (with --weights), or package.module:function returning an nn.Module that takes "
    "images in [0, 1]"
)


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns."""

    #: Maps images in [0, 1] to logits, on the CPU.
    model: nn.Module
    #: One line for reports: what the model is and where it came from.
    description: str
    #: ``"checkpoint"``, ``"exported"``, ``"torchvision"``, ``"timm"`` or ``"function"``.
    kind: str


def load_model(
    source: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    model_config: str | os.PathLike | None = None,
) -> LoadedModel:
    """The classifier named by ``source``, on the CPU.

    Args:
        source: one of

            - a checkpoint of ``freeadv_pl fit`` (``.ckpt``): its module is rebuilt with
              ``load_from_checkpoint``, or else from the run's config (``model_config``; default: the
              ``config.yaml`` beside the ``checkpoints`` folder);
            - an exported program (``.pt2``, :func:`freeadv_pl.export.export_classifier`);
            - ``torchvision:NAME`` or ``timm:NAME``, a model of that library built by
              ``freeadv_pl.models.torchvision_backbone``/``timm_backbone`` (its normalization inside);
            - ``package.module:function``: ``function()`` returns the ``nn.Module`` (an ``nn.Module`` subclass is
              instantiated, an instance used as it is); the working directory is searched too.
        weights: the torchvision/timm weights (``DEFAULT``, an enum name, a file); None: random initialization.
        num_classes: the number of classes of a torchvision/timm model built without weights.
        model_config: the config of the ``freeadv_pl fit`` run that wrote a checkpoint.

    Returns:
        The model, a description and the source's kind.

    Raises:
        ValueError: on a source of no known form, a file that is no classifier checkpoint, or a checkpoint without
            the config to rebuild it.
        FileNotFoundError: on a checkpoint, program or config that does not exist.
        ImportError: on a ``module:function`` whose module or function cannot be imported.
        TypeError: on a function that does not return an ``nn.Module``.

    Example:
        >>> loaded = load_model("torch.nn:Identity")  # package.module:function; a class is instantiated
        >>> loaded.kind, loaded.description
        ('function', 'Identity from torch.nn:Identity()')
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"--model must name a model: {_FORMS}; got {source!r}")
    hub, _, name = source.partition(":")
    if hub in _HUBS:
        return _from_hub(hub, name, weights, num_classes)
    path = Path(source).expanduser()
    if path.suffix == ".pt2":
        return _from_exported_program(path)
    if path.is_file() or path.suffix in (".ckpt", ".pt", ".pth"):
        return _from_checkpoint(path, None if model_config is None else Path(model_config))
    if _FUNCTION.match(source):
        return _from_function(source)
    raise ValueError(f"--model {source!r} is no file and no model name: pass {_FORMS}.{_hub_hint(source)}")


def _hub_hint(name: str) -> str:
    """`` Did you mean torchvision:NAME?`` when ``name`` is a torchvision or timm model's name."""
    with contextlib.suppress(ImportError):
        import torchvision

        if name in torchvision.models.list_models():
            return f" Did you mean torchvision:{name} (or timm:{name})?"
    with contextlib.suppress(ImportError):
        import timm

        if timm.is_model(name):
            return f" Did you mean timm:{name}?"
    return ""


def _from_hub(hub: str, name: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    if not name:
        raise ValueError(f"--model {hub}: names no model: write it after the colon, e.g. {hub}:resnet18")
    build = torchvision_backbone if hub == "torchvision" else timm_backbone
    # Weights fix the number of classes (a fresh head would be untrained); without them it is the data's.
    model = build(name, weights=weights, num_classes=None if weights else num_classes)
    return LoadedModel(model, f"{hub}:{name} ({f'weights {weights}' if weights else 'random weights'})", hub)


class _ExportedProgram(nn.Module):
    """An exported program (``torch.export.load(path).module()``) as a module for the attacks: a program keeps the
    mode it was exported in (eval), and its ``train()``/``eval()`` raise, so this wrapper's switch only its own
    flag."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> _ExportedProgram:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.program(x)


def _from_exported_program(path: Path) -> LoadedModel:
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such exported program (write one with `freeadv_pl export`)")
    try:
        program = torch.export.load(path)
    except Exception as error:  # torch.export.load raises several types on a foreign file
        raise ValueError(
            f"--model {path} is no program of torch.export ({_first_line(error)}). Pass the .pt2 file "
            "that `freeadv_pl export` or module.export() wrote."
        ) from error
    info_file = path.with_suffix(".json")
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    written_by = str(info.get("module", "a program")).rsplit(".", 1)[-1]
    return LoadedModel(_ExportedProgram(program.module()), f"{written_by} exported to {path}", "exported")


@contextlib.contextmanager
def _working_directory_on_path() -> Iterator[None]:
    """Let ``module:function`` name a module of the working directory, as ``python -m`` would (the console script's
    ``sys.path`` holds its own folder instead)."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def _from_function(source: str) -> LoadedModel:
    module_name, _, attribute = source.partition(":")
    fix = (
        f"put the folder of {module_name.replace('.', '/')}.py on PYTHONPATH or run from it, and check the spelling "
        "(the form is package.module:function)"
    )
    with _working_directory_on_path():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
                raise ImportError(f"--model {source}: no module named {error.name!r} can be imported: {fix}") from None
            raise ImportError(f"--model {source}: importing {module_name} failed: {error}") from error
    factory = getattr(module, attribute, None)
    if factory is None:
        names = [name for name in vars(module) if not name.startswith("_")]
        close = difflib.get_close_matches(attribute, names, n=1)
        hint = f" Did you mean {module_name}:{close[0]}?" if close else ""
        raise ImportError(f"--model {source}: {module_name} ({module.__file__}) has no {attribute!r}.{hint}")
    model = factory if isinstance(factory, nn.Module) else factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"--model {source}: {attribute}() returned a {type(model).__name__}, not a torch.nn.Module: return the "
            "model itself, taking images in [0, 1] and giving logits"
        )
    call = "" if isinstance(factory, nn.Module) else "()"
    return LoadedModel(model, f"{type(model).__name__} from {source}{call}", "function")


def _from_checkpoint(path: Path, model_config: Path | None) -> LoadedModel:
    module = module_from_fit_checkpoint(path, model_config)
    checkpoint = f"checkpoint {path}"
    return LoadedModel(module.model, f"{type(module).__name__} from {checkpoint}", "checkpoint")


def module_from_fit_checkpoint(path: str | os.PathLike, config: str | os.PathLike | None = None) -> Any:
    """The :class:`~freeadv_pl.ClassifierModule` that a ``freeadv_pl fit`` checkpoint holds, in eval mode on the CPU.

    Without ``config`` the recorded module class's ``load_from_checkpoint(path)`` rebuilds it; where that fails, the
    run's config does (the ``config.yaml`` that LightningCLI wrote beside the ``checkpoints`` folder): the module is
    built from it and the checkpoint's weights loaded, as ``freeadv_pl export`` does. With ``config``, that config
    is used directly.

    Raises:
        FileNotFoundError: when ``path`` or ``config`` does not exist.
        ValueError: when ``path`` is no checkpoint of a freeadv_pl classifier, or it cannot be rebuilt (no config).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such checkpoint")
    checkpoint = _read_checkpoint(path)
    from freeadv_pl.modules import ClassifierModule

    failure = ""
    if config is None:
        try:
            module = _recorded_class(checkpoint, ClassifierModule).load_from_checkpoint(path, map_location="cpu")
        except Exception as error:  # noqa: BLE001  (whatever stops Lightning's rebuild, the run's config may not)
            failure = f" (and load_from_checkpoint failed: {_first_line(error)})"
        else:
            return module.eval()
        config = path.resolve().parent.parent / "config.yaml"
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(
            f"no config to rebuild the model of {path}: {config} does not exist{failure}. A `freeadv_pl fit` run "
            "writes config.yaml beside its checkpoints folder: pass the run's config (freeadv_pl evaluate "
            "--model_config, freeadv_pl export --config), or in Python build the module as it was trained, load the "
            "checkpoint and call module.export('model.pt2')."
        )
    from freeadv_pl.cli import build_cli

    settings = yaml.safe_load(config.read_text())
    for key in ("ckpt_path", "weights_only"):  # fit's own arguments, not the model's
        settings.pop(key, None)
    module = build_cli(settings, run=False).model
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.on_load_checkpoint(checkpoint)
    return module.eval()


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, checked to be a freeadv_pl classifier's."""
    fix = (
        "Pass a checkpoint written by `freeadv_pl fit` (lightning_logs/version_N/checkpoints/*.ckpt) or a .pt2 of "
        "`freeadv_pl export`; for any other model, write a function that builds it and loads its weights, and pass "
        "--model package.module:function."
    )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise ValueError(f"--model {path} is no checkpoint torch.load can read ({_first_line(error)}). {fix}") from None
    from freeadv_pl._lightning_compat import cli_class_path
    from freeadv_pl.modules._checkpoint import MODULE_KEY

    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = f" with keys {', '.join(sorted(map(str, checkpoint))[:8])}" if isinstance(checkpoint, dict) else ""
        raise ValueError(
            f"--model {path} is no classifier checkpoint: it holds a {type(checkpoint).__name__}{keys}, not a "
            f"Lightning checkpoint with a state_dict. {fix}"
        )
    if MODULE_KEY not in checkpoint and not cli_class_path(checkpoint.get("hyper_parameters") or {}):
        raise ValueError(
            f"--model {path} is a Lightning checkpoint, but not of a freeadv_pl classifier (ClassifierModule or a "
            f"training module): it records no module class. {fix}"
        )
    return checkpoint


def _recorded_class(checkpoint: dict[str, Any], base: type) -> type:
    """The module class that wrote ``checkpoint`` if it is imported (a checkpoint's text imports nothing), else
    ``base``."""
    from freeadv_pl.modules._checkpoint import MODULE_KEY, imported_class

    for class_path in checkpoint.get(MODULE_KEY) or []:
        found = imported_class(str(class_path))
        if found is not None and issubclass(found, base):
            return found
    return base


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
