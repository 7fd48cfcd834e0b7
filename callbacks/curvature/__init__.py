"""Fisher information matrices: capture by module hooks (:mod:`.capture`, :mod:`.layers`), Fisher
types as output-gradient draws (:mod:`.targets`), and interchangeable representations behind one
interface (:mod:`.representations`), assembled by :func:`fisher`; the EKFAC/KFAC optimiser
(:mod:`.optimizer`) and its Lightning callback (:mod:`.callback`). See ``docs/curvature.md``."""

from callbacks.curvature.builder import REPRESENTATIONS, fisher
from callbacks.curvature.callback import EKFACStatistics
from callbacks.curvature.capture import LayerCapture
from callbacks.curvature.layers import ParameterLayout, second_moment
from callbacks.curvature.optimizer import EKFAC as EKFACOptimizer  # the representation EKFAC keeps the name here
from callbacks.curvature.optimizer import CurvatureError, FisherStatistics
from callbacks.curvature.pvector import PVector
from callbacks.curvature.representations import (
    EKFAC,
    KFAC,
    BlockDiagonal,
    Dense,
    Diagonal,
    FisherRepresentation,
    Implicit,
    LowRank,
)
from callbacks.curvature.targets import FISHER_TYPES, TASKS, output_gradient_draws

__all__ = [
    "EKFAC",
    "FISHER_TYPES",
    "KFAC",
    "REPRESENTATIONS",
    "TASKS",
    "BlockDiagonal",
    "CurvatureError",
    "Dense",
    "Diagonal",
    "EKFACOptimizer",
    "EKFACStatistics",
    "FisherRepresentation",
    "FisherStatistics",
    "Implicit",
    "LayerCapture",
    "LowRank",
    "PVector",
    "ParameterLayout",
    "fisher",
    "output_gradient_draws",
    "second_moment",
]
