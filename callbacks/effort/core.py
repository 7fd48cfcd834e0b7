"""The functional core of the cost-of-effort penalty: the lambda schedule, the penalty itself
and the summaries of compute per input and per group, on plain modules and tensors.

The penalty reads the compute interface of :class:`framework.models.adaptive.AdaptiveComputation`:
``expected_compute(measure)``, the per-example expected compute of the model's last forward.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from framework.errors import UserInputError, check_choice, check_positive
from framework.models.adaptive import MEASURES, ComputeMeasure

SCHEDULES = ("constant", "linear", "step")


@dataclass(frozen=True)
class LambdaSchedule:
    """The weight lambda of the compute penalty as a function of the optimizer step.

    ``constant``: ``value``. ``linear``: warm-up from 0 to ``value`` over ``warmup_steps``,
    then ``value``. ``step``: ``value * gamma ** k`` after the k-th of ``milestones`` (steps,
    increasing); with ``gamma > 1`` lambda grows, e.g. from a small start.
    """

    value: float
    kind: str = "constant"
    warmup_steps: int = 0
    milestones: Sequence[int] = field(default_factory=tuple)
    gamma: float = 10.0

    def __post_init__(self) -> None:
        check_positive("weight", self.value, allow_zero=True)
        check_choice("schedule", self.kind, SCHEDULES)
        check_positive("gamma", self.gamma)
        if self.kind == "linear":
            check_positive("warmup_steps", self.warmup_steps)
        if self.kind == "step" and (not self.milestones or list(self.milestones) != sorted(set(self.milestones))):
            raise UserInputError(f"milestones={list(self.milestones)!r} must be a non-empty list of increasing steps for schedule='step'")

    def __call__(self, step: int) -> float:
        if self.kind == "linear":
            return self.value * min(1.0, step / self.warmup_steps)
        if self.kind == "step":
            return self.value * self.gamma ** sum(step >= milestone for milestone in self.milestones)
        return self.value


def check_adaptive(model: nn.Module) -> None:
    """Refuse a model without the compute interface (``expected_compute``, ``forward_adaptive``,
    ``compute_of_steps``), naming it."""
    missing = [name for name in ("expected_compute", "forward_adaptive", "compute_of_steps") if not callable(getattr(model, name, None))]
    if missing:
        raise UserInputError(
            f"the cost-of-effort penalty needs an adaptive backbone (framework.models.adaptive: PonderNet, "
            f"AdaptiveComputationTime, EarlyExitCNN, HabitualControlledNet); {type(model).__name__} lacks {missing}"
        )


def effort_penalty(model: nn.Module, measure: ComputeMeasure = "steps") -> torch.Tensor:
    """The batch mean of the expected compute of ``model``'s last forward: what lambda multiplies."""
    check_choice("measure", measure, MEASURES)
    return model.expected_compute(measure).mean()


@dataclass
class ComputeRecord:
    """Per-example compute and correctness over an evaluation split.

    Attributes:
        expected_steps, expected_flops: (N,) the training-time expected compute.
        steps, flops: (N,) the compute the adaptive inference spent.
        correct: (N,) bool, whether the adaptive inference was right.
        targets: (N,) the labels.
        groups: name -> (N,) bool membership (beyond the classes).
    """

    expected_steps: torch.Tensor
    expected_flops: torch.Tensor
    steps: torch.Tensor
    flops: torch.Tensor
    correct: torch.Tensor
    targets: torch.Tensor
    groups: dict[str, torch.Tensor]

    @classmethod
    def concatenate(cls, records: Sequence["ComputeRecord"]) -> "ComputeRecord":
        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(record, name) for record in records])

        names = list(records[0].groups)
        return cls(
            cat("expected_steps"), cat("expected_flops"), cat("steps"), cat("flops"), cat("correct"), cat("targets"),
            {name: torch.cat([record.groups[name] for record in records]) for name in names},
        )  # fmt: skip

    def as_matrix(self) -> torch.Tensor:
        """(N, 6 + groups) float64, one row per example (to gather across ranks)."""
        columns = [self.expected_steps, self.expected_flops, self.steps, self.flops, self.correct, self.targets, *self.groups.values()]
        return torch.stack([column.detach().to(torch.float64) for column in columns], dim=1)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, group_names: Sequence[str]) -> "ComputeRecord":
        columns = matrix.unbind(dim=1)
        groups = {name: column.bool() for name, column in zip(group_names, columns[6:])}
        return cls(columns[0], columns[1], columns[2].long(), columns[3], columns[4].bool(), columns[5].long(), groups)

    def all_groups(self) -> dict[str, torch.Tensor]:
        """``all``, one group per class present (``class_<k>``) and the named groups."""
        classes = {f"class_{k}": self.targets == k for k in sorted(set(self.targets.tolist()))}
        return {"all": torch.ones_like(self.correct), **classes, **self.groups}


def summarize(record: ComputeRecord) -> dict[str, dict[str, float]]:
    """Per group: ``count``, ``mean_steps`` and ``flops`` (expected), ``inference_steps``,
    ``inference_flops`` and ``accuracy`` of the adaptive inference. Empty groups are left out."""
    summary = {}
    for name, members in record.all_groups().items():
        if members.any():
            summary[name] = {
                "count": float(members.sum()),
                "mean_steps": record.expected_steps[members].mean().item(),
                "flops": record.expected_flops[members].mean().item(),
                "inference_steps": record.steps[members].double().mean().item(),
                "inference_flops": record.flops[members].mean().item(),
                "accuracy": record.correct[members].double().mean().item(),
            }
    return summary


def accuracy_by_steps(record: ComputeRecord) -> list[tuple[int, int, float, float]]:
    """Accuracy against compute: ``(steps taken, count, accuracy, FLOPs)`` per number of steps
    the adaptive inference took."""
    rows = []
    for steps in sorted(set(record.steps.tolist())):
        members = record.steps == steps
        rows.append((int(steps), int(members.sum()), record.correct[members].double().mean().item(), record.flops[members].mean().item()))
    return rows


def as_mapping(groups: Mapping[str, torch.Tensor] | None, size: int) -> dict[str, torch.Tensor]:
    """Check a data module's ``example_groups`` answer: name -> (size,) bool."""
    checked = {}
    for name, members in (groups or {}).items():
        if members.shape != (size,):
            raise UserInputError(f"example_groups()[{name!r}] has shape {tuple(members.shape)}; expected ({size},), one flag per example")
        checked[name] = members.bool()
    return checked
