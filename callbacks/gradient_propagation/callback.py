"""``GradientPropagation``: the Lightning callback that logs, over training, how the gradient of
the loss propagates back in time through a recurrent network (``||dL/dh_t||`` against t on a
fixed probe batch) and the spectrum and non-normality of its recurrent matrix, on a step
schedule, built on the functions of :mod:`callbacks.gradient_propagation.core`."""

import math
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from callbacks.gradient_propagation.core import hidden_state_gradient_norms, recurrent_matrices, spectrum_summary
from callbacks.linearization.callback import check_schedule, next_scheduled_step
from framework.errors import UserInputError, check_positive
from framework.models.rnn_base import RecurrentNetwork
from framework.probes import training_probe
from framework.tasks.sequence import LOSSES

PREFIX = "gradient_propagation"


class GradientPropagation(Callback):
    """Logs ``||dL/dh_t||`` against t and the spectrum of the recurrent matrix of a
    :class:`~framework.tasks.SequenceTask` whose backbone is a
    :class:`~framework.models.rnn_base.RecurrentNetwork` (every recurrent model of the framework).

    The probe is ``probe_size`` examples of the training dataset drawn with ``probe_seed`` (the
    same on every DDP rank), batches ``(x, y, mask)``. At the start of each scheduled global step
    (before its optimizer update; step 0 is the initialisation) every rank measures, in eval
    mode (so batch-normalised models use their population statistics and update none), the
    task's loss L on the probe and the Frobenius norms of its total derivatives with respect to
    the hidden states h_t of the probe batch
    (:func:`~callbacks.gradient_propagation.hidden_state_gradient_norms`), and the spectrum of
    the recurrent matrix (each gate's H x H block for an LSTM). Results are identical on every
    rank and no collective is called; modes are restored and ``.grad`` is never touched.

    Logged through ``trainer.loggers`` at ``trainer.global_step``:
    ``gradient_propagation/grad_norm_first`` (t = 1), ``grad_norm_last`` (t = L),
    ``grad_norm_log10_ratio`` (log10 of first over last: negative when the gradient vanishes
    going back in time), and per matrix block ``gradient_propagation/<block>/<name>`` for every
    scalar of :func:`~callbacks.gradient_propagation.spectrum_summary` (``<block>`` is
    ``recurrent`` for an H x H matrix, else the gate). On rank zero with a
    :class:`WandbLogger`: ``gradient_propagation/hidden_grad_norm``, a line plot of
    ``||dL/dh_t||`` against t (its data in a table of columns ``t``, ``grad_norm``), and
    histograms ``gradient_propagation/<block>/eigenvalue_moduli`` and ``.../singular_values``.

    Args:
        probe_size: examples in the probe batch.
        probe_seed: seeds the choice of the probe examples.
        schedule: ``every_k`` or ``log_spaced`` (see
            :func:`callbacks.linearization.next_scheduled_step`).
        every_k: interval in global steps of ``every_k``.
        log_base: multiplier of ``log_spaced``.
        log_growth: growth factor (> 1) of ``log_spaced``.
        spectrum: also log the spectrum of the recurrent matrix.

    State (checkpointed, so a resumed run continues the schedule exactly): the next scheduled
    step.
    """

    def __init__(
        self,
        probe_size: int = 64,
        probe_seed: int = 0,
        schedule: str = "log_spaced",
        every_k: int = 100,
        log_base: int = 5,
        log_growth: float = 1.15,
        spectrum: bool = True,
    ) -> None:
        check_positive("probe_size", probe_size)
        check_schedule(schedule, every_k, log_base, log_growth)
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self.schedule = schedule
        self.every_k = every_k
        self.log_base = log_base
        self.log_growth = log_growth
        self.spectrum = spectrum
        self.next_step = 0
        self.probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(probe_size=self.probe_size, probe_seed=self.probe_seed, schedule=self.schedule)

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_step = state_dict["next_step"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if not isinstance(backbone, RecurrentNetwork) or getattr(pl_module, "loss", None) not in LOSSES:
            raise UserInputError(
                f"GradientPropagation needs a SequenceTask with a RecurrentNetwork backbone (framework.models.rnn_*), "
                f"got {type(pl_module).__name__} with backbone {type(backbone).__name__}"
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step < self.next_step:
            return
        metrics, norms, spectra = self.measure(trainer, pl_module)
        self.next_step = next_scheduled_step(self.schedule, step, self.every_k, self.log_base, self.log_growth)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.is_global_zero:
            self._log_plots(trainer, norms, spectra)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict[str, float], torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The scalars, ``||dL/dh_t||`` (L,) and, per matrix block, the eigenvalue moduli and the
        singular values, now."""
        inputs, targets, mask = self._probe(trainer, pl_module)
        backbone: RecurrentNetwork = pl_module.backbone
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.enable_grad():
                norms = hidden_state_gradient_norms(backbone, inputs, targets, mask, pl_module.loss)
        finally:
            for module, training in modes.items():
                module.training = training
        first, last = norms[0].item(), norms[-1].item()
        metrics = {
            f"{PREFIX}/grad_norm_first": first,
            f"{PREFIX}/grad_norm_last": last,
            f"{PREFIX}/grad_norm_log10_ratio": math.log10(first / last) if first > 0 and last > 0 else float("nan"),
        }
        spectra = {}
        if self.spectrum:
            for block, matrix in recurrent_matrices(backbone).items():
                name = "recurrent" if block == "W" else block
                scalars, moduli, singular_values = spectrum_summary(matrix)
                metrics.update({f"{PREFIX}/{name}/{key}": value for key, value in scalars.items()})
                spectra[name] = (moduli, singular_values)
        return metrics, norms, spectra

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The probe batch on the model's device: ``probe_size`` training examples chosen with
        ``probe_seed``. Built once."""
        if self.probe is None:
            batch = training_probe(trainer, self.probe_size, self.probe_seed)
            if len(batch) != 3:
                raise UserInputError(f"GradientPropagation needs batches (x, y, mask) of a sequence task, got {len(batch)} tensors")
            self.probe = tuple(batch)
        return move_data_to_device(self.probe, pl_module.device)

    @staticmethod
    def _log_plots(trainer: L.Trainer, norms: torch.Tensor, spectra: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(columns=["t", "grad_norm"], data=[[t, value] for t, value in enumerate(norms.tolist(), start=1)])
                title = f"||dL/dh_t|| at step {trainer.global_step}"
                payload: dict[str, Any] = {f"{PREFIX}/hidden_grad_norm": wandb.plot.line(table, "t", "grad_norm", title=title)}
                for name, (moduli, singular_values) in spectra.items():
                    payload[f"{PREFIX}/{name}/eigenvalue_moduli"] = wandb.Histogram(moduli.numpy())
                    payload[f"{PREFIX}/{name}/singular_values"] = wandb.Histogram(singular_values.numpy())
                logger.experiment.log({**payload, "trainer/global_step": trainer.global_step})
