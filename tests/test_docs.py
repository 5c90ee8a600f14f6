"""The documentation site (docs/): every public name has an entry in the API reference, the rendered notebooks are
those of notebooks/, executed, and the pages the README links to exist.

API coverage is checked on the sources, without a build. The API page's autodoc directives (``.. autoclass::
freeadv_pl.FreeAdversarialModule``, ``.. autofunction::``, ``.. autodata::``, ...) are read and each named object is
imported. A public name is covered when it has a directive of its own, or when its object has one under another
path with the same name (a re-export: ``freeadv_pl.modules.free.FreeAdversarialModule`` is documented once, as
``freeadv_pl.FreeAdversarialModule``). ``scripts/build_docs.sh`` builds with warnings as errors, and autodoc warns on a
directive it cannot import or render, so a directive on the page is an entry on the site.

Public names: ``freeadv_pl.__all__`` (``__version__`` apart), and for each public submodule (no part of its name starts
with ``_``) its ``__all__``, or without one the documented classes, functions and constants it defines.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import freeadv_pl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGES = [DOCS / "api.md", *sorted((DOCS / "api").glob("*.md"))]
# The page names are fixed: the README links to them.
PAGES = [
    "index", "getting_started", "which_method", "training", "evaluation", "checkpoints", "distributed", "data",
    "models", "benchmarks", "design", "troubleshooting", "versions", "notebooks", "api", "changelog",
]  # fmt: skip
# `.. autoclass:: name` in an eval-rst block, or ```{autoclass} name in MyST.
KINDS = "module|class|function|data|exception|attribute|method|property|decorator"  # autosummary documents nothing
DIRECTIVE = re.compile(rf"^\s*(?:\.\.\s+auto({KINDS})::|`{{3,}}\s*\{{auto({KINDS})\}})\s*(\S+)", re.MULTILINE)
OPTION = re.compile(r"\s*:(\S+?):\s*(.*)")


def public_modules() -> list[str]:
    names = ["freeadv_pl"]
    for module in pkgutil.walk_packages(freeadv_pl.__path__, "freeadv_pl."):
        if not any(part.startswith("_") for part in module.name.split(".")):
            names.append(module.name)
    return sorted(names)


def documented_definitions(module) -> list[str]:
    """The public classes, functions and constants ``module`` defines that carry a docstring (a constant's is the
    string after its assignment)."""
    body = ast.parse(Path(module.__file__).read_text(encoding="utf-8")).body
    names = []
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if ast.get_docstring(node):
                names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            has_docstring = (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            )
            if has_docstring:
                names += [target.id for target in targets if isinstance(target, ast.Name)]
    return [name for name in names if not name.startswith("_")]


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return [name for name in module.__all__ if name != "__version__"]
    return documented_definitions(module)


def resolve(dotted: str):
    """The object a dotted name points at: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"nothing importable in {dotted!r}")


def api_entries(text: str) -> dict[str, str]:
    """Every name an autodoc directive of ``text`` documents, with the directive: ``{"freeadv_pl.pgd": "function"}``.
    ``automodule`` with ``:members:`` documents the module's public names (or the listed ones), as autodoc does."""
    entries = {}
    lines = text.splitlines()
    for match in DIRECTIVE.finditer(text):
        kind, name = match.group(1) or match.group(2), match.group(3)
        entries[name] = kind
        if kind != "module":
            continue
        options = {}
        for line in lines[text.count("\n", 0, match.start()) + 1 :]:  # the option lines right below the directive
            option = OPTION.fullmatch(line)
            if option is None:
                break
            options[option.group(1)] = option.group(2)
        if "members" in options:
            listed = [member.strip() for member in options["members"].split(",") if member.strip()]
            for member in listed or public_names(name):
                entries[f"{name}.{member}"] = "member"
    return entries


