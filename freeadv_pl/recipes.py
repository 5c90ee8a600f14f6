"""The recipes: the YAML configs of ``configs/`` that ship inside the package, found by name.

``freeadv_pl fit --config fashion_mnist/free.yaml`` runs the shipped recipe wherever the command runs, as does
``--config configs/fashion_mnist/free.yaml`` (the path in a source checkout); a file of that name relative to the
working directory wins, so a user's own configs keep working. ``freeadv_pl recipes`` lists the recipes with the first
sentence of each one's header comment, and ``freeadv_pl recipes --path NAME`` prints where one lies, to copy and edit
(with its folder: recipes include their ``common/`` pieces by relative paths).

A wheel or sdist installs the configs as package data, ``freeadv_pl/configs/`` (setup.cfg maps the top-level
``configs/`` folder onto it); a source checkout, editable install included, reads the top-level folder itself.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import yaml

__all__ = ["Recipe", "find_recipe", "main", "recipes_dir", "resolve_config", "resolve_config_args", "shipped_recipes"]

_PACKAGE = Path(__file__).resolve().parent
# LightningCLI's config options (jsonargparse's ActionConfigFile): ``--config X``, ``-c X``, ``--config=X``, ``-c=X``.
_CONFIG_FLAGS = ("--config", "-c")
# A period that ends a sentence: followed by a space or the end, and not that of "et al.", "e.g." or "i.e.".
_SENTENCE_END = re.compile(r"(?<!et al)(?<!e\.g)(?<!i\.e)\.(?=\s|$)")


class Recipe(NamedTuple):
    """A shipped recipe, as :func:`shipped_recipes` lists it."""

    #: Its name for ``--config``, e.g. ``"fashion_mnist/free.yaml"``.
    name: str
    #: Its absolute path.
    path: Path
    #: The first sentence of its header comment.
    description: str
    #: True for a recipe that names no model class, such as ``quick.yaml``: it changes the recipe given before it on
    #: the command line rather than standing alone.
    overlay: bool


def recipes_dir() -> Path:
    """The folder of the shipped recipes: the package's ``configs/``, or the checkout's top-level one.

    Returns:
        ``freeadv_pl/configs`` in an installed wheel or sdist; ``configs/`` beside the ``freeadv_pl`` folder in a
        source checkout (an editable install imports the package from there).

    Raises:
        FileNotFoundError: when neither exists (a broken install).

    Example:
        >>> (recipes_dir() / "fashion_mnist" / "free.yaml").is_file()
        True
    """
    installed = _PACKAGE / "configs"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent / "configs"
    if checkout.is_dir() and (_PACKAGE.parent / "setup.cfg").is_file():
        return checkout
    raise FileNotFoundError(
        f"the recipes of freeadv_pl are missing: neither {installed} nor a source checkout's configs/ exists. "
        "Reinstall the package (pip install --force-reinstall freeadv_pl, or pip install -e . in a checkout)."
    )


def find_recipe(name: str) -> Path | None:
    """The shipped recipe called ``name``, or None.

    Args:
        name: a recipe's name as ``freeadv_pl recipes`` lists it (``"fashion_mnist/free.yaml"``), optionally with the
            checkout's ``configs/`` in front or without the ``.yaml``.

    Returns:
        The recipe's absolute path (a ``common/`` piece is found too), or None when no such recipe ships.

    Example:
        >>> find_recipe("configs/fashion_mnist/free.yaml") == find_recipe("fashion_mnist/free") == (
        ...     recipes_dir() / "fashion_mnist" / "free.yaml"
        ... )
        True
        >>> find_recipe("fashion_mnist/missing.yaml") is None
        True
    """
    parts = Path(name).parts
    if parts[:1] == ("configs",):
        parts = parts[1:]
    if not parts or ".." in parts or Path(name).is_absolute():
        return None
    root = recipes_dir()
    candidate = root.joinpath(*parts)
    for path in (candidate, candidate.with_name(candidate.name + ".yaml")):
        if path.is_file():
            return path
    return None


def resolve_config(value: str) -> str:
    """A ``--config`` value with a shipped recipe's name replaced by its absolute path.

    A file that exists (relative to the working directory, or absolute) is returned unchanged, and so is a value
    that is no file name (LightningCLI also takes YAML text, ``--config "{trainer: {max_epochs: 1}}"``, or a URL).
    The absolute path lets jsonargparse find the recipe's relative includes (``common/backbone.yaml``) beside it.

    Args:
        value: the argument of ``--config``.

    Returns:
        ``value``, or the absolute path of the shipped recipe it names.

    Raises:
        FileNotFoundError: on a file name that is neither a file nor a shipped recipe; the message names
            ``freeadv_pl recipes`` and the closest recipe names.

    Example:
        >>> resolve_config("fashion_mnist/free.yaml") == str(recipes_dir() / "fashion_mnist" / "free.yaml")
        True
        >>> resolve_config("{trainer: {max_epochs: 1}}")
        '{trainer: {max_epochs: 1}}'
    """
    if Path(value).is_file() or not _is_file_name(value):
        return value
    recipe = find_recipe(value)
    if recipe is not None:
        return str(recipe)
    names = [recipe.name for recipe in shipped_recipes()]
    close = difflib.get_close_matches(value.removeprefix("configs/"), names, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise FileNotFoundError(
        f"--config {value}: no such file in {Path.cwd()}, and no recipe of that name ships with freeadv_pl.{hint} "
        "`freeadv_pl recipes` lists the shipped recipes, e.g. `freeadv_pl fit --config fashion_mnist/free.yaml`."
    )


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config``/``-c`` value passed through :func:`resolve_config`.

    Args:
        args: a LightningCLI command line without the program, e.g. ``["fit", "--config", "fashion_mnist/free.yaml"]``.
            The forms ``--config X``, ``-c X``, ``--config=X`` and ``-c=X`` are resolved, each occurrence.

    Returns:
        A new list; only config values differ from ``args``.

    Raises:
        FileNotFoundError: as :func:`resolve_config`.

    Example:
        >>> args = resolve_config_args(["fit", "-c", "fashion_mnist/free.yaml", "--config=fashion_mnist/quick.yaml"])
        >>> args[:2], Path(args[2]).is_absolute(), args[3].startswith("--config=/")
        (['fit', '-c'], True, True)
    """
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg in _CONFIG_FLAGS and index + 1 < len(resolved):
            resolved[index + 1] = resolve_config(resolved[index + 1])
        for flag in _CONFIG_FLAGS:
            if arg.startswith(flag + "="):
                resolved[index] = f"{flag}={resolve_config(arg.removeprefix(flag + '='))}"
    return resolved


