"""freeadv_pl: "Adversarial Training for Free!" (Shafahi et al., NeurIPS 2019) as PyTorch Lightning modules."""

from freeadv_pl.attacks import cw_loss, fgsm, pgd
from freeadv_pl.autoattack import AutoAttackSpec
from freeadv_pl.callbacks import (
    AdversarialExamplesLogger,
    CatastrophicOverfittingGuard,
    PreemptionCheckpoint,
    RobustEvaluation,
    TrainingTime,
)
from freeadv_pl.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    VisionDataModule,
)
from freeadv_pl.evaluation import ATTACK_PRESETS, AttackSpec, EvaluationAttack, count_correct, robust_accuracy
from freeadv_pl.models import InputNormalization, PreActResNet18, SmallCNN, WideResNet
from freeadv_pl.modules import (
    ClassifierModule,
    FastAdversarialModule,
    FreeAdversarialModule,
    NaturalModule,
    NoiseFGSMModule,
    PGDAdversarialModule,
    PriorGuidedFGSMModule,
)

__version__ = "0.6.0"

__all__ = [
    "ATTACK_PRESETS",
    "AdversarialExamplesLogger",
    "AttackSpec",
    "AutoAttackSpec",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CatastrophicOverfittingGuard",
    "ClassifierModule",
    "EvaluationAttack",
    "FashionMNISTDataModule",
    "FastAdversarialModule",
    "FreeAdversarialModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "InputNormalization",
    "NaturalModule",
    "NoiseFGSMModule",
    "PGDAdversarialModule",
    "PreActResNet18",
    "PreemptionCheckpoint",
    "PriorGuidedFGSMModule",
    "RobustEvaluation",
    "SmallCNN",
    "TrainingTime",
    "VisionDataModule",
    "WideResNet",
    "__version__",
    "count_correct",
    "cw_loss",
    "fgsm",
    "pgd",
    "robust_accuracy",
]
