#!/usr/bin/env python3
"""Execute the notebooks of notebooks/ and store the executed copies, outputs included, in docs/notebooks/.

The notebooks are committed without outputs (tests/test_notebooks.py enforces it); the documentation site shows
these executed copies and never runs a notebook itself (``nb_execution_mode = "off"`` in docs/conf.py).

Each notebook runs as tests/test_notebooks.py runs it: a fresh kernel started in notebooks/, the package of this
checkout on ``PYTHONPATH``, checkpoints and figures in one temporary folder shared by the notebooks of the run (later
notebooks reuse the models of earlier ones). Full size by default (minutes per model on a CPU); ``--quick`` sets
``FREEADV_PL_NOTEBOOK_QUICK=1`` (2 to 3.5 minutes for all five on 2 cores). The mode, the date, the versions and
the time each notebook took are written into its metadata under ``"freeadv_pl"``; the notebooks page of the site
states the mode.

    python3 scripts/render_notebooks.py            # full size: what the site should show
    python3 scripts/render_notebooks.py --quick    # quick mode, to check the pipeline
    python3 scripts/render_notebooks.py --quick 01_quickstart

Run it after changing a notebook: tests/test_docs.py fails while a rendered copy's code differs from its source.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
OUTPUT = ROOT / "docs" / "notebooks"
CELL_TIMEOUT = 3600  # seconds; a full-size cell trains several models on a CPU
LARGE = 5 * 1024 * 1024  # bytes: an executed notebook above this is worth a look (images too large or too many)
METADATA_KEY = "freeadv_pl"


def versions() -> dict[str, str]:
    import lightning
    import torch

    import freeadv_pl

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",  # Lightning's "auto" pick
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "freeadv_pl": freeadv_pl.__version__,
    }


def annotate(notebook: nbformat.NotebookNode) -> None:
    """Put a note saying how the copy was run after the notebook's title cell (replacing an earlier note): a reader
    who lands on one notebook's page sees whether its numbers are quick-mode or full-size ones."""
    meta = notebook.metadata[METADATA_KEY]
    notebook.cells = [cell for cell in notebook.cells if cell.metadata.get(METADATA_KEY) != "note"]
    mode = (
        "**quick mode** (`FREEADV_PL_NOTEBOOK_QUICK=1`: smaller subsets and fewer epochs, so the numbers differ from "
        "the full-size ones)"
        if meta["mode"] == "quick"
        else "**full size**"
    )
    versions = meta["versions"]
    note = nbformat.v4.new_markdown_cell(
        f"> This copy was executed by `scripts/render_notebooks.py` in {mode} on {meta['executed']}, with torch "
        f"{versions['torch']} and lightning {versions['lightning']} on {versions['device']}, in "
        f"{meta['seconds']:.0f} s. Its source, without outputs, is `{meta['source']}`."
    )
    note.metadata[METADATA_KEY] = "note"
    first_is_title = notebook.cells and notebook.cells[0].cell_type == "markdown"
    notebook.cells.insert(1 if first_is_title else 0, note)


def render(name: str, quick: bool, folder: Path, output: Path) -> Path:
    """Execute notebooks/<name>.ipynb in a fresh kernel and write the executed copy to output/<name>.ipynb."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    env = os.environ | {
        "FREEADV_PL_NOTEBOOK_QUICK": "1" if quick else "0",
        "FREEADV_PL_NOTEBOOK_CACHE": str(folder / "cache"),
        "FREEADV_PL_NOTEBOOK_OUTPUT": str(folder / "figures"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ of _shared.py in notebooks/
    }
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
        record_timing=False,  # no timestamps in the cells: a re-render changes only what the code printed
    )
    start = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - start
    notebook.metadata[METADATA_KEY] = {
        "mode": "quick" if quick else "full",
        "executed": datetime.date.today().isoformat(),
        "seconds": round(seconds, 1),
        "versions": versions(),
        "source": f"notebooks/{name}.ipynb",
    }
    annotate(notebook)
    nbformat.validate(notebook)
    path = output / f"{name}.ipynb"
    nbformat.write(notebook, path)
    size = path.stat().st_size
    print(f"{name}: {seconds:.0f} s, {size / 1024:.0f} KiB -> {path.relative_to(ROOT)}", flush=True)
    if size > LARGE:
        print(f"warning: {path.name} is {size / 1024**2:.1f} MiB (over {LARGE / 1024**2:.0f} MiB)", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to render (default: all of notebooks/), e.g. 01_quickstart")
    parser.add_argument("--quick", action="store_true", help="quick mode (FREEADV_PL_NOTEBOOK_QUICK=1)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the folder of the executed copies (%(default)s)")
    args = parser.parse_args(argv)
    available = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"no such notebook in notebooks/: {', '.join(unknown)}; the notebooks are {', '.join(available)}")
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="freeadv_pl_render_") as folder:
        for name in args.names or available:  # in order: later notebooks reuse the models of earlier ones
            render(name, args.quick, Path(folder), args.output)
    mode = "quick" if args.quick else "full-size"
    print(f"rendered {len(args.names or available)} notebooks ({mode}) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
