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
    make_permanent,
    prunable_tensors,
    reparametrize,
    rewind,
    snapshot,
    sparsity,
)
from callbacks.pruning.schedules import SCHEDULES, step_epochs, target_sparsity
from callbacks.pruning.scores import CRITERIA, accuracy, mean_loss, negative_log_likelihood
from callbacks.pruning.step import prune
from framework.errors import UserInputError, check_choice, check_positive


class Pruning(Callback):
    """Prunes Linear and Conv2d weights at the start of scheduled epochs, with fine-tuning in between.

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
        fine_tune: False puts all steps at ``start_epoch``, back to back (scores recomputed each step).
        scope: ``global`` (one ranking over all tensors) or ``layer`` (each tensor reaches the target).
        structured: prune whole output channels (neurons) instead of single weights.
        pruning_norm: with ``structured``, rank channels by this L_n norm of their weights; None
            ranks them by their summed criterion score.
        layers: names of the modules to prune, relative to the LightningModule (e.g.
            ``backbone.fc``); default every Linear and Conv2d. Checked in ``setup``.
        parameter_names: which parameters of those modules to prune (``weight``, ``bias``).
        locality_penalty: lambda of the penalty ``lambda/2 w^2`` added to every score.
        fisher_type: Fisher of ``QM``/``OBD`` (``exact``, ``mc``, ``empirical``).
        fisher_samples: targets drawn per example for ``mc``.
        task: the loss of the scores: ``classification`` (cross-entropy) or ``regression``.
        score_batches: size of the evaluation set in training batches.
        rewind_to: epoch (<= ``start_epoch``) whose starting weights the survivors are reset to
            after every step (lottery ticket; 0 is the initialisation); None does not rewind.
        allow_layer_collapse: allow a step to prune every unit of a tensor (refused by default).
        seed: seeds the MC Fisher's target sampling (step k uses ``seed + k``).

    Masks live in the model (``weight_orig``/``weight_mask``, reparametrized in ``setup`` so that
    checkpoints always have these keys and load before any step); the callback's state is the
    number of steps done and the rewind weights. At ``teardown`` the masks are folded into plain
    weights, so the model handed back is an ordinary module.
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
        scope: str = "global",
        structured: bool = False,
        pruning_norm: float | None = None,
        layers: Sequence[str] | None = None,
        parameter_names: Sequence[str] = ("weight",),
        locality_penalty: float = 0.0,
        fisher_type: str = "exact",
        fisher_samples: int = 1,
        task: str = "classification",
        score_batches: int = 8,
        rewind_to: int | None = None,
        allow_layer_collapse: bool = False,
        seed: int = 0,
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
        if rewind_to is not None and not 0 <= rewind_to <= start_epoch:
            raise UserInputError(f"rewind_to={rewind_to} must be an epoch between 0 and start_epoch={start_epoch}")
        self.amount = amount
        self.criterion = criterion
        self.schedule = schedule
        self.steps = steps
        self.epochs = step_epochs(steps, start_epoch, end_epoch, fine_tune)
        self.scope = scope
        self.structured = structured
        self.pruning_norm = pruning_norm
        self.layers = None if layers is None else list(layers)
        self.parameter_names = list(parameter_names)
        self.locality_penalty = locality_penalty
        self.fisher_type = fisher_type
        self.fisher_samples = fisher_samples
        self.task = task
        self.score_batches = score_batches
        self.rewind_to = rewind_to
        self.allow_layer_collapse = allow_layer_collapse
        self.seed = seed
        self.steps_done = 0
        self.rewind_weights: dict[str, torch.Tensor] | None = None
        self._tensors: list[PrunedTensor] = []
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
        self._tensors = prunable_tensors(pl_module, self.layers, self.parameter_names)
        reparametrize(self._tensors)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        make_permanent(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.rewind_to == epoch and self.rewind_weights is None:
            self.rewind_weights = snapshot(self._tensors)
        while self.steps_done < self.steps and self.epochs[self.steps_done] <= epoch:
            self.prune_step(trainer, pl_module, self.steps_done + 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.steps_done:
            self._log(trainer, self._measure("fine_tuned", trainer, pl_module))

    def prune_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Step ``step`` (1-based): measure, prune (:func:`callbacks.pruning.prune`), measure, rewind, log."""
        target = target_sparsity(self.schedule, self.amount, step, self.steps)
        metrics = {"pruning/step": step, "pruning/target_sparsity": target, **self._measure("before", trainer, pl_module)}
        predicted = prune(
            pl_module,
            self._tensors,
            self._evaluation_batches(trainer, pl_module),
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
            ordered = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn)
            self._evaluation_set = list(itertools.islice(ordered, self.score_batches))
        return move_data_to_device(self._evaluation_set, pl_module.device)

    def _measure(self, when: str, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """``pruning/loss_<when>`` (and ``pruning/accuracy_<when>`` for classification) on the evaluation set."""
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
