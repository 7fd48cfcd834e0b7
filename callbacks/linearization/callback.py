"""``NTKAlignment``: the Lightning callback that tracks how the empirical NTK of a model aligns
with the labels during training (Baratin et al. 2021), on a fixed probe subset of the training
data and on a step schedule, built on :class:`EmpiricalNTK` and the alignment functions."""

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from callbacks.linearization.alignment import CenteredKernel, target_kernel
from callbacks.linearization.ntk import IMPLEMENTATIONS, TRACE_REDUCTIONS, EmpiricalNTK
from framework.errors import UserInputError, check_choice, check_positive
from framework.probes import training_probe

SCHEDULES = ("every_k", "log_spaced")
# Heatmap colours: white for the smallest kernel entry to dark blue for the largest.
LOW_COLOUR = np.array([255.0, 255.0, 255.0])
HIGH_COLOUR = np.array([8.0, 48.0, 107.0])
# Each kernel entry is a square block of pixels, so that the image is at least this many pixels
# wide (small probes stay visible) but no larger than needed: W&B encodes it as a PNG at every
# evaluation, measured about 20 ms for 512 x 512 pixels and 7 ms for 256 x 256.
HEATMAP_MIN_SIDE = 256


def check_schedule(schedule: str, every_k: int, log_base: int, log_growth: float) -> None:
    """Refuse a schedule :func:`next_scheduled_step` cannot follow, naming the bad option."""
    check_choice("schedule", schedule, SCHEDULES)
    check_positive("every_k", every_k)
    check_positive("log_base", log_base)
    if not log_growth > 1.0:
        raise UserInputError(f"log_growth={log_growth!r} must be > 1 (the log-spaced schedule's growth factor)")