def missing_entries(text: str) -> list[str]:
    """The public names that ``text`` (API pages) gives no entry to."""
    entries = api_entries(text)
    documented = [(name.rsplit(".", 1)[-1], resolve(name)) for name in entries]
    missing = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in public_names(module_name):
            full = f"{module_name}.{name}"
            obj = getattr(module, name)
            if full not in entries and not any(short == name and other is obj for short, other in documented):
                missing.append(full)
    return missing


def api_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in API_PAGES)


def test_every_public_name_has_an_entry_in_the_api_reference():
    missing = missing_entries(api_text())
    assert not missing, (
        f"no entry in docs/api.md for {', '.join(missing)}: add an autodoc directive for each (e.g. "
        f"`.. autofunction:: {missing[0]}`), or make the name private"
    )


def test_every_api_entry_imports():
    unresolved = []
    for name in api_entries(api_text()):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{name} ({error})")
    assert not unresolved, f"docs/api.md documents names that do not exist: {unresolved}"


@pytest.mark.parametrize(
    "removed",
    [
        pytest.param("freeadv_pl.FreeAdversarialModule", id="top-level-class"),
        pytest.param("freeadv_pl.pgd", id="top-level-function"),
        pytest.param("freeadv_pl.attacks.uniform_perturbation", id="submodule-function"),
        pytest.param("freeadv_pl.evaluation.ATTACK_PRESETS", id="constant"),
    ],
)
def test_the_coverage_check_finds_a_missing_entry(removed):
    text = api_text()
    without = re.sub(rf"^.*auto\w+::\s*{re.escape(removed)}\s*$", "", text, flags=re.MULTILINE)
    assert without != text, f"the API page has no directive for {removed}"
    short = removed.rsplit(".", 1)[-1]
    missing = missing_entries(without)
    assert missing and all(name.endswith(f".{short}") for name in missing), missing
    assert removed in missing or f"freeadv_pl.{short}" in missing


def test_automodule_members_count_as_entries():
    text = ".. automodule:: freeadv_pl.attacks\n   :members:\n"
    assert {"freeadv_pl.attacks.pgd", "freeadv_pl.attacks.uniform_perturbation"} <= set(api_entries(text))
    text = ".. automodule:: freeadv_pl.attacks\n   :members: pgd, fgsm\n"
    assert "freeadv_pl.attacks.uniform_perturbation" not in api_entries(text)


def test_the_pages_exist_and_the_readme_links_to_existing_pages():
    missing = [name for name in PAGES if not (DOCS / f"{name}.md").is_file()]
    assert not missing, f"pages missing from docs/: {missing}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    broken = [link for link in links if not (ROOT / link).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


@pytest.fixture(scope="module")
def nbformat():
    return pytest.importorskip("nbformat", reason='the notebook extra is missing: pip install -e ".[notebooks]"')


def code_sources(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


NOTEBOOKS = sorted(path.stem for path in (ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_has_a_rendered_copy():
    rendered = sorted(path.stem for path in (DOCS / "notebooks").glob("*.ipynb"))
    assert rendered == NOTEBOOKS, (
        f"docs/notebooks/ holds {rendered} but notebooks/ holds {NOTEBOOKS}: run python3 scripts/render_notebooks.py"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_rendered_notebook_is_the_source_executed(name, nbformat):
    source = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    path = DOCS / "notebooks" / f"{name}.ipynb"
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run python3 scripts/render_notebooks.py {name}")
    rendered = nbformat.read(path, as_version=4)
    nbformat.validate(rendered)
    assert code_sources(rendered) == code_sources(source), (
        f"{path.relative_to(ROOT)} is stale, its code differs from notebooks/{name}.ipynb: "
        f"run python3 scripts/render_notebooks.py {name}"
    )
    assert rendered.metadata["freeadv_pl"]["mode"] in ("quick", "full")
    cells = [cell for cell in rendered.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in cells), "every code cell was executed"
    outputs = [output for cell in cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"], "no cell failed"
    assert any("image/png" in output.get("data", {}) for output in outputs), "the notebook shows its figure"
    size = path.stat().st_size
    assert size < 5 * 1024**2, f"{path.name} is {size / 1024**2:.1f} MiB: keep the rendered notebooks small"
