"""``Pruning``: the Lightning callback that schedules the functional core, keeps its state and logs."""

import itertools
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from callbacks.curvature import FISHER_TYPES, TASKS
from callbacks.pruning.masks import (
    PARAMETER_NAMES,
    SCOPES,
    PrunedTensor,
    add_masks,
    keep_pruned_at_zero,
    make_permanent,
    mask_gradients,
    prunable_tensors,
    rewind,
    snapshot,
    sparsity,
)
from callbacks.pruning.schedules import SCHEDULES, step_epochs, step_global_steps, target_sparsity
from callbacks.pruning.scores import CRITERIA, accuracy, mean_loss, negative_log_likelihood
from callbacks.pruning.step import prune
from framework.errors import UserInputError, check_choice, check_positive


class Pruning(Callback):
    """Prunes Linear and Conv2d weights (and, when asked, normalisation parameters) at the start of
    scheduled epochs or before scheduled optimizer steps, with fine-tuning in between.

    A superset of Lightning's ModelPruning (``amount``, ``parameter_names``, global or per-layer,
    structured by L_n norm, lottery-ticket rewinding) with loss-model criteria and state that
    resumes. Scores, losses and accuracies are computed in eval mode on a fixed evaluation set:
    the first ``score_batches`` batches of the training set in dataset order, the same on every
    DDP rank, so masks are identical on every rank.

    Args:
        amount: final sparsity in [0, 1): the fraction of all prunable units pruned at the end
            (:mod:`callbacks.pruning.masks`).
        criterion: one of ``CRITERIA`` (:mod:`callbacks.pruning.scores`).
        schedule: one of ``SCHEDULES`` (:mod:`callbacks.pruning.schedules`); ``one_shot`` takes ``steps=1``.
        steps: number of pruning steps.
        start_epoch: epoch at whose start the first step happens.
        end_epoch: epoch of the last step (default ``start_epoch + steps - 1``); steps are spread
            evenly in between and training fine-tunes between them and after the last.
        fine_tune: False puts all steps at ``start_epoch`` (or ``start_step``), back to back
            (scores recomputed each step).
        start_step, every_n_steps, at_steps: schedule the steps in optimizer steps instead of
            epochs (any of them set): step k happens before the optimizer step ``start_step + k *
            every_n_steps`` (k = 0..steps-1), or before ``at_steps[k]``; "before global step s" is
            at the first batch of the accumulation window whose optimizer step makes
            ``trainer.global_step`` s + 1, so with gradient accumulation a step never splits a
            window. Leave ``start_epoch``/``end_epoch`` unset then.
        scope: ``global`` (one ranking over all tensors) or ``layer`` (each tensor reaches the target).
        structured: prune whole output channels (neurons) instead of single weights.
        pruning_norm: with ``structured``, rank channels by this L_n norm of their weights; None
            ranks them by their summed criterion score.
        layers: names of the modules to prune, relative to the LightningModule (e.g.
            ``backbone.fc``); default every Linear and Conv2d (and normalisation module with
            ``include_normalization``). Checked in ``setup``.
        parameter_names: which parameters of those modules to prune (``weight``, ``bias``).
        include_normalization: also prune these parameters of BatchNorm1d/2d, LayerNorm and
            GroupNorm modules (every criterion; structured pruning treats each channel as a unit).
        locality_penalty: lambda of the penalty ``lambda/2 w^2`` added to every score.
        fisher_type: Fisher of ``QM``/``OBD`` (``exact``, ``mc``, ``empirical``).
        fisher_samples: targets drawn per example for ``mc``.
        task: the loss of the scores: ``classification`` (cross-entropy) or ``regression``.
        score_batches: size of the evaluation set in training batches.
        rewind_to: epoch (global step for a step schedule), at most the first step's, whose
            starting weights the survivors are reset to after every step (lottery ticket; 0 is the
            initialisation); None does not rewind.
        allow_layer_collapse: allow a step to prune every unit of a tensor (refused by default).
        seed: seeds the MC Fisher's target sampling (step k uses ``seed + k``).
        evaluate: measure loss and accuracy on the evaluation set just before and after every step
            and after training (two forward passes over it per step); False logs sparsity (and
            the predicted loss change) only, and MP then reads no data at all.

    Masks live in the model (buffers ``weight_mask``, added in ``setup`` so that checkpoints
    always have these keys and load before any step); the optimizers are hooked in
    ``on_fit_start`` (:func:`callbacks.pruning.keep_pruned_at_zero`) and gradients masked in
    ``on_before_optimizer_step``, before Lightning clips them. The callback's state is the number
    of steps done and the rewind weights. At ``teardown`` the masks are folded into the weights
    and removed, so the model handed back is an ordinary module.
    """

    def __init__(
        self,
        amount: float = 0.5,
        criterion: str = "MP",
        schedule: str = "one_shot",
        steps: int = 1,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        fine_tune: bool = True,
        start_step: int | None = None,
        every_n_steps: int | None = None,
        at_steps: Sequence[int] | None = None,
        scope: str = "global",
        structured: bool = False,
        pruning_norm: float | None = None,
        layers: Sequence[str] | None = None,
        parameter_names: Sequence[str] = ("weight",),
        include_normalization: bool = False,
        locality_penalty: float = 0.0,
        fisher_type: str = "exact",
        fisher_samples: int = 1,
        task: str = "classification",
        score_batches: int = 8,
        rewind_to: int | None = None,
        allow_layer_collapse: bool = False,
        seed: int = 0,
        evaluate: bool = True,
    ) -> None:
        if not 0.0 <= amount < 1.0:
            raise UserInputError(f"amount={amount!r} must be in [0, 1) (the final fraction of prunable weights pruned)")
        check_choice("criterion", criterion, CRITERIA)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("scope", scope, SCOPES)
        check_choice("fisher_type", fisher_type, FISHER_TYPES)
        check_choice("task", task, TASKS)
        for name in parameter_names:
            check_choice("parameter_names", name, PARAMETER_NAMES)
        check_positive("steps", steps)
        check_positive("start_epoch", start_epoch, allow_zero=True)
        check_positive("fisher_samples", fisher_samples)
        check_positive("score_batches", score_batches)
        check_positive("locality_penalty", locality_penalty, allow_zero=True)
        if schedule == "one_shot" and steps != 1:
            raise UserInputError(
                f"schedule='one_shot' takes steps=1, got steps={steps}; choose one of {list(SCHEDULES[1:])} for several steps"
            )
        if pruning_norm is not None and not structured:
            raise UserInputError("pruning_norm ranks output channels: set structured=True or leave pruning_norm unset")
        if pruning_norm is not None:
            check_positive("pruning_norm", pruning_norm)
        self.interval = "epoch" if start_step is None and every_n_steps is None and at_steps is None else "step"
        if self.interval == "step":
            if start_epoch != 0 or end_epoch is not None:
                raise UserInputError("start_step/every_n_steps/at_steps schedule in optimizer steps: leave start_epoch and end_epoch unset")
            self.positions = step_global_steps(steps, start_step, every_n_steps, at_steps, fine_tune)
        else:
            self.positions = step_epochs(steps, start_epoch, end_epoch, fine_tune)
        if rewind_to is not None and not 0 <= rewind_to <= self.positions[0]:
            raise UserInputError(f"rewind_to={rewind_to} must be between 0 and the first pruning step's {self.interval}, {self.positions[0]}")
        self.amount = amount
        self.criterion = criterion
        self.schedule = schedule
        self.steps = steps
        self.scope = scope
        self.structured = structured
        self.pruning_norm = pruning_norm
        self.layers = None if layers is None else list(layers)
        self.parameter_names = list(parameter_names)
        self.include_normalization = include_normalization
        self.locality_penalty = locality_penalty
        self.fisher_type = fisher_type
        self.fisher_samples = fisher_samples
        self.task = task
        self.score_batches = score_batches
        self.rewind_to = rewind_to
        self.allow_layer_collapse = allow_layer_collapse
        self.seed = seed
        self.evaluate = evaluate
        self.steps_done = 0
        self.rewind_weights: dict[str, torch.Tensor] | None = None
        self._tensors: list[PrunedTensor] = []
        self._hooks: list = []
        self._evaluation_set: list | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(criterion=self.criterion, amount=self.amount, schedule=self.schedule, steps=self.steps)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "rewind_weights": self.rewind_weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = state_dict["steps_done"]
        self.rewind_weights = state_dict["rewind_weights"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before any checkpoint is loaded: the model's keys must already be those of a pruned model.
        self._tensors = prunable_tensors(pl_module, self.layers, self.parameter_names, self.include_normalization)
        add_masks(self._tensors)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Gradients are masked in on_before_optimizer_step (after Lightning's closure ran the backward).
        self._hooks = [
            handle
            for optimizer in trainer.optimizers
            for handle in keep_pruned_at_zero(optimizer, self._tensors, mask_gradients_before_step=False)
        ]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls step(closure): the step's pre-hook runs before the closure's backward, this after it.
        mask_gradients(self._tensors)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        make_permanent(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interval == "epoch":
            self._advance(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # global_step only changes after the last batch of an accumulation window, so the first batch
        # that sees a step due starts a window: a pruning step never splits one.
        if self.interval == "step":
            self._advance(trainer, pl_module, trainer.global_step)

    def _advance(self, trainer: L.Trainer, pl_module: L.LightningModule, position: int) -> None:
        """Snapshot the rewind weights and run every step due at ``position`` (epoch or global step)."""
        if self.rewind_to == position and self.rewind_weights is None:
            self.rewind_weights = snapshot(self._tensors)
        while self.steps_done < self.steps and self.positions[self.steps_done] <= position:
            self.prune_step(trainer, pl_module, self.steps_done + 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.steps_done and self.evaluate:
            self._log(trainer, self._measure("fine_tuned", trainer, pl_module))

    def prune_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Step ``step`` (1-based): measure, prune (:func:`callbacks.pruning.prune`), measure, rewind, log."""
        target = target_sparsity(self.schedule, self.amount, step, self.steps)
        metrics = {"pruning/step": step, "pruning/target_sparsity": target, **self._measure("before", trainer, pl_module)}
        predicted = prune(
            pl_module,
            self._tensors,
            [] if self.criterion == "MP" else self._evaluation_batches(trainer, pl_module),
            target,
            criterion=self.criterion,
            scope=self.scope,
            structured=self.structured,
            pruning_norm=self.pruning_norm,
            locality_penalty=self.locality_penalty,
            fisher_type=self.fisher_type,
            fisher_samples=self.fisher_samples,
            task=self.task,
            generator=torch.Generator().manual_seed(self.seed + step),
            allow_layer_collapse=self.allow_layer_collapse,
        )
        metrics.update(self._measure("after", trainer, pl_module))
        if self.evaluate:
            metrics["pruning/measured_loss_change"] = metrics["pruning/loss_after"] - metrics["pruning/loss_before"]
        if predicted is not None:
            metrics["pruning/predicted_loss_change"] = predicted
        if self.rewind_weights is not None:
            rewind(self._tensors, self.rewind_weights)
        self.steps_done = step
        self._log_sparsity(trainer, metrics)

    def _evaluation_batches(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list:
        if self._evaluation_set is None:
            loader = trainer.train_dataloader
            # Its own generator: creating the iterator draws a seed, which must not move the global RNG mid-run.
            ordered = DataLoader(
                loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn, generator=torch.Generator()
            )
            self._evaluation_set = list(itertools.islice(ordered, self.score_batches))
        return move_data_to_device(self._evaluation_set, pl_module.device)

    def _measure(self, when: str, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """``pruning/loss_<when>`` (and ``pruning/accuracy_<when>`` for classification) on the evaluation set; nothing without ``evaluate``."""
        if not self.evaluate:
            return {}
        data = self._evaluation_batches(trainer, pl_module)
        metrics = {f"pruning/loss_{when}": mean_loss(pl_module, data, negative_log_likelihood(self.task))}
        if self.task == "classification":
            metrics[f"pruning/accuracy_{when}"] = accuracy(pl_module, data)
        return metrics

    def _log_sparsity(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        overall, per_tensor = sparsity(self._tensors)
        per_layer = {f"pruning/sparsity/{key}": value for key, value in per_tensor.items()}
        self._log(trainer, {**metrics, "pruning/sparsity": overall, **per_layer})
        rows = [[t.key, per_tensor[t.key], int((t.mask() == 0).sum()), t.mask().numel()] for t in self._tensors]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("pruning/layers", columns=["layer", "sparsity", "pruned", "size"], data=rows, step=trainer.global_step)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        # Through the loggers, on the global-step axis: pl_module.log is not allowed in every hook used here.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
