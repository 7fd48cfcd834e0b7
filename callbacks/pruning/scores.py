"""Pruning scores: how much the loss is predicted to change when a weight is removed.

Names follow Laurent et al. 2020 ("Revisiting loss modelling for unstructured pruning"). The
pruning step of a weight w is dw = -w; g is the full-batch gradient of the mean loss over the
given data and F_ii the Fisher diagonal (:func:`callbacks.curvature.fisher`):

=======  =================================  =========================================
name     score                              predicted loss change of the step
=======  =================================  =========================================
``MP``   |w|                                (none: magnitude has no loss model)
``LM``   |g (-w)|                           g (-w)
``QM``   |g (-w) + 1/2 F_ii w^2|            g (-w) + 1/2 F_ii w^2
``OBD``  1/2 F_ii w^2                       1/2 F_ii w^2
=======  =================================  =========================================

Every score gets the locality penalty ``+ lambda/2 w^2`` (added outside the absolute value), so
as lambda grows every criterion ranks like MP. The predicted change of removing a set of weights
is the sum of their predicted changes (the models are linear or diagonal-quadratic); the penalty
is not part of it.
"""

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from callbacks.curvature import FISHER_TYPES, TASKS, PVector, fisher
from callbacks.pruning.masks import PrunedTensor
from framework.errors import check_choice

CRITERIA = ("MP", "LM", "QM", "OBD")
USES_GRADIENT = ("LM", "QM")
USES_FISHER = ("QM", "OBD")

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def negative_log_likelihood(task: str) -> PerExampleLoss:
    """The per-example loss whose Hessian the curvature package's Fisher of ``task`` models:
    softmax cross-entropy, or 1/2 ||output - target||^2 (unit Gaussian) for regression."""
    check_choice("task", task, TASKS)
    if task == "classification":
        return lambda outputs, targets: F.cross_entropy(outputs, targets, reduction="none")
    return lambda outputs, targets: 0.5 * (outputs - targets).square().flatten(1).sum(dim=1)


class _EvalMode:
    """Puts a model in eval mode for the duration of a block, then restores every module's mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = {module: module.training for module in model.modules()}

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for module, training in self.modes.items():
            module.train(training)


def mean_loss(model: nn.Module, data: Iterable, loss: PerExampleLoss) -> float:
    """The loss averaged over every example of ``data`` (batches ``(inputs, targets, ...)``), in eval mode."""
    total, count = 0.0, 0
    with _EvalMode(model), torch.no_grad():
        for inputs, targets, *_ in data:
            total += float(loss(model(inputs), targets).sum())
            count += inputs.shape[0]
    return total / count


def accuracy(model: nn.Module, data: Iterable) -> float:
    """The fraction of examples whose arg-max output is the target, in eval mode."""
    correct, count = 0, 0
    with _EvalMode(model), torch.no_grad():
        for inputs, targets, *_ in data:
            correct += int((model(inputs).argmax(dim=-1) == targets).sum())
            count += inputs.shape[0]
    return correct / count


def loss_gradient(model: nn.Module, data: Iterable, tensors: Sequence[PrunedTensor], loss: PerExampleLoss) -> list[torch.Tensor]:
    """The gradient g of the mean loss over all of ``data`` with respect to each tensor's
    effective values, in eval mode, by ``torch.autograd.grad`` (no ``.grad`` is written)."""
    leaves = [t.leaf() for t in tensors]
    sums = [torch.zeros_like(leaf) for leaf in leaves]
    count = 0
    with _EvalMode(model), torch.enable_grad():
        for inputs, targets, *_ in data:
            gradients = torch.autograd.grad(loss(model(inputs), targets).sum(), leaves, allow_unused=True)
            sums = [s if g is None else s + g for s, g in zip(sums, gradients)]
            count += inputs.shape[0]
    return [s.detach() / count for s in sums]


def fisher_diagonals(
    model: nn.Module,
    data: Iterable,
    tensors: Sequence[PrunedTensor],
    fisher_type: str = "exact",
    task: str = "classification",
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """F_ii for each tensor, from :func:`callbacks.curvature.fisher` (diagonal representation),
    in eval mode: the representation applied to a vector of ones, shaped like the parameters."""
    check_choice("fisher_type", fisher_type, FISHER_TYPES)
    layers = list(dict.fromkeys(t.module_name for t in tensors))
    with _EvalMode(model):
        diagonal = fisher(
            model, data, representation="diagonal", fisher_type=fisher_type, task=task, samples=samples, generator=generator, layers=layers
        )
    ones = PVector.from_flat(diagonal.layout, torch.ones(diagonal.layout.size, dtype=tensors[0].leaf().dtype, device=tensors[0].leaf().device))
    by_name = diagonal.mv(ones).to_parameters()
    return [by_name[f"{t.module_name}.{t.name}" if t.module_name else t.name] for t in tensors]


def predicted_loss_change(
    criterion: str, weight: torch.Tensor, gradient: torch.Tensor | None, fisher_diagonal: torch.Tensor | None
) -> torch.Tensor | None:
    """Per entry, the criterion's predicted loss change for the step dw = -w (None for MP)."""
    check_choice("criterion", criterion, CRITERIA)
    first_order = -gradient * weight if criterion in USES_GRADIENT else 0.0
    second_order = 0.5 * fisher_diagonal * weight.square() if criterion in USES_FISHER else 0.0
    return None if criterion == "MP" else first_order + second_order


def criterion_scores(
    criterion: str,
    weight: torch.Tensor,
    gradient: torch.Tensor | None = None,
    fisher_diagonal: torch.Tensor | None = None,
    locality_penalty: float = 0.0,
) -> torch.Tensor:
    """The criterion's score per entry (module docstring): low scores are pruned first."""
    predicted = predicted_loss_change(criterion, weight, gradient, fisher_diagonal)
    base = weight.abs() if predicted is None else predicted.abs()
    return base + 0.5 * locality_penalty * weight.square()
