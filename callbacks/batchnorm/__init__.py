"""Batch normalisation's population statistics: recomputed exactly over training batches with the
current weights (the functional core, :mod:`callbacks.batchnorm.statistics`) instead of the running
averages kept during training, and the ``PreciseBatchNorm`` callback that does it before every
validation."""

from callbacks.batchnorm.callback import PreciseBatchNorm
from callbacks.batchnorm.statistics import population_statistics_modules, recompute_population_statistics

__all__ = ["PreciseBatchNorm", "population_statistics_modules", "recompute_population_statistics"]
