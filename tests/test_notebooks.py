"""Every notebook of notebooks/ runs top to bottom in quick mode, and its figure shows what its title says.

The notebooks run in order in fresh kernels sharing one checkpoint cache (later notebooks reuse the models of
earlier ones; each also trains what it needs when run alone). Each saves its figure as a PNG with a JSON twin that
describes the figure as matplotlib holds it (axes titles and labels, the points of each curve) and the key numbers
the notebook computed; the checks below read them. Only claims that hold in quick mode with the fixed seed are
asserted: the README's notebook table gives the numbers measured.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import needs_fashion_mnist

nbclient = pytest.importorskip("nbclient", reason='the notebook extra is missing: pip install -e ".[notebooks]"')
nbformat = pytest.importorskip("nbformat", reason='the notebook extra is missing: pip install -e ".[notebooks]"')

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = [
    "01_quickstart",
    "02_sensitivity_to_m",
    "03_interpretable_gradients",
    "04_loss_surface",
    "05_generative_adversarial_examples",
]
CELL_TIMEOUT = 900  # seconds; a whole quick notebook takes well under a minute on two free cores
EPSILON = 0.1


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("notebook_cache")
    return {"cache": cache, "figures": cache / "figures", "executed": tmp_path_factory.mktemp("executed")}


def run_notebook(name: str, folders: dict[str, Path]) -> float:
    """Execute the notebook in a fresh kernel started in notebooks/ (quick mode, temporary folders); return the
    seconds it took. A cell that raises fails the test (nbclient raises CellExecutionError)."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    env = os.environ | {
        "FREEADV_PL_NOTEBOOK_QUICK": "1",
        "FREEADV_PL_NOTEBOOK_CACHE": str(folders["cache"]),
        "FREEADV_PL_NOTEBOOK_OUTPUT": str(folders["figures"]),
        # The package of this checkout, whether or not it is pip-installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ of _shared.py in notebooks/
    }
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=env)
    finally:
        nbformat.write(notebook, folders["executed"] / f"{name}.ipynb")  # with its outputs, to look at on failure
    return time.perf_counter() - start


def figure_record(name: str, folders: dict[str, Path]) -> dict:
    """The JSON twin of the notebook's figure, after checking that the PNG exists and is a real picture."""
    png = folders["figures"] / f"{name}.png"
    assert png.is_file(), f"{name} saved no figure"
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert min(pixels.shape) >= 200 and pixels.std() > 10, f"{png} is too small or blank"
    record = json.loads(png.with_suffix(".json").read_text())
    assert record["settings"]["mode"] == "quick"
    return record


def mean(values) -> float:
    return sum(values) / len(values)


def check_quickstart(record: dict) -> None:
    assert len(record["axes"]) == 16 and all(ax["images"] == 1 and ax["title"] for ax in record["axes"])
    assert "PGD-20" in record["suptitle"] and "ε = 0.1" in record["suptitle"]
    claims = record["claims"]
    assert claims["optimizer_steps"] == 400 and claims["test_examples"] == 500
    assert EPSILON - 1e-3 < claims["max_perturbation"] <= EPSILON + 1e-6, "the attack uses its whole ε-ball"
    assert claims["natural_accuracy"] > 0.7, "Free-4 learns the task"
    assert 0.2 < claims["pgd20_accuracy"] < claims["natural_accuracy"], "and keeps part of it under PGD-20"
    assert claims["cw20_accuracy"] < claims["natural_accuracy"]
    callback_png = Path(claims["callback_png"])
    assert callback_png.is_file() and callback_png.parent.name == "adversarial_examples"


