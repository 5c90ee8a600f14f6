"""Training algorithms, one per file, over the shared :class:`ClassifierModule`."""

from freeadv_pl.modules.base import ClassifierModule
from freeadv_pl.modules.fast import FastAdversarialModule
from freeadv_pl.modules.free import FreeAdversarialModule
from freeadv_pl.modules.mep import PriorGuidedFGSMModule
from freeadv_pl.modules.natural import NaturalModule
from freeadv_pl.modules.nfgsm import NoiseFGSMModule
from freeadv_pl.modules.pgd import PGDAdversarialModule

__all__ = [
    "ClassifierModule",
    "FastAdversarialModule",
    "FreeAdversarialModule",
    "NaturalModule",
    "NoiseFGSMModule",
    "PGDAdversarialModule",
    "PriorGuidedFGSMModule",
]
