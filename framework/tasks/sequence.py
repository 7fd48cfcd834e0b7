"""Sequence tasks with per-step targets and masks: copy, adding, sequential pixel digits."""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from framework.errors import check_choice
from framework.tasks.base import Task

LOSSES = ("cross_entropy", "mse")


def sequence_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """The loss of :class:`SequenceTask` on the masked steps, outputs (M, C) and targets (M,):
    the mean cross-entropy (targets are class indices) or the mean squared error (C = 1)."""
    if loss == "mse":
        return F.mse_loss(outputs.squeeze(-1), targets.float())
    return F.cross_entropy(outputs, targets)


class SequenceTask(Task):
    """Trains ``backbone`` mapping inputs (N, L, D) to per-step outputs (N, L, C) on batches
    ``(x, y, mask)``; the loss is averaged over the steps where ``mask`` is true.

    With ``loss="cross_entropy"`` y holds class indices and ``{split}/acc`` is the accuracy over
    the masked steps; with ``loss="mse"`` y holds real targets and C must be 1. Logs
    ``{split}/loss`` (train per step, val/test per epoch, averaged over masked steps).

    Args:
        loss: ``cross_entropy`` or ``mse``.
        (optimizer and scheduler arguments as in :class:`Task`)
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        no_weight_decay: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, lr_scheduler_interval, lr_scheduler_monitor, no_weight_decay)
        check_choice("loss", loss, LOSSES)
        self.loss = loss
        self.mean_loss = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self.accuracy = nn.ModuleDict({split: MeanMetric() for split in ("fit", "val", "test")})

    def shared_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        inputs, targets, mask = batch
        outputs = self(inputs)[mask]
        targets = targets[mask]
        loss = sequence_loss(outputs, targets, self.loss)
        if self.loss == "cross_entropy":
            correct = (outputs.detach().argmax(dim=-1) == targets).float()
            accuracy = self.accuracy["fit" if split == "train" else split]
            accuracy.update(correct)
            self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=split != "train")
        if split == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        else:
            self.mean_loss[split].update(loss.detach(), weight=targets.numel())
            self.log(f"{split}/loss", self.mean_loss[split], on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0])
