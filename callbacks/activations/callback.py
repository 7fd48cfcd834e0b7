"""``ActivationNorms``: logs how the forward and backward signals cross the depth of the
backbone during real training steps, first at initialisation."""

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.activations.signals import SignalCapture, default_modules
from framework.errors import check_positive


class ActivationNorms(Callback):
    """Logs ``activations/norm/<module>`` (RMS of the module's output) and
    ``activations/grad_norm/<module>`` (RMS of the training loss's gradient with respect to that
    output) for chosen modules of ``pl_module.backbone``, measured on the training step itself
    (train mode, the task's own loss, no extra pass): at global step 0, the initialisation, and
    then every ``every_n_steps`` steps (0: only at step 0).

    Values are taken on the first batch of a scheduled optimizer step; across DDP ranks the mean
    squares are averaged (one all-reduce on every rank at the same steps), so the log is the RMS
    over the global batch. Lightning divides the loss by ``accumulate_grad_batches``, which
    scales the backward values alike. Logged through ``trainer.loggers`` at that global step.

    Args:
        modules: module names of the backbone (as in ``named_modules()``); default: each group of
            a network with ``groups`` (DiracNet, PlainNet, WideResNet), else each leaf module
            with parameters (:func:`default_modules`).
        every_n_steps: interval in global steps after step 0; 0 logs the initialisation only.

    State (checkpointed): the next scheduled step.
    """

    def __init__(self, modules: Sequence[str] | None = None, every_n_steps: int = 0) -> None:
        check_positive("every_n_steps", every_n_steps, allow_zero=True)
        self.modules = None if modules is None else list(modules)
        self.every_n_steps = every_n_steps
        self.next_step = 0
        self.capture: SignalCapture | None = None
        self.step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_step = state_dict["next_step"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fails before training when a module name is wrong.
        SignalCapture(pl_module.backbone, self._modules(pl_module))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.next_step is None or trainer.global_step < self.next_step:
            return
        self.step = trainer.global_step
        self.next_step = (self.step // self.every_n_steps + 1) * self.every_n_steps if self.every_n_steps else None
        self.capture = SignalCapture(pl_module.backbone, self._modules(pl_module)).__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.capture is None:
            return
        capture, self.capture = self.capture, None
        capture.__exit__(None, None, None)
        names = list(capture.modules)
        missing = torch.tensor(float("nan"))  # a module that did not run, or got no gradient (frozen)
        values = [capture.forward.get(name, missing) for name in names] + [capture.backward.get(name, missing) for name in names]
        squares = torch.stack([value.to(pl_module.device).square() for value in values])
        squares = trainer.strategy.reduce(squares, reduce_op="mean").sqrt().tolist()
        metrics = {f"activations/norm/{name}": value for name, value in zip(names, squares)}
        metrics.update({f"activations/grad_norm/{name}": value for name, value in zip(names, squares[len(names) :])})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self.step)

    def _modules(self, pl_module: L.LightningModule) -> list[str]:
        return default_modules(pl_module.backbone) if self.modules is None else self.modules