def next_scheduled_step(schedule: str, step: int, every_k: int = 50, log_base: int = 5, log_growth: float = 1.15) -> int:
    """The first scheduled global step strictly after ``step`` (step 0 is always scheduled).

    ``every_k``: 0, k, 2k, ... ``log_spaced``: 0 then the distinct values of
    ``log_base * floor(log_growth ** i)`` for i = 0, 1, ... (dense early, sparse later)."""
    if schedule == "every_k":
        return (step // every_k + 1) * every_k
    exponent = 0
    while (candidate := log_base * math.floor(log_growth**exponent)) <= step:
        exponent += 1
    return candidate


def scheduled_steps(schedule: str, until: int, every_k: int = 50, log_base: int = 5, log_growth: float = 1.15) -> list[int]:
    """All scheduled global steps up to ``until`` included, in order (see :func:`next_scheduled_step`)."""
    steps = [0]
    while (step := next_scheduled_step(schedule, steps[-1], every_k, log_base, log_growth)) <= until:
        steps.append(step)
    return steps


def kernel_heatmap(kernel: torch.Tensor) -> np.ndarray:
    """An RGB image (uint8, H x W x 3) of a square kernel, entries scaled from its minimum (white)
    to its maximum (dark blue), each entry a block of pixels so that the image is at least
    ``HEATMAP_MIN_SIDE`` pixels wide."""
    values = kernel.double().cpu()
    span = (values.max() - values.min()).clamp_min(torch.finfo(torch.float64).tiny)
    scaled = ((values - values.min()) / span).numpy()[..., None]
    image = LOW_COLOUR + scaled * (HIGH_COLOUR - LOW_COLOUR)
    pixels = max(1, -(-HEATMAP_MIN_SIDE // len(values)))
    image = image.repeat(pixels, axis=0).repeat(pixels, axis=1)
    return image.round().astype(np.uint8)


class NTKAlignment(Callback):
    """Logs the alignment of the empirical NTK (traced over outputs) with the labels, per layer,
    and with the kernel at the first evaluation, on a fixed probe of training examples.

    The probe is ``probe_size`` examples of the training dataset drawn with ``probe_seed`` (the
    same on every DDP rank), ordered by class so the kernel heatmap shows class blocks. The batch
    format is ``(inputs, class indices)``. At the start of each scheduled global step (before
    that step's optimizer update; step 0 is the initialisation) the kernel is computed in eval
    mode on every rank (identical results, no collective calls), the modes of all submodules are
    restored afterwards and ``.grad`` is never touched. Nothing is computed on other steps.

    Logged through ``trainer.loggers`` at ``trainer.global_step``: ``ntk/alignment`` (centred
    kernel-target alignment), ``ntk/alignment/<layer>`` (each parameter-owning module's kernel),
    ``ntk/kernel_alignment_to_init`` (centred alignment with the first evaluated kernel),
    ``ntk/trace`` and ``ntk/eigenvalue_<i>`` (the largest eigenvalues, i = 1 the largest); and, on
    rank zero with a :class:`WandbLogger` (the heatmap is rendered only then), ``ntk/kernel``, a
    heatmap image of the kernel.

    Cost (docs/benchmarks.md): one evaluation of the defaults on the digits SmallCNN takes about
    as long as 5-7 of its training steps, so the default schedule starts later than the dense
    ``5 * floor(1.15^i)``: ``40 * floor(1.15^i)`` (steps 0, 40, 80, ..., 400, 480, 560, 640, ...)
    keeps training at most 1.2x slower from 120 steps on (3 evaluations in 120 steps, 13 in 600,
    33 in 10,000). For denser early points set ``log_base: 5`` and accept the cost.

    Args:
        probe_size: number of training examples in the probe (the kernel is probe_size^2). 256
            gives a less noisy alignment at about twice the cost per evaluation of the default 128.
        probe_seed: seeds the choice of the probe examples.
        schedule: ``every_k`` or ``log_spaced`` (see :func:`next_scheduled_step`).
        every_k: interval in global steps of ``every_k``.
        log_base: multiplier of ``log_spaced`` (its first evaluation after step 0).
        log_growth: growth factor (> 1) of ``log_spaced``.
        num_eigenvalues: how many of the largest eigenvalues to log.
        per_layer: also log the alignment of each layer's kernel.
        trace_reduction: ``mean`` or ``sum`` of the kernel over outputs (:class:`EmpiricalNTK`).
        implementation: kernel implementation (:class:`EmpiricalNTK`).
        chunk_size: examples processed at once (:class:`EmpiricalNTK`); the default takes the
            default probe in one pass, about 15% faster than two chunks of 64 on the digits
            SmallCNN, for twice the working memory.

    State (checkpointed, so a resumed run continues exactly): the next scheduled step and the
    kernel at the first evaluation.
    """

    def __init__(
        self,
        probe_size: int = 128,
        probe_seed: int = 0,
        schedule: str = "log_spaced",
        every_k: int = 50,
        log_base: int = 40,
        log_growth: float = 1.15,
        num_eigenvalues: int = 5,
        per_layer: bool = True,
        trace_reduction: str = "mean",
        implementation: str = "auto",
        chunk_size: int = 128,
    ) -> None:
        check_positive("probe_size", probe_size)
        check_schedule(schedule, every_k, log_base, log_growth)
        check_positive("num_eigenvalues", num_eigenvalues, allow_zero=True)
        if num_eigenvalues > probe_size:
            raise UserInputError(f"num_eigenvalues={num_eigenvalues} exceeds probe_size={probe_size}, the number of eigenvalues")
        check_choice("trace_reduction", trace_reduction, TRACE_REDUCTIONS)
        check_choice("implementation", implementation, IMPLEMENTATIONS)
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self.schedule = schedule
        self.every_k = every_k
        self.log_base = log_base
        self.log_growth = log_growth
        self.num_eigenvalues = num_eigenvalues
        self.per_layer = per_layer
        self.ntk = EmpiricalNTK(mode="trace", trace_reduction=trace_reduction, implementation=implementation, chunk_size=chunk_size)
        self.next_step = 0
        self.initial_kernel: torch.Tensor | None = None
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        # Centred once: the probe's target kernel (with the probe) and the initial kernel.
        self.target_reference: CenteredKernel | None = None
        self.initial_reference: CenteredKernel | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(probe_size=self.probe_size, probe_seed=self.probe_seed, schedule=self.schedule)

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step, "initial_kernel": self.initial_kernel}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_step = state_dict["next_step"]
        self.initial_kernel = state_dict["initial_kernel"]
        self.initial_reference = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step < self.next_step:
            return
        metrics, kernel = self.measure(trainer, pl_module)
        self.next_step = next_scheduled_step(self.schedule, step, self.every_k, self.log_base, self.log_growth)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.is_global_zero:
            self._log_heatmap(trainer, kernel)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict[str, float], torch.Tensor]:
        """The metrics and the kernel (N, N) on the probe now; stores the kernel as the initial
        one at the first evaluation."""
        inputs = self._probe(trainer, pl_module)
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            kernels = self.ntk.layerwise(pl_module, inputs) if self.per_layer else {"total": self.ntk(pl_module, inputs)}
        finally:
            for module, training in modes.items():
                module.training = training
        kernel = sum(kernels.values()).detach().cpu()
        if self.initial_kernel is None:
            self.initial_kernel = kernel.clone()
        if self.initial_reference is None:
            self.initial_reference = CenteredKernel(self.initial_kernel)
        metrics = {
            "ntk/alignment": self.target_reference.alignment(kernel).item(),
            "ntk/kernel_alignment_to_init": self.initial_reference.alignment(kernel).item(),
            "ntk/trace": kernel.double().trace().item(),
        }
        if self.per_layer:
            for layer, layer_kernel in kernels.items():
                metrics[f"ntk/alignment/{layer}"] = self.target_reference.alignment(layer_kernel.cpu()).item()
        eigenvalues = torch.linalg.eigvalsh(kernel.double()).flip(0)[: self.num_eigenvalues]
        metrics.update({f"ntk/eigenvalue_{i}": value.item() for i, value in enumerate(eigenvalues, start=1)})
        return metrics, kernel

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        """The probe's inputs on the model's device: ``probe_size`` examples of the training
        dataset chosen with ``probe_seed``, sorted by class (stable). Built once, with the
        centred kernel of its targets."""
        if self.probe is None:
            inputs, targets = training_probe(trainer, self.probe_size, self.probe_seed)[:2]
            by_class = torch.argsort(targets, stable=True)
            self.probe = (inputs[by_class], targets[by_class])
            self.target_reference = CenteredKernel(target_kernel(self.probe[1]))
        return move_data_to_device(self.probe[0], pl_module.device)

    @staticmethod
    def _log_heatmap(trainer: L.Trainer, kernel: torch.Tensor) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                caption = "empirical NTK on the probe, examples sorted by class"
                image = wandb.Image(kernel_heatmap(kernel), caption=caption)
                logger.experiment.log({"ntk/kernel": image, "trainer/global_step": trainer.global_step})
