"""``EKFACStatistics``: the Lightning side of the :class:`EKFAC` optimiser.

The task's optimiser is an EKFAC (``optimizer: functools.partial(EKFAC, lr=...)``, or
``class_path: callbacks.curvature.EKFAC`` in YAML); this callback attaches it to the
LightningModule at ``on_fit_start`` (after the optimisers exist, before their state is restored),
records the training forward pass of every batch whose optimiser step needs statistics (so an
accumulated step covers all its micro-batches), draws the output gradients in
``on_before_backward`` while the graph is alive, and logs what the optimiser measured. All the
curvature state lives in the optimiser's ``state_dict``, so checkpoints restore it.
"""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from callbacks.curvature.optimizer import EKFAC, FisherStatistics
from callbacks.curvature.targets import FISHER_TYPES, TASKS
from framework.errors import UserInputError, check_choice, check_positive


def spectrum_histograms(optimizer: EKFAC) -> dict[str, Any]:
    """``ekfac/spectrum/<layer>``: W&B histograms of each layer's log10(scaling + damping)."""
    import wandb

    return {f"ekfac/spectrum/{name}": wandb.Histogram(values.float().cpu().numpy()) for name, values in optimizer.spectra().items()}


class EKFACStatistics(Callback):
    """Feeds the task's :class:`EKFAC` optimiser the Fisher statistics of its training batches and
    logs, on the trainer/global_step axis, every ``log_every_n_steps``: ``ekfac/damping``,
    ``ekfac/condition/<layer>`` (the damped scaling's largest over smallest entry),
    ``ekfac/preconditioned_to_raw_norm``, ``ekfac/kl_clip_factor`` (with ``kl_clip``),
    ``ekfac/reduction_ratio`` (on damping-adaptation steps) and, to W&B only, the histogram
    ``ekfac/spectrum/<layer>`` of log10(scaling + damping); and ``ekfac/eigen_seconds`` at every
    step with an eigendecomposition.

    Args: as :class:`FisherStatistics` (``fisher_type`` ``mc`` by default: the true Fisher; the
    LightningModule's ``forward``, or the submodule ``output_module``, must return the logits or
    regression outputs, and ``empirical`` takes the labels from ``batch[1]``).
    """

    def __init__(
        self, fisher_type: str = "mc", task: str = "classification", samples: int = 1, seed: int = 0, output_module: str = ""
    ) -> None:
        check_choice("fisher_type", fisher_type, FISHER_TYPES)
        check_choice("task", task, TASKS)
        check_positive("samples", samples)
        self.fisher_type, self.task, self.samples, self.seed, self.output_module = fisher_type, task, samples, seed, output_module
        self.statistics: FisherStatistics | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizers = [optimizer for optimizer in trainer.optimizers if isinstance(optimizer, EKFAC)]
        if len(optimizers) != 1:
            kinds = [type(optimizer).__name__ for optimizer in trainer.optimizers]
            raise UserInputError(f"EKFACStatistics needs exactly one EKFAC optimizer in the task, got {kinds}")
        self.statistics = FisherStatistics(
            pl_module, optimizers[0], self.fisher_type, self.task, self.samples, self.seed, self.output_module
        )
        optimizers[0].closure_loss_scale = trainer.accumulate_grad_batches

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self.statistics.start(targets)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.statistics.finish()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.statistics.cancel()
        optimizer = self.statistics.optimizer
        metrics = optimizer.pop_metrics()
        logging = trainer.global_step % trainer.log_every_n_steps == 0
        if not logging:
            metrics = {key: value for key, value in metrics.items() if key == "ekfac/eigen_seconds"}
        # Straight to the loggers: self.log would re-log a step's value (eigen_seconds) at later steps.
        for logger in trainer.loggers:
            logged = dict(metrics)
            if logging and isinstance(logger, WandbLogger):
                logged.update(spectrum_histograms(optimizer))
            if logged:
                logger.log_metrics(logged, step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.statistics.cancel()
