"""Pruning: scores (:mod:`.scores`), masks (:mod:`.masks`), schedules (:mod:`.schedules`) and one
step (:func:`prune`) as plain functions, and the :class:`Pruning` callback that schedules them in a Lightning run."""

from callbacks.pruning.callback import Pruning
from callbacks.pruning.masks import (
    PARAMETER_NAMES,
    PRUNABLE_TYPES,
    SCOPES,
    PrunedTensor,
    add_masks,
    apply_kept_units,
    keep_pruned_at_zero,
    kept_units,
    make_permanent,
    mask_gradients,
    prunable_tensors,
    rewind,
    select_kept_units,
    snapshot,
    sparsity,
    unit_scores,
    zero_pruned,
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
    "add_masks",
    "apply_kept_units",
    "criterion_scores",
    "fisher_diagonals",
    "keep_pruned_at_zero",
    "kept_units",
    "loss_gradient",
    "make_permanent",
    "mask_gradients",
    "mean_loss",
    "negative_log_likelihood",
    "predicted_loss_change",
    "prunable_tensors",
    "prune",
    "rewind",
    "select_kept_units",
    "snapshot",
    "sparsity",
    "step_epochs",
    "target_sparsity",
    "unit_scores",
    "zero_pruned",
]
