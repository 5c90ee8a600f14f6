"""Sphinx configuration of the freeadv_pl documentation site.

Sphinx + MyST markdown (myst-nb for the notebooks) + autodoc/napoleon + furo: Lightning, torchmetrics and torchgeo
document with Sphinx, autodoc documents exactly what is importable, and ``-W`` makes the build strict.

Build it with ``bash scripts/build_docs.sh`` (warnings are errors). No intersphinx: the build machines reach no
documentation server, so references to torch and Lightning types stay plain text, and ``nitpicky`` stays off.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.transforms import SphinxTransform

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the package of this checkout, whether or not it is pip-installed

import freeadv_pl

project = "freeadv_pl"
author = "the freeadv_pl authors"
copyright = "the freeadv_pl authors"
release = version = freeadv_pl.__version__

extensions = [
    "myst_nb",  # MyST markdown pages and the executed notebooks of docs/notebooks/ (it loads myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = False  # without intersphinx every torch/Lightning type in a signature would be a warning

# MyST
myst_enable_extensions = ["colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3  # `[text](#some-heading)` links inside a page, the included benchmarks/README.md's too

# autodoc + napoleon: Google-style docstrings (Args, Returns, Raises, Example).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # `epsilon=8 / 255` and `optimizer=default_optimizer`, not their values
autodoc_inherit_docstrings = False  # overridden Lightning hooks carry no docstring of their own: leave them out
autosummary_generate = False  # api.md's summary table only links to the entries below it

# HTML
html_theme = "furo"
html_title = f"freeadv_pl {release}"
html_show_sourcelink = False

# Notebooks: docs/notebooks/*.ipynb are executed by scripts/render_notebooks.py and stored with their outputs; the
# build never runs them.
nb_execution_mode = "off"
# The stored copies keep their stderr (Lightning's info lines, libraries' deprecation warnings); the pages show what
# the code printed, its results and its figures.
nb_output_stderr = "remove"


def _notebooks_mode() -> str:
    """How the stored notebooks were executed, from the metadata scripts/render_notebooks.py writes into them."""
    by_mode: dict[str, list[str]] = {}
    dates = set()
    for path in sorted((DOCS / "notebooks").glob("*.ipynb")):
        meta = json.loads(path.read_text(encoding="utf-8"))["metadata"].get("freeadv_pl", {})
        by_mode.setdefault(meta.get("mode", "unknown"), []).append(path.stem)
        dates.add(meta.get("executed", "an unknown date"))
    if not by_mode:
        return "(none is rendered yet: run it)"
    words = {"quick": "in quick mode (`FREEADV_PL_NOTEBOOK_QUICK=1`)", "full": "at full size"}
    if len(by_mode) == 1:
        (mode,) = by_mode
        text = words.get(mode, "in an unrecorded mode")
    else:
        text = "; ".join(
            f"{', '.join(names)} {words.get(mode, 'in an unrecorded mode')}" for mode, names in by_mode.items()
        )
    text += f", on {', '.join(sorted(dates))}"
    if "quick" in by_mode:
        text += ", so their numbers differ from the full-size figures of the table below"
    return text


myst_substitutions = {"notebooks_mode": _notebooks_mode()}


class RepositoryFileLinks(SphinxTransform):
    """Links in markdown included from outside ``docs/`` (``benchmarks/README.md``, ``CHANGELOG.md``) are written
    relative to the included file, e.g. ``results/step_cost.md``. MyST resolves them relative to the including page
    and would warn that the target is missing. This resolves each one relative to the file it was written in: a
    page of this site becomes a link to it, another repository file a download of it, a folder plain text. A link
    that leads nowhere is left alone, and the strict build fails on it."""

    default_priority = 5  # before Sphinx's own transforms; MyST's reference resolver runs much later

    def apply(self, **kwargs) -> None:
        for node in list(self.document.findall(addnodes.pending_xref)):
            if node.get("reftype") == "myst" and not node.get("refdomain"):
                new = self._resolve(node)
                if new is not None:
                    new.source, new.line = node.source, node.line
                    node.replace_self(new)

    def _resolve(self, node: addnodes.pending_xref) -> nodes.Element | None:
        source = Path(node.source or "")
        if not source.is_absolute() or source.resolve().is_relative_to(DOCS):
            return None  # written in docs/: MyST resolves it as usual
        path, _, anchor = node["reftarget"].partition("#")
        target = (source.parent / path).resolve()
        if not path or not target.exists() or not target.is_relative_to(ROOT):
            return None
        common = {"refdoc": self.env.docname, "refexplicit": True, "reftype": "myst"}
        docname = self.env.path2doc(str(target)) if target.is_relative_to(DOCS) else None
        if docname:
            return addnodes.pending_xref(
                "", *node.children, refdomain="doc", reftarget=docname, reftargetid=anchor or None, **common
            )
        if target.is_file():
            docdir = (Path(self.env.srcdir) / self.env.docname).parent
            relative = Path(os.path.relpath(target, docdir)).as_posix()
            return addnodes.download_reference("", "", *node.children, refdomain=None, reftarget=relative, **common)
        return nodes.inline("", "", *node.children)


def setup(app):
    app.add_transform(RepositoryFileLinks)
