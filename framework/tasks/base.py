"""What every task shares: optimizer and scheduler from config, parameter groups without weight
decay, and the checkpointed extras that make a resumed run continue exactly (RNG states) and
log to the same W&B run (its id)."""

import fnmatch
import random
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from framework.errors import check_choice

CHECKPOINT_KEY = "framework"


def wandb_run_id(trainer: L.Trainer) -> str | None:
    """The id of the trainer's W&B run, or None if it logs to no W&B run."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


def collect_rng_states() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as tensors and plain
    Python values, so checkpoints holding them still load with ``weights_only=True``."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Task(L.LightningModule):
    """Base of the framework's LightningModules: a ``backbone`` (any ``nn.Module``) trained with
    the optimizer and LR scheduler given in the config.

    Args:
        backbone: the network.
        optimizer: a callable taking parameters (groups), e.g. ``torch.optim.SGD`` with its
            ``init_args`` in YAML. Default: SGD, lr 0.1, momentum 0.9.
        lr_scheduler: a callable taking the optimizer, or None.
        lr_scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        lr_scheduler_monitor: the metric a ``ReduceLROnPlateau`` scheduler watches.
        no_weight_decay: glob patterns of parameter names (e.g. ``"*.bias"``, ``"*bn*"``) put in
            a group with weight decay 0.
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        no_weight_decay: Sequence[str] = (),
    ) -> None:
        super().__init__()
        # The CLI records the parsed config here, so `load_from_checkpoint` can rebuild the backbone.
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        check_choice("lr_scheduler_interval", lr_scheduler_interval, ("epoch", "step"))
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.no_weight_decay = list(no_weight_decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def shared_step(self, batch: Any, split: str) -> torch.Tensor:
        """The loss of one batch of ``split`` (``train``, ``val`` or ``test``), logging the
        split's metrics; what each task defines."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.regularized(self.shared_step(batch, "train"))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def regularized(self, loss: torch.Tensor) -> torch.Tensor:
        """Add the backbone's own penalty (a ``regularization()`` method, e.g. nnRNN's alpha
        penalty and decay on T) to a training loss, logged as ``train/regularization``."""
        regularization = getattr(self.backbone, "regularization", None)
        if regularization is None:
            return loss
        penalty = regularization()
        self.log("train/regularization", penalty, on_step=True, on_epoch=False)
        return loss + penalty

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters, split into a default group and a no-weight-decay group."""
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                matched = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.no_weight_decay)
                (no_decay if matched else decay).append(parameter)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        if self.optimizer is None:
            optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        else:
            optimizer = self.optimizer(groups)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"rng_states": collect_rng_states(), "wandb_run_id": wandb_run_id(self.trainer)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extras = checkpoint.get(CHECKPOINT_KEY)
        if extras is not None:
            restore_rng_states(extras["rng_states"])
