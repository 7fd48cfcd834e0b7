"""Classification: cross-entropy on the backbone's logits, accuracy per split."""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from framework.errors import UserInputError, check_positive
from framework.tasks.base import Task

SPLITS = ("train", "val", "test")


class ClassificationTask(Task):
    """Trains ``backbone`` (images -> logits) with cross-entropy. Logs ``{split}/loss`` and
    ``{split}/acc`` for ``train``, ``val`` and ``test`` (train loss per step, the rest per epoch).

    Args:
        num_classes: number of classes of the data.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        (optimizer and scheduler arguments as in :class:`Task`)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        no_weight_decay: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, lr_scheduler_interval, lr_scheduler_monitor, no_weight_decay)
        check_positive("num_classes", num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise UserInputError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.accuracy = nn.ModuleDict({split: MulticlassAccuracy(num_classes, average="micro", validate_args=False) for split in ("fit", "val", "test")})

    def shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        accuracy = self.accuracy["fit" if split == "train" else split]
        accuracy(logits.detach(), targets)
        training = split == "train"
        self.log(f"{split}/loss", loss, on_step=training, on_epoch=not training, prog_bar=True, sync_dist=not training)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=not training)
        return loss

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Class probabilities."""
        return self(batch[0]).softmax(dim=-1)
