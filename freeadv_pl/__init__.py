"""freeadv_pl: "Adversarial Training for Free!" (Shafahi et al., NeurIPS 2019) as PyTorch Lightning modules."""

from freeadv_pl.attacks import cw_loss, fgsm, pgd
from freeadv_pl.data import FashionMNISTDataModule, VisionDataModule
from freeadv_pl.models import InputNormalization, SmallCNN
from freeadv_pl.modules import ClassifierModule, FreeAdversarialModule, NaturalModule, PGDAdversarialModule

__version__ = "0.1.0"

__all__ = [
    "ClassifierModule",
    "FashionMNISTDataModule",
    "FreeAdversarialModule",
    "InputNormalization",
    "NaturalModule",
    "PGDAdversarialModule",
    "SmallCNN",
    "VisionDataModule",
    "__version__",
    "cw_loss",
    "fgsm",
    "pgd",
]