def check_sensitivity(record: dict) -> None:
    (ax,) = record["axes"]
    assert ax["title"] and "accuracy" in ax["ylabel"] and "replays m" in ax["xlabel"]
    curves = {line["label"]: line for line in ax["lines"]}
    for label in ("Free-m: natural accuracy", "Free-m: PGD-20 accuracy"):
        assert curves[label]["x"] == [1, 2, 4, 8, 10], "one point per m"
        assert all(0 <= y <= 100 for y in curves[label]["y"])
    assert {"natural training: natural", "natural training: PGD-20"} <= set(curves) <= set(ax["legend"])
    claims = record["claims"]
    results, budget = claims["results"], claims["budget"]
    for m in ["1", "2", "4", "8", "10"]:
        assert results[m]["steps"] == budget, "an equal budget of optimizer steps for every m"
        assert results[m]["epochs"] == pytest.approx(budget / int(m) / 40), "Free-m sees budget/m minibatches"
    assert results["natural"]["steps"] == budget
    assert curves["Free-m: PGD-20 accuracy"]["y"] == [results[m]["pgd20"] for m in ["1", "2", "4", "8", "10"]]
    natural_training_pgd = results["natural"]["pgd20"]
    assert natural_training_pgd < 20, "natural training is not robust"
    for m in ["2", "4", "8", "10"]:
        assert results[m]["pgd20"] > natural_training_pgd + 10, f"Free-{m} is robust at the same cost"


def check_gradients(record: dict) -> None:
    assert len(record["axes"]) == 24 and all(ax["images"] == 1 for ax in record["axes"])
    assert "natural training" in record["suptitle"] and "Free-4" in record["suptitle"]
    metrics = record["claims"]["metrics"]
    free, natural = metrics["Free-4"], metrics["natural training"]
    assert free["roughness"] < natural["roughness"], "the robust model's input gradient is smoother"
    assert free["low_frequency_share"] > natural["low_frequency_share"], "and has more of its energy at low frequency"
    assert record["claims"]["smoother_fraction"] >= 0.9


def check_loss_surface(record: dict) -> None:
    surfaces = [ax for ax in record["axes"] if ax["zlabel"] == "loss"]
    contours = [ax for ax in record["axes"] if ax["title"].endswith("contours")]
    assert len(surfaces) == 4 and len(contours) == 4
    for ax in surfaces:
        assert ax["xlabel"] == "adversarial direction" and ax["ylabel"] == "random direction" and ax["collections"]
    numbers = record["claims"]["numbers"]
    free, natural = numbers["Free-4"], numbers["natural training"]
    for image in (0, 1):  # the two images shown
        assert free["largest_rise"][image] < natural["largest_rise"][image], "the Free-4 surface is flatter"
    assert mean(free["largest_rise"]) < 0.5 * mean(natural["largest_rise"])
    assert mean(free["roughness"]) < mean(natural["roughness"]), "and smoother"


def check_generative(record: dict) -> None:
    assert len(record["axes"]) == 36 and all(ax["images"] == 1 for ax in record["axes"])
    claims = record["claims"]
    from freeadv_pl import FashionMNISTDataModule

    data = FashionMNISTDataModule()
    data.setup("test")
    last_nine = [int(data.test_set[i][1]) for i in range(len(data.test_set) - 9, len(data.test_set))]
    assert claims["labels"] == last_nine, "the last 9 images of the test set"
    assert claims["targets"] == [(label + 5) % 10 for label in last_nine]
    free, natural = claims["numbers"]["Free-4"], claims["numbers"]["natural training"]
    for numbers in (free, natural):
        assert mean(numbers["target_probability_after"]) > mean(numbers["target_probability_before"]) + 0.1
    assert mean(free["alignment"]) > mean(natural["alignment"]), "Free-4's perturbations look more like the target"


CHECKS = {
    "01_quickstart": check_quickstart,
    "02_sensitivity_to_m": check_sensitivity,
    "03_interpretable_gradients": check_gradients,
    "04_loss_surface": check_loss_surface,
    "05_generative_adversarial_examples": check_generative,
}


def test_every_notebook_is_tested_and_stored_without_outputs():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES == sorted(CHECKS)
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs"


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_its_figure_shows_what_it_says(name, folders):
    before = sorted(NOTEBOOKS.iterdir())
    seconds = run_notebook(name, folders)
    print(f"{name}: {seconds:.1f} s")
    assert sorted(NOTEBOOKS.iterdir()) == before, "the notebook wrote into the repository"
    CHECKS[name](figure_record(name, folders))
