"""Pictures of what the attack does during training: clean images, adversarial images and perturbations, in a grid."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.data import DataLoader, default_collate
from typing_extensions import override

from freeadv_pl._checks import check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl._suite import own_epsilon
from freeadv_pl.attack_spec import AttackSpec
from freeadv_pl.callbacks import _shared
from freeadv_pl.evaluation import SuiteAttack
from freeadv_pl.threat_models import threat_model

_MIN_TILE = 64  # images are enlarged by a whole factor to at least this many pixels, so that they can be seen
_PAD = 4
_FONT_SIZE = 11
_LINE = 14  # pixels per line of text
_ROWS = ("clean", "adversarial", "perturbation")
_CORRECT, _WRONG, _TEXT = (0, 128, 0), (200, 0, 0), (0, 0, 0)
_ASCII = str.maketrans({"ε": "eps", "δ": "d", "·": "*", "≥": ">="})


class AdversarialExamplesLogger(Callback):
    """Every n epochs, a grid of clean validation images, their adversarial versions and the perturbations, with the
    true labels and the model's predictions, logged to the experiment logger.

    At the end of every ``every_n_epochs``-th validation epoch of ``fit`` (and of every ``trainer.validate``; never
    during the sanity check) the first ``num_images`` images of the first validation dataloader's dataset, the same
    ones every time, are attacked with ``attack`` in eval mode, in the training module's threat model (its ``norm``,
    L∞ or L2; L∞ for a module without one) unless ``norm`` or the attack's own says otherwise, its random start
    seeded with ``seed`` each time. The
    grid's rows: the clean images (captioned with the label and the prediction, green if right, red if wrong), the
    adversarial images (with the prediction) and ``0.5 + perturbation_scale · δ`` (grey: no change; with
    max ``|δ|``), each image enlarged by a whole factor. With a ``TensorBoardLogger`` it goes to
    ``add_image("adversarial_examples", ...)``; otherwise it is written as ``adversarial_examples/epoch=NNN.png``
    in the logger's folder (:attr:`last_path`; :attr:`last_examples` holds the tensors drawn). Under DDP only the
    global-zero process draws, without collectives (strategies with a collective forward pass, FSDP or DeepSpeed
    stage 3, are not supported).

    Args:
        every_n_epochs: log at the end of every n-th validation epoch of ``fit``.
        num_images: how many validation images (the first ones of the dataset) to show.
        attack: the attack: an :class:`~freeadv_pl.AttackSpec` with ``steps`` ≥ 1, an
            :class:`~freeadv_pl.AutoAttackSpec` or an attack of your own (:class:`~freeadv_pl.EvaluationAttack`);
            None: PGD-20 with step ε/4 and a random start.
        epsilon: the radius (a float or ``"8/255"``; at most 1 in L∞, any finite number ≥ 0 in L2); None takes the
            training module's ``epsilon`` (required when the module has none, e.g. ``NaturalModule``). An
            ``epsilon`` set in ``attack`` wins over both.
        perturbation_scale: the factor that makes δ visible in row 3; None: 1 / (2ε).
        class_names: names of the classes for the captions (e.g. Fashion-MNIST's ``T-shirt/top``, ...); None: the
            class indices.
        seed: seed of the attack's random start.
        norm: the attack's threat model, ``"linf"`` or ``"l2"``; None: the training module's ``norm``.

    Raises:
        ValueError: on ``every_n_epochs`` or ``num_images`` < 1, an attack with 0 steps, an unknown norm, an ε (for
            the norm) or scale out of range,
            an empty ``class_names``; at the first logging, when no ε is given and the module has none.
        TypeError: when ``attack`` lacks a member of :class:`~freeadv_pl.EvaluationAttack`.

    Example:
        >>> callback = AdversarialExamplesLogger(every_n_epochs=2, num_images=8, epsilon=0.1)
        >>> callback.attack.describe(0.1)
        'PGD-20 (CE loss, ε = 0.1, step 0.025, 1 random start)'

        In a LightningCLI config (``trainer.callbacks``)::

            - class_path: freeadv_pl.AdversarialExamplesLogger
              init_args:
                epsilon: 0.1              # or leave it out to use the module's epsilon
                attack: {steps: 10, step_size: 0.025}   # optional; PGD-20, step ε/4, by default
                class_names: [T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Boot]
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 8,
        attack: SuiteAttack | None = None,
        epsilon: float | str | None = None,
        perturbation_scale: float | None = None,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        norm: str | None = None,
    ) -> None:
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", minimum=1)
        self.num_images = check_int(num_images, "num_images", minimum=1)
        attack = AttackSpec(steps=20) if attack is None else attack
        self.attack = _shared.perturbing(attack, "no perturbation to show", "AttackSpec(steps=20)")
        self.norm, self.epsilon = _shared.init_norm_and_epsilon(norm, epsilon)
        if self.norm is not None:
            _shared.resolved_attack(self.attack, threat_model(self.norm), self)  # its ε and step size checked now
        if perturbation_scale is not None and (
            isinstance(perturbation_scale, bool)
            or not isinstance(perturbation_scale, numbers.Real)
            or not 0 < perturbation_scale < math.inf
        ):
            raise ValueError(
                f"perturbation_scale must be a finite number > 0 (e.g. 5 shows δ = ±0.1 as 0.5 ± 0.5), or None for "
                f"1/(2ε), got {perturbation_scale!r}"
            )
        self.perturbation_scale = None if perturbation_scale is None else float(perturbation_scale)
        if class_names is not None:
            class_names = list(class_names)
            if not class_names or not all(isinstance(name, str) for name in class_names):
                raise ValueError(f"class_names must be a non-empty list of strings, or None, got {class_names!r}")
        self.class_names = class_names
        self.seed = seed
        self.last_path: Path | None = None
        self.last_examples: dict[str, Tensor] = {}
        self.tile_boxes: list[list[tuple[int, int, int, int]]] = []
        self._examples: tuple[Tensor, Tensor] | None = None

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only rank zero draws, on its own data and without collectives: nobody waits for it.
        if _shared.validation_due(trainer, self.every_n_epochs) and trainer.is_global_zero:
            self._run(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_path": None if self.last_path is None else str(self.last_path)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        last_path = state_dict.get("last_path")
        self.last_path = None if last_path is None else Path(last_path)

    def _fixed_examples(self, trainer: Trainer) -> tuple[Tensor, Tensor]:
        """The first ``num_images`` examples of the first validation dataset, read once and kept."""
        if self._examples is None:
            loader = _shared.first_loader(trainer, "validate")
            dataset = loader.dataset if isinstance(loader, DataLoader) else None
            if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
                raise ValueError(
                    "AdversarialExamplesLogger takes its images from the validation DataLoader's dataset, which must "
                    f"be indexable with a length; got {type(dataset).__name__}."
                )
            # Read outside inference mode: the images are kept and reused by later epochs' attacks.
            with torch.inference_mode(False):
                batch = default_collate([dataset[i] for i in range(min(self.num_images, len(dataset)))])
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError(
                    "AdversarialExamplesLogger expects validation examples of the form (image, label), got "
                    f"{type(batch).__name__}"
                )
            self._examples = (batch[0].clone(), batch[1].clone())
        return self._examples

    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        threat = _shared.threat(self, pl_module)
        attack = _shared.resolved_attack(self.attack, threat, self)
        epsilon = own_epsilon(attack, _shared.epsilon(self, pl_module, [attack], threat))
        x, y = self._fixed_examples(trainer)
        x, y = x.to(pl_module.device), y.to(pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        x_adv = attack(pl_module, x, y, epsilon, generator)  # eval mode, gradients on, modes restored
        with temporary_mode(pl_module, training=False), torch.no_grad():
            clean_prediction = pl_module(x).argmax(dim=1)
            adversarial_prediction = pl_module(x_adv).argmax(dim=1)
        scale = self.perturbation_scale or (1.0 / (2.0 * epsilon) if epsilon > 0 else 1.0)
        self.last_examples = {
            "clean": x.detach().cpu(),
            "adversarial": x_adv.detach().cpu(),
            "perturbation": (0.5 + scale * (x_adv - x).float()).clamp(0.0, 1.0).cpu(),
            "labels": y.detach().cpu(),
            "clean_predictions": clean_prediction.cpu(),
            "adversarial_predictions": adversarial_prediction.cpu(),
        }
        title = f"epoch {trainer.current_epoch}: clean / {attack.describe(epsilon)} / 0.5 + {scale:g}·δ"
        self._log(trainer, self._grid(self.last_examples, title))

    def _name(self, label: int) -> str:
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def _grid(self, examples: dict[str, Tensor], title: str) -> Image.Image:
        """The three rows of enlarged images with their captions on a white canvas; sets :attr:`tile_boxes`."""
        n, _, height, width = examples["clean"].shape
        zoom = max(1, math.ceil(_MIN_TILE / max(height, width)))
        tile_h, tile_w = height * zoom, width * zoom
        font = _font()
        title_lines = _wrap(_ascii(title), font, max(n * (tile_w + _PAD) + _PAD, 360) - 2 * _PAD)
        canvas_w = max(n * (tile_w + _PAD) + _PAD, max(_text_width(font, line) for line in title_lines) + 2 * _PAD)
        top = _PAD + _LINE * len(title_lines) + _PAD
        cell_h = tile_h + 2 * _LINE + _PAD
        self.tile_boxes = [
            [
                (left, top + row * cell_h, left + tile_w, top + row * cell_h + tile_h)
                for left in (_PAD + column * (tile_w + _PAD) for column in range(n))
            ]
            for row in range(len(_ROWS))
        ]
        canvas = Image.new("RGB", (canvas_w, top + len(_ROWS) * cell_h), "white")
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(title_lines):
            draw.text((_PAD, _PAD + i * _LINE), line, fill=_TEXT, font=font)
        for row, name in enumerate(_ROWS):
            for column, (left, upper, _, lower) in enumerate(self.tile_boxes[row]):
                canvas.paste(_tile(examples[name][column], zoom), (left, upper))
                for line, (text, color) in enumerate(self._captions(examples, name, column)):
                    text = _shorten(_ascii(text), font, tile_w + _PAD // 2)
                    draw.text((left, lower + 1 + line * _LINE), text, fill=color, font=font)
        return canvas

    def _captions(self, examples: dict[str, Tensor], row: str, column: int) -> list[tuple[str, tuple[int, int, int]]]:
        label = int(examples["labels"][column])
        if row == "clean":
            prediction = int(examples["clean_predictions"][column])
            return [(f"y: {self._name(label)}", _TEXT), (f"pred: {self._name(prediction)}", _color(prediction, label))]
        if row == "adversarial":
            prediction = int(examples["adversarial_predictions"][column])
            return [(f"pred: {self._name(prediction)}", _color(prediction, label))]
        largest = float((examples["adversarial"][column] - examples["clean"][column]).abs().max())
        return [(f"max|δ| {largest:.3g}", _TEXT)]

    def _log(self, trainer: Trainer, grid: Image.Image) -> None:
        tensorboards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        for logger in tensorboards:
            image = torch.from_numpy(np.asarray(grid).copy()).permute(2, 0, 1)  # CHW uint8, as add_image takes
            logger.experiment.add_image("adversarial_examples", image, global_step=trainer.global_step)
        if tensorboards:
            return
        folder = Path(_log_folder(trainer)) / "adversarial_examples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch={trainer.current_epoch:03d}.png"
        grid.save(path)
        self.last_path = path


def _log_folder(trainer: Trainer) -> str:
    """``trainer.log_dir`` without its broadcast (a collective: only rank zero gets here)."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        folder = getattr(logger, "log_dir", None) or logger.save_dir
        if folder is not None:
            return str(folder)
    return str(trainer.default_root_dir)


def _tile(image: Tensor, zoom: int) -> Image.Image:
    """An image in [0, 1] (C×H×W, 1 or 3 channels) as an RGB picture enlarged ``zoom`` times (nearest neighbour)."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    pixels = pixels[:3].repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def _color(prediction: int, label: int) -> tuple[int, int, int]:
    return _CORRECT if prediction == label else _WRONG


def _ascii(text: str) -> str:
    """PIL's default font has no Greek letters."""
    return text.translate(_ASCII)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font: ImageFont.ImageFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return math.ceil(right - left)


def _shorten(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` cut to ``width`` pixels, ending in ``.`` where something was cut (captions stay under their image)."""
    if _text_width(font, text) <= width:
        return text
    while len(text) > 1 and _text_width(font, text + ".") > width:
        text = text[:-1]
    return text + "."


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Split ``text`` at spaces into lines no wider than ``width`` pixels (a single long word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_width(font, f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
