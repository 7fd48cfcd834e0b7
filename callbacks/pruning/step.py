"""One pruning step on a model: score, select and mask, as a plain function."""

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from callbacks.pruning.masks import PrunedTensor, apply_kept_units, kept_units, select_kept_units, unit_scores
from callbacks.pruning.scores import (
    USES_FISHER,
    USES_GRADIENT,
    criterion_scores,
    fisher_diagonals,
    loss_gradient,
    negative_log_likelihood,
    predicted_loss_change,
)
from framework.errors import UserInputError


def prune(
    model: nn.Module,
    tensors: Sequence[PrunedTensor],
    data: Iterable,
    sparsity: float,
    criterion: str = "MP",
    scope: str = "global",
    structured: bool = False,
    pruning_norm: float | None = None,
    locality_penalty: float = 0.0,
    fisher_type: str = "exact",
    fisher_samples: int = 1,
    task: str = "classification",
    generator: torch.Generator | None = None,
    allow_layer_collapse: bool = False,
) -> float | None:
    """Prune ``tensors`` of ``model`` to ``sparsity`` (a fraction of all their units, see
    :mod:`callbacks.pruning.masks`) by ``criterion`` scored on ``data`` (a re-iterable of
    ``(inputs, targets)`` batches; used by LM, QM and OBD only).

    Returns the criterion's predicted loss change for the weights pruned by this step (None for
    MP). Refuses, before changing any mask, a step that would prune every unit of a tensor
    unless ``allow_layer_collapse``.
    """
    values = [t.value() for t in tensors]
    gradients = [None] * len(values)
    diagonals = [None] * len(values)
    if criterion in USES_GRADIENT:
        gradients = loss_gradient(model, data, tensors, negative_log_likelihood(task))
    if criterion in USES_FISHER:
        diagonals = fisher_diagonals(model, data, tensors, fisher_type, task, fisher_samples, generator)
    scores = [
        unit_scores(criterion_scores(criterion, v, g, f, locality_penalty), v, structured, pruning_norm)
        for v, g, f in zip(values, gradients, diagonals)
    ]
    kept = select_kept_units(scores, [kept_units(t, structured) for t in tensors], sparsity, scope)
    collapsed = [t.key for t, flags in zip(tensors, kept) if not flags.any()]
    if collapsed and not allow_layer_collapse:
        raise UserInputError(
            f"pruning to sparsity {sparsity:.4g} would prune all of {collapsed}; "
            "lower the amount, use scope='layer', or set allow_layer_collapse=True"
        )
    old_masks = [t.mask().clone() for t in tensors]
    for tensor, flags in zip(tensors, kept):
        apply_kept_units(tensor, flags, structured)
    predicted = [predicted_loss_change(criterion, v, g, f) for v, g, f in zip(values, gradients, diagonals)]
    if predicted[0] is None:
        return None
    return float(sum((p * (old - t.mask())).sum() for p, old, t in zip(predicted, old_masks, tensors)))
