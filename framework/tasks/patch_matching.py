"""Patch matching: a network scores pairs of patches, trained with a hinge loss on +/-1 labels
and judged by the false positive rate at 95% recall (FPR95), the standard measure on the
Brown/UBC multi-view stereo benchmark."""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryAccuracy
from torchmetrics.utilities import dim_zero_cat

from framework.errors import UserInputError, check_positive
from framework.tasks.base import Task

TARGET_RECALL = 0.95


def hinge_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean of ``max(0, margin - label * score)`` over pairs; labels are +1 (match) / -1."""
    return torch.clamp(margin - labels.to(scores.dtype) * scores, min=0).mean()


class FalsePositiveRateAtRecall(Metric):
    """False positive rate at the highest score threshold whose recall (true positive rate)
    reaches ``recall``: pairs scoring at least the threshold are declared matching. Keeps
    every score and label (``dist_reduce_fx="cat"``, so it is exact under DDP). Labels are +1
    for matching pairs and -1 (or 0) otherwise; NaN when either class is absent."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, recall: float = TARGET_RECALL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < recall <= 1.0:
            raise UserInputError(f"recall={recall} must be in (0, 1]")
        self.recall = recall
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.scores.append(scores.detach().flatten().float())
        self.labels.append(labels.detach().flatten() > 0)

    def compute(self) -> torch.Tensor:
        scores, positive = dim_zero_cat(self.scores), dim_zero_cat(self.labels)
        num_positive = positive.sum()
        num_negative = positive.numel() - num_positive
        if num_positive == 0 or num_negative == 0:
            return torch.tensor(float("nan"), device=scores.device)
        order = torch.argsort(scores, descending=True)
        scores, positive = scores[order], positive[order]
        true_positive_rate = positive.cumsum(0) / num_positive
        false_positive_rate = (~positive).cumsum(0) / num_negative
        # A threshold admits every pair scoring at least it: only the last of tied scores counts.
        last_of_ties = torch.ones_like(positive)
        last_of_ties[:-1] = scores[1:] != scores[:-1]
        reached = last_of_ties & (true_positive_rate >= self.recall - 1e-9)  # 19 / 20 may round below 0.95
        return false_positive_rate[reached.nonzero()[0, 0]]


class PatchMatchingTask(Task):
    """Trains ``backbone`` (pairs (N, 2, H, W) -> scores (N,)) with the hinge loss on +/-1
    labels. Logs ``{split}/loss``, ``{split}/fpr95`` (lower is better) and ``{split}/acc`` (the
    sign of the score against the label, so the default checkpoint callback, which watches
    ``val/acc``, works unchanged) for ``train``, ``val`` and ``test``.

    Args:
        margin: margin of the hinge loss.
        (optimizer and scheduler arguments as in :class:`Task`)
    """

    def __init__(
        self,
        backbone: nn.Module,
        margin: float = 1.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        no_weight_decay: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, lr_scheduler_interval, lr_scheduler_monitor, no_weight_decay)
        check_positive("margin", margin)
        self.margin = margin
        # "fit", not "train": ModuleDict reserves the name `train` (nn.Module.train).
        self.fpr95 = nn.ModuleDict({split: FalsePositiveRateAtRecall() for split in ("fit", "val", "test")})
        self.accuracy = nn.ModuleDict({split: BinaryAccuracy() for split in ("fit", "val", "test")})

    def shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        pairs, labels = batch
        scores = self(pairs)
        loss = hinge_loss(scores, labels, self.margin)
        key = "fit" if split == "train" else split
        self.fpr95[key].update(scores, labels)
        self.accuracy[key].update((scores.detach() > 0).long(), (labels > 0).long())
        training = split == "train"
        self.log(f"{split}/loss", loss, on_step=training, on_epoch=not training, prog_bar=True, sync_dist=not training)
        self.log(f"{split}/fpr95", self.fpr95[key], on_step=False, on_epoch=True, prog_bar=not training)
        self.log(f"{split}/acc", self.accuracy[key], on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Matching scores, positive for a match."""
        return self(batch[0])
