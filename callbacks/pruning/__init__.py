"""Pruning: scores (:mod:`.scores`), masks (:mod:`.masks`), schedules (:mod:`.schedules`) and one
step (:func:`prune`) as plain functions, and the :class:`Pruning` callback that schedules them in a Lightning run."""

from callbacks.pruning.callback import Pruning
from callbacks.pruning.masks import (
    PARAMETER_NAMES,
    PRUNABLE_TYPES,
    SCOPES,
    PrunedTensor,
    apply_kept_units,
    kept_units,
    make_permanent,
    prunable_tensors,
    reparametrize,
    rewind,
    select_kept_units,
    snapshot,
    sparsity,
    unit_scores,
)
from callbacks.pruning.schedules import SCHEDULES, step_epochs, target_sparsity
from callbacks.pruning.scores import (
    CRITERIA,
    accuracy,
    criterion_scores,
    fisher_diagonals,
    loss_gradient,
    mean_loss,
    negative_log_likelihood,
    predicted_loss_change,
)
from callbacks.pruning.step import prune

__all__ = [
    "CRITERIA",
    "PARAMETER_NAMES",
    "PRUNABLE_TYPES",
    "SCHEDULES",
    "SCOPES",
    "PrunedTensor",
    "Pruning",
    "accuracy",
    "apply_kept_units",
    "criterion_scores",
    "fisher_diagonals",
    "kept_units",
    "loss_gradient",
    "make_permanent",
    "mean_loss",
    "negative_log_likelihood",
    "predicted_loss_change",
    "prunable_tensors",
    "prune",
    "reparametrize",
    "rewind",
    "select_kept_units",
    "snapshot",
    "sparsity",
    "step_epochs",
    "target_sparsity",
    "unit_scores",
]