def shipped_recipes(dataset: str | None = None) -> list[Recipe]:
    """The shipped recipes, sorted by name, without the ``common/`` pieces they include.

    Args:
        dataset: only this dataset's recipes (``"fashion_mnist"``, ``"cifar10"``, ...); None: all.

    Returns:
        One :class:`Recipe` per YAML file.

    Example:
        >>> recipes = {recipe.name: recipe for recipe in shipped_recipes("fashion_mnist")}
        >>> [name for name, recipe in recipes.items() if recipe.overlay]
        ['fashion_mnist/quick.yaml']
        >>> print(textwrap.fill(recipes["fashion_mnist/natural.yaml"].description, 100))
        Natural training on Fashion-MNIST, the cost reference: 12 epochs.
    """
    root = recipes_dir()
    folder = root if dataset is None else root / dataset
    recipes = []
    for path in sorted(folder.rglob("*.yaml")):
        relative = path.relative_to(root)
        if "common" in relative.parts:
            continue
        text = path.read_text(encoding="utf-8")
        model = (yaml.safe_load(text) or {}).get("model")
        overlay = model is None or (isinstance(model, dict) and "class_path" not in model)
        recipes.append(Recipe(relative.as_posix(), path, _description(text), overlay))
    return recipes


def main(args: Sequence[str] = ()) -> None:
    """``freeadv_pl recipes [NAME] [--path]``: list the shipped recipes (one dataset's, or one), or print a path.

    Args:
        args: the command line after ``recipes``, e.g. ``["fashion_mnist"]`` or ``["--path", "fashion_mnist"]``.
    """
    parser = argparse.ArgumentParser(
        prog="freeadv_pl recipes",
        description="List the recipes (configs) that ship with freeadv_pl; `freeadv_pl fit --config NAME` runs one.",
    )
    parser.add_argument("name", nargs="?", help="a dataset (fashion_mnist, cifar10, ...) or a recipe's name")
    parser.add_argument(
        "--path",
        action="store_true",
        help="print the absolute path of NAME (of the recipes' folder without NAME), e.g. to copy it",
    )
    options = parser.parse_args(args)
    root = recipes_dir()
    datasets = sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    name = (options.name or "").removeprefix("configs/").rstrip("/")
    if name in ("", *datasets):
        if options.path:
            print(root / name)
            return
        recipes = shipped_recipes(name or None)
    else:
        recipe = find_recipe(name)
        if recipe is None:
            parser.error(f"no dataset or recipe {options.name!r}: the datasets are {', '.join(datasets)}")
        if options.path:
            print(recipe)
            return
        recipes = [entry for entry in shipped_recipes() if entry.path == recipe]
        if not recipes:  # a common/ piece: not a recipe of its own
            print(recipe)
            return
    width = min(shutil.get_terminal_size().columns, 120)
    print(f"Recipes shipped with freeadv_pl, in {root}:")
    for dataset in sorted({recipe.name.split("/")[0] for recipe in recipes}):
        print(f"\n{dataset}/")
        group = [recipe for recipe in recipes if recipe.name.startswith(dataset + "/")]
        column = max(len(Path(recipe.name).name) for recipe in group) + 4
        for recipe in group:
            text = ("[overlay: give it after a recipe] " if recipe.overlay else "") + recipe.description
            head = f"  {Path(recipe.name).name:<{column - 2}}"
            print(
                textwrap.fill(text, width, initial_indent=head, subsequent_indent=" " * column, break_on_hyphens=False)
            )
    print(
        "\nRun one:  freeadv_pl fit --config fashion_mnist/free.yaml --config fashion_mnist/quick.yaml\n"
        "Edit one: copy its dataset's folder (recipes include common/*.yaml by relative paths), e.g.\n"
        '          cp -r "$(freeadv_pl recipes --path fashion_mnist)" my_configs'
    )


def _is_file_name(value: str) -> bool:
    """Whether a ``--config`` value names a file rather than holding YAML text or a URL (which have a colon)."""
    return bool(value.strip()) and "\n" not in value and ":" not in value and not value.lstrip().startswith(("{", "["))


def _description(text: str) -> str:
    """The first sentence of a YAML file's header comment (its leading ``#`` lines up to an indented example)."""
    lines: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#") or (lines and line.startswith("#  ")):
            break
        lines.append(line.removeprefix("#").strip())
    description = " ".join(lines)
    end = _SENTENCE_END.search(description)
    description = description[: end.start()] if end else description
    description = description.removesuffix("e.g.").rstrip(" ,;:.")
    return description + "." if description else ""
