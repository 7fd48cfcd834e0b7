"""``Distillation``: a frozen teacher adds knowledge distillation and attention transfer terms to
any task's training loss."""

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from torch import nn

from callbacks.distillation.images import attention_grid, spatial_attention
from callbacks.distillation.losses import at_loss, kd_loss
from framework.errors import DataFileError, UserInputError, check_positive
from framework.probes import training_probe


def load_backbone_weights(model: nn.Module, checkpoint_path: str | Path) -> None:
    """Load the ``backbone.*`` weights of a framework task checkpoint into ``model``."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise DataFileError(f"teacher checkpoint {path} does not exist; expected a Lightning checkpoint of a framework task")
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
    weights = {name.removeprefix("backbone."): value for name, value in state.items() if name.startswith("backbone.")}
    if not weights:
        raise DataFileError(f"teacher checkpoint {path} holds no backbone.* weights; expected a Lightning checkpoint of a framework task")
    model.load_state_dict(weights)


class Distillation(Callback):
    """Trains the task's backbone (the student) with a frozen ``teacher``: the training loss
    becomes ``(1 - alpha) * task loss + alpha * KD + beta / 2 * sum of AT over layers``.

    KD is Hinton's distillation at temperature T (:func:`kd_loss`); AT compares the attention
    maps (:func:`attention_map`) of the modules named in ``layers`` (names as in
    ``named_modules()``, the same in teacher and student). ``alpha = 0`` gives AT alone and
    ``layers = ()`` KD alone. The teacher stays in eval mode without gradients, outside the
    LightningModule (so it is neither optimised nor checkpointed), on the student's device.
    Logs ``distill/kd_loss`` and ``distill/at_loss/<layer>`` every step and, every
    ``image_every_n_steps`` global steps from step 0 (before that step's update), to each logger
    that can show images (``log_image``, e.g. W&B; rank zero only), ``distill/attention/<layer>``:
    a grid of ``num_probe_images`` fixed training examples (chosen with ``probe_seed``), each
    row the input, the teacher's and the student's attention map (both networks in eval mode for
    the picture, modes restored after). A resumed run equals the uninterrupted one when the
    teacher is the same, i.e. loaded from a checkpoint; the image schedule is checkpointed.

    Args:
        teacher: the teacher network (e.g. a WideResNet from the config).
        teacher_checkpoint: a task checkpoint whose ``backbone.*`` weights load into ``teacher``.
        layers: module names whose attention is transferred.
        temperature: T of KD.
        alpha: weight of KD against the task loss, in [0, 1].
        beta: weight of AT (the loss is ``beta / 2`` times the sum over layers).
        image_every_n_steps: interval in global steps of the attention-map images; 0: none.
        num_probe_images: examples (rows) in each attention-map image.
        probe_seed: seeds the choice of those examples.
    """

    def __init__(
        self,
        teacher: nn.Module,
        teacher_checkpoint: str | None = None,
        layers: Sequence[str] = (),
        temperature: float = 4.0,
        alpha: float = 0.9,
        beta: float = 1e3,
        image_every_n_steps: int = 200,
        num_probe_images: int = 4,
        probe_seed: int = 0,
    ) -> None:
        check_positive("temperature", temperature)
        check_positive("beta", beta, allow_zero=True)
        check_positive("image_every_n_steps", image_every_n_steps, allow_zero=True)
        check_positive("num_probe_images", num_probe_images)
        if not 0.0 <= alpha <= 1.0:
            raise UserInputError(f"alpha={alpha} must be in [0, 1]")
        if teacher_checkpoint is not None:
            load_backbone_weights(teacher, teacher_checkpoint)
        self.teacher = teacher.eval().requires_grad_(False)
        self.layers = list(layers)
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.image_every_n_steps, self.num_probe_images, self.probe_seed = image_every_n_steps, num_probe_images, probe_seed
        self.next_image_step = 0
        self.probe: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"next_image_step": self.next_image_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_image_step = state_dict["next_image_step"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = pl_module.backbone
        for name, network in (("student", student), ("teacher", self.teacher)):
            missing = sorted(set(self.layers) - dict(network.named_modules()).keys())
            if missing:
                raise UserInputError(f"Distillation layers {missing} are not modules of the {name} ({type(network).__name__})")
        self.teacher.to(pl_module.device)
        pl_module.training_step = functools.partial(self._distilled_step, pl_module, type(pl_module).training_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        vars(pl_module).pop("training_step", None)  # back to the class's own training_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.layers and self.image_every_n_steps:
            self._probe(trainer, pl_module)  # on every rank, so every rank's state is the same

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.layers or not self.image_every_n_steps or step < self.next_image_step:
            return
        self.next_image_step = (step // self.image_every_n_steps + 1) * self.image_every_n_steps
        probe = self._probe(trainer, pl_module)
        image_loggers = [logger for logger in trainer.loggers if hasattr(logger, "log_image")]
        if not (trainer.is_global_zero and image_loggers):
            return
        grids = self.attention_images(probe, pl_module.backbone)
        for layer, grid in grids.items():
            caption = f"rows: {len(self.probe)} training examples; columns: input, teacher, student attention at {layer}"
            for logger in image_loggers:
                logger.log_image(key=f"distill/attention/{layer}", images=[grid], step=step, caption=[caption])

    def attention_images(self, inputs: torch.Tensor, student: nn.Module) -> dict[str, np.ndarray]:
        """For each transferred layer, the :func:`attention_grid` of ``inputs`` (input, teacher,
        student), both networks run in eval mode without gradients; modes are restored."""
        captures = ForwardCapture(student, self.layers), ForwardCapture(self.teacher, self.layers)
        modes = {module: module.training for module in student.modules()}
        student.eval()
        try:
            with torch.no_grad():
                for capture, network in zip(captures, (student, self.teacher)):
                    with capture:
                        network(inputs)
        finally:
            for module, training in modes.items():
                module.training = training
        student_maps, teacher_maps = ({layer: spatial_attention(capture.activations[layer]) for layer in self.layers} for capture in captures)
        return {layer: attention_grid(inputs, teacher_maps[layer], student_maps[layer]) for layer in self.layers}

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        """``num_probe_images`` inputs of the training dataset chosen with ``probe_seed``, on
        the model's device; built once."""
        if self.probe is None:
            count = min(self.num_probe_images, len(trainer.train_dataloader.dataset))
            self.probe = training_probe(trainer, count, self.probe_seed)[0]
        return move_data_to_device(self.probe, pl_module.device)

    def _distilled_step(self, pl_module: L.LightningModule, training_step: Callable, batch: Any, batch_idx: int) -> Any:
        student_outputs, teacher_outputs = ForwardCapture(pl_module.backbone, self.layers), ForwardCapture(self.teacher, self.layers)
        with student_outputs:
            output = training_step(pl_module, batch, batch_idx)
        with teacher_outputs, torch.no_grad():
            teacher_logits = self.teacher(batch[0])
        loss = output["loss"] if isinstance(output, Mapping) else output
        total = (1.0 - self.alpha) * loss
        if self.alpha > 0:
            distilled = kd_loss(student_outputs.logits, teacher_logits, self.temperature)
            pl_module.log("distill/kd_loss", distilled, on_step=True, on_epoch=False)
            total = total + self.alpha * distilled
        for layer in self.layers:
            transferred = at_loss(student_outputs.activations[layer], teacher_outputs.activations[layer])
            pl_module.log(f"distill/at_loss/{layer}", transferred, on_step=True, on_epoch=False)
            total = total + self.beta / 2 * transferred
        return {**output, "loss": total} if isinstance(output, Mapping) else total


class ForwardCapture:
    """Context manager recording a network's output (``logits``) and the outputs of the named
    modules (``activations``) during the forward passes inside it."""

    def __init__(self, network: nn.Module, layers: Sequence[str]) -> None:
        self.network = network
        self.modules = {name: module for name, module in network.named_modules() if name in layers}
        self.logits: torch.Tensor | None = None
        self.activations: dict[str, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "ForwardCapture":
        self.handles.append(self.network.register_forward_hook(self._keep_logits))
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(functools.partial(self._keep_activation, name)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _keep_logits(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.logits = output

    def _keep_activation(self, name: str, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.activations[name] = output
