"""``PreciseBatchNorm``: exact population statistics of every batch norm before each validation."""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.batchnorm.statistics import population_statistics_modules, recompute_population_statistics
from framework.errors import UserInputError, check_positive
from framework.probes import training_probe


class PreciseBatchNorm(Callback):
    """Before every validation during fit (not the sanity check), replaces the running averages of every
    batch norm of the model (``torch.nn`` batch norms, BN-LSTM's per-step ones) by their exact
    average over ``num_batches`` training batches with the current weights
    (:func:`~callbacks.batchnorm.recompute_population_statistics`). Validation, checkpoints
    saved after it and anything evaluated later use these statistics; training is unchanged (it
    normalises with batch statistics).

    The batches are the same at every validation: ``num_batches`` batches of the training
    loader's batch size, drawn once from the training set with ``seed`` (fewer if the set is
    smaller); under DDP rank r takes every world-size-th of them and the averages are pooled
    over ranks, so every rank holds the same statistics. The forward passes run under the
    trainer's precision. Each batch goes through :meth:`forward_batch`, by default the
    LightningModule called on the batch's first element (the inputs, as in the framework's
    datasets); override it for other batch layouts.

    Logs ``batchnorm/mean_shift`` and ``batchnorm/std_log_ratio``: the largest over layers of
    how far the replaced running averages were from the exact statistics (RMS of the mean's
    shift in standard deviations and of the log ratio of standard deviations), and the same per
    layer under ``batchnorm/mean_shift/<layer>``; a large value says that evaluation with the
    running averages would not have matched the weights.

    Args:
        num_batches: training batches averaged (per validation, over all ranks).
        seed: chooses the training examples.

    State: none (the statistics live in the model's buffers, which checkpoints hold).
    """

    def __init__(self, num_batches: int = 50, seed: int = 0) -> None:
        check_positive("num_batches", num_batches)
        self.num_batches = num_batches
        self.seed = seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not population_statistics_modules(pl_module):
            raise UserInputError("PreciseBatchNorm: the model has no batch norm with running statistics (track_running_stats=True); remove the callback")

    def forward_batch(self, pl_module: L.LightningModule, batch: Any) -> Any:
        """One forward pass on a training batch (on the module's device)."""
        return pl_module(batch[0])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        batch_size = trainer.train_dataloader.batch_size
        size = min(self.num_batches * batch_size, len(trainer.train_dataloader.dataset))
        probe = training_probe(trainer, size, self.seed, name="num_batches * batch_size")
        batches = list(zip(*(tensor.split(batch_size) for tensor in probe)))[trainer.global_rank :: trainer.world_size]

        def forward(model: torch.nn.Module, batch: Any) -> Any:
            with trainer.precision_plugin.forward_context():
                return self.forward_batch(model, trainer.strategy.batch_to_device(batch))

        changes = recompute_population_statistics(pl_module, batches, forward, all_reduce=lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))
        metrics = {f"batchnorm/mean_shift/{name}": change["mean_shift"] for name, change in changes.items()}
        metrics["batchnorm/mean_shift"] = max(change["mean_shift"] for change in changes.values())
        metrics["batchnorm/std_log_ratio"] = max(change["std_log_ratio"] for change in changes.values())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
