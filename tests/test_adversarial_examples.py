"""AdversarialExamplesLogger: PNG grids beside the CSV logs every n epochs (never in the sanity check), showing the
fixed clean images, adversarial images within ε of them and the scaled perturbations; TensorBoard gets the image
instead; the YAML of its docstring configures it through the CLI; bad arguments name the fix."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchattacks
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader

from conftest import TorchattacksPGD, banded_dataset, quiet_trainer, tiny_cnn
from freeadv_pl import AdversarialExamplesLogger, AttackSpec, FreeAdversarialModule, NaturalModule
from freeadv_pl.cli import FreeAdvCLI
from freeadv_pl.data.base import VisionDataModule
from freeadv_pl.modules.base import ClassifierModule

EPSILON = 0.1
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def fit_with_logger(tmp_path: Path, callback: AdversarialExamplesLogger, epochs: int, l2: bool = False, **kwargs):
    """Free-2 (L∞ ε = 0.1, or with ``l2`` L2 ε = 0.5) on the banded task, the callback watching."""
    norm = {"norm": "l2", "epsilon": 0.5} if l2 else {"epsilon": EPSILON}
    module = FreeAdversarialModule(tiny_cnn(), 3, replays=2, **norm)
    train = DataLoader(banded_dataset(64, seed=1), batch_size=16, shuffle=False)
    val = DataLoader(banded_dataset(20, seed=2), batch_size=10)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback], **kwargs)
    trainer.fit(module, train, val)
    return module, val.dataset


def read_tile(path: Path, box: tuple[int, int, int, int], zoom: int) -> torch.Tensor:
    """One image of the grid back in [0, 1] (1×H×W): every zoom-th pixel of its box, first colour channel."""
    pixels = np.asarray(Image.open(path).convert("RGB").crop(box))
    return torch.from_numpy(pixels[::zoom, ::zoom, 0].copy()).float().div(255).unsqueeze(0)


def test_a_png_every_n_epochs_beside_the_csv_logs_and_none_in_the_sanity_check(tmp_path):
    callback = AdversarialExamplesLogger(every_n_epochs=2, num_images=5)
    fit_with_logger(tmp_path, callback, epochs=4, logger=CSVLogger(tmp_path, name="logs"), num_sanity_val_steps=1)
    folder = tmp_path / "logs" / "version_0" / "adversarial_examples"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=001.png", "epoch=003.png"]
    assert callback.last_path == folder / "epoch=003.png"
    assert (tmp_path / "logs" / "version_0" / "metrics.csv").is_file(), "beside the CSV logs"
    # 3 rows (clean, adversarial, perturbation) of 5 images, 6×6 pixels enlarged 11 times (≥ 64 pixels).
    assert [len(row) for row in callback.tile_boxes] == [5, 5, 5]
    for row in callback.tile_boxes:
        for left, upper, right, lower in row:
            assert (right - left, lower - upper) == (66, 66)
    width, height = Image.open(callback.last_path).size
    assert width >= callback.tile_boxes[0][-1][2] and height > callback.tile_boxes[2][0][3]


def test_the_grid_shows_the_clean_images_their_adversarial_versions_and_the_scaled_perturbations(tmp_path):
    callback = AdversarialExamplesLogger(num_images=6, perturbation_scale=4.0)
    module, val_set = fit_with_logger(tmp_path, callback, epochs=2, default_root_dir=tmp_path)
    path = tmp_path / "adversarial_examples" / "epoch=001.png"  # no logger: in default_root_dir
    assert callback.last_path == path and (tmp_path / "adversarial_examples" / "epoch=000.png").is_file()
    clean, adversarial, perturbation = (
        torch.stack([read_tile(path, box, zoom=11) for box in row]) for row in callback.tile_boxes
    )
    quantum = 0.5 / 255 + 1e-6  # the PNG stores whole levels of 1/255
    first_images = torch.stack([val_set[i][0] for i in range(6)])
    assert (clean - first_images).abs().max() <= quantum, "row 1: the first validation images, every time"
    assert (adversarial - clean).abs().max() <= EPSILON + 2 * quantum, "row 2: within ε of row 1"
    assert (adversarial - clean).abs().max() >= EPSILON - 2 * quantum, "row 2: PGD reaches the border of the ball"
    assert ((adversarial >= 0) & (adversarial <= 1)).all()
    expected = (0.5 + 4.0 * (callback.last_examples["adversarial"] - callback.last_examples["clean"])).clamp(0, 1)
    assert (perturbation - expected).abs().max() <= quantum, "row 3: 0.5 + scale · δ"
    examples = callback.last_examples
    module.eval()
    with torch.no_grad():
        assert torch.equal(examples["clean_predictions"], module(examples["clean"]).argmax(dim=1))
        assert torch.equal(examples["adversarial_predictions"], module(examples["adversarial"]).argmax(dim=1))
    assert torch.equal(examples["labels"], torch.tensor([val_set[i][1] for i in range(6)]))


def test_the_default_scale_maps_the_epsilon_ball_onto_black_to_white(tmp_path):
    callback = AdversarialExamplesLogger(num_images=4, attack=AttackSpec(steps=3, step_size=0.05))
    fit_with_logger(tmp_path, callback, epochs=1, default_root_dir=tmp_path)
    delta = callback.last_examples["adversarial"] - callback.last_examples["clean"]
    drawn = callback.last_examples["perturbation"]
    assert torch.allclose(drawn, 0.5 + delta / (2 * EPSILON), atol=1e-6)
    assert drawn.min() >= 0 and drawn.max() <= 1


@pytest.mark.parametrize(
    "norm, epsilon, in_l2_ball",
    [pytest.param(None, 0.5, True, id="the-modules-l2"), pytest.param("linf", 0.05, False, id="its-own-linf")],
)
def test_the_attack_runs_in_the_modules_norm_unless_given_its_own(tmp_path, norm, epsilon, in_l2_ball):
    callback = AdversarialExamplesLogger(num_images=4, attack=AttackSpec(steps=5), epsilon=epsilon, norm=norm)
    fit_with_logger(tmp_path, callback, epochs=1, l2=True, default_root_dir=tmp_path)
    delta = callback.last_examples["adversarial"] - callback.last_examples["clean"]
    l2, linf = delta.flatten(1).norm(dim=1), delta.flatten(1).abs().amax(dim=1)
    if in_l2_ball:
        assert l2.max() <= 0.5 + 1e-5 and l2.min() > 0.25 and linf.max() > 0.05
    else:
        assert linf.max() <= 0.05 + 1e-6 and l2.max() > 0.05


def test_an_attack_of_ones_own_draws_what_it_returns(tmp_path):
    callback = AdversarialExamplesLogger(num_images=4, attack=TorchattacksPGD(steps=3))
    module, _ = fit_with_logger(tmp_path, callback, epochs=1, default_root_dir=tmp_path)
    examples = callback.last_examples
    attack = torchattacks.PGD(module.model.eval(), eps=EPSILON, alpha=EPSILON / 4, steps=3, random_start=False)
    torch.testing.assert_close(examples["adversarial"], attack(examples["clean"], examples["labels"]), rtol=0, atol=0)
    assert callback.last_path.is_file()


def test_trainer_validate_draws_too_under_inference_mode(tmp_path):
    callback = AdversarialExamplesLogger(num_images=3, epsilon=EPSILON, class_names=["top", "middle", "bottom"])
    module = NaturalModule(tiny_cnn(), 3)  # no epsilon of its own: the callback's is used
    quiet_trainer(callbacks=[callback], default_root_dir=tmp_path).validate(
        module, DataLoader(banded_dataset(8, seed=3), batch_size=4), verbose=False
    )
    assert callback.last_path is not None and callback.last_path.is_file()
    assert (callback.last_examples["adversarial"] - callback.last_examples["clean"]).abs().max() <= EPSILON + 1e-6


class RecordingTensorBoard(TensorBoardLogger):
    """A TensorBoardLogger that needs no tensorboard: its experiment records the images it is given."""

    def __init__(self) -> None:  # TensorBoardLogger's own needs tensorboard installed
        self.images: list[tuple[str, torch.Tensor, int]] = []

    @property
    def experiment(self):
        return self

    def add_image(self, tag: str, image: torch.Tensor, global_step: int) -> None:
        self.images.append((tag, image, global_step))


def test_a_tensorboard_logger_gets_the_image_and_no_file_is_written(tmp_path):
    callback = AdversarialExamplesLogger(num_images=4)
    fit_with_logger(tmp_path, callback, epochs=1, default_root_dir=tmp_path / "fit")
    grid = Image.open(callback.last_path)
    logger = RecordingTensorBoard()
    # The logging step alone, with a Trainer whose logger is a TensorBoardLogger (fit needs tensorboard installed).
    trainer = SimpleNamespace(loggers=[logger], global_step=12, current_epoch=2, default_root_dir=str(tmp_path))
    callback.last_path = None
    callback._log(trainer, grid)
    ((tag, image, step),) = logger.images
    assert (tag, step) == ("adversarial_examples", 12)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, grid.height, grid.width), "CHW, for add_image"
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.asarray(grid.convert("RGB")).copy()))
    assert callback.last_path is None and not (tmp_path / "adversarial_examples").exists()


def docstring_yaml() -> str:
    """The LightningCLI snippet of the class docstring, unindented."""
    doc = AdversarialExamplesLogger.__doc__
    block = doc[doc.index("- class_path: freeadv_pl.AdversarialExamplesLogger") :].split("\n\n")[0]
    return re.sub(r"^ {12}", "", block, flags=re.MULTILINE)


def test_the_docstring_yaml_configures_it_through_the_cli(tmp_path):
    config = tmp_path / "callbacks.yaml"
    config.write_text("trainer:\n  callbacks:\n" + "".join(f"    {line}\n" for line in docstring_yaml().splitlines()))
    cli = FreeAdvCLI(
        ClassifierModule,
        VisionDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(CONFIGS / "fashion_mnist" / "free.yaml"), "--config", str(config)],
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, AdversarialExamplesLogger)]
    assert callback.attack == AttackSpec(steps=10, step_size=0.025)
    assert (callback.epsilon, callback.num_images, callback.every_n_epochs) == (0.1, 8, 1)
    assert callback.class_names[-1] == "Boot"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"every_n_epochs": 0}, ValueError, "every_n_epochs must be an integer ≥ 1, got 0", id="every"),
        pytest.param({"num_images": 0}, ValueError, "num_images must be an integer ≥ 1, got 0", id="images"),
        pytest.param({"num_images": 2.5}, TypeError, "num_images must be an integer ≥ 1, got 2.5", id="float"),
        pytest.param({"attack": AttackSpec(steps=0)}, ValueError, "steps ≥ 1.*AttackSpec\\(steps=20\\)", id="natural"),
        pytest.param({"attack": "pgd20"}, TypeError, "attack must be an attack such as.*lacks key", id="attack-type"),
        pytest.param({"epsilon": 8, "norm": "linf"}, ValueError, "epsilon must lie in \\[0, 1\\]", id="epsilon"),
        pytest.param({"epsilon": -1}, ValueError, "epsilon must lie in \\[0, 1\\].*norm='l2'.*≥ 0", id="epsilon<0"),
        pytest.param({"epsilon": float("inf"), "norm": "l2"}, ValueError, "finite number ≥ 0.*got inf", id="eps-inf"),
        pytest.param({"norm": "l1"}, ValueError, "norm must be one of 'linf', 'l2', got 'l1'", id="norm"),
        pytest.param(
            {"attack": AttackSpec(step_size=2.0), "norm": "linf"},
            ValueError,
            r"AdversarialExamplesLogger's attack in the L∞ threat model: step_size must lie in \(0, 1\]",
            id="step",
        ),
        pytest.param({"perturbation_scale": 0}, ValueError, "perturbation_scale must be a finite number > 0", id="s"),
        pytest.param({"perturbation_scale": "5"}, ValueError, "perturbation_scale must be a finite number", id="s-str"),
        pytest.param({"perturbation_scale": float("inf")}, ValueError, "finite number > 0.*got inf", id="s-inf"),
        pytest.param({"class_names": []}, ValueError, "class_names must be a non-empty list of strings", id="names"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdversarialExamplesLogger(**kwargs)


def test_a_module_without_epsilon_needs_one(tmp_path):
    callback = AdversarialExamplesLogger(num_images=2)
    with pytest.raises(ValueError, match="NaturalModule has no `epsilon`.*AdversarialExamplesLogger\\(epsilon=...\\)"):
        quiet_trainer(callbacks=[callback], default_root_dir=tmp_path).validate(
            NaturalModule(tiny_cnn(), 3), DataLoader(banded_dataset(4), batch_size=4), verbose=False
        )
