"""``LazyVsReal``: the Lightning callback that trains linearised and alpha-scaled twins of a model
alongside it on the same batches and compares how each learns examples grouped by difficulty
(George et al. 2022, "Lazy vs hasty"), built on :mod:`callbacks.linearization.linearized` and
:mod:`callbacks.linearization.difficulty`."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Subset

from callbacks.linearization.difficulty import DifficultyScore, LearningSpeed, group_means, write_scores
from callbacks.linearization.linearized import AlphaScaledModel, LinearizedModel, alpha_scaled_learning_rate
from framework.errors import UserInputError, check_choice, check_positive

REAL = "real"
LINEARIZED = "linearized"
SCORE_SUFFIXES = (".npy", ".pt", ".csv")


def twin_name(alpha: float) -> str:
    """The name of the alpha-scaled twin, e.g. ``alpha_10``."""
    return f"alpha_{alpha:g}"


def make_twins(model: nn.Module, alphas: Sequence[float], linearized: bool) -> dict[str, nn.Module]:
    """Alpha-scaled twins of ``model`` (one per alpha) and, if asked, its linearisation, all around
    the model's current parameters, by name (see :func:`twin_name`)."""
    twins: dict[str, nn.Module] = {twin_name(alpha): AlphaScaledModel(model, alpha) for alpha in alphas}
    if linearized:
        twins[LINEARIZED] = LinearizedModel(model)
    return twins


def learning_rate_scale(name: str) -> float:
    """The factor on the real model's learning rate for a twin: ``1 / alpha^2`` for an
    alpha-scaled twin (George et al.), 1 for the linearised one (the alpha -> infinity limit)."""
    if name == LINEARIZED:
        return 1.0
    return alpha_scaled_learning_rate(1.0, float(name.removeprefix("alpha_")))


def twin_optimizer(real: torch.optim.Optimizer, real_model: nn.Module, twin: nn.Module, lr_scale: float) -> torch.optim.Optimizer:
    """An optimizer of the real one's class, with the same parameter groups and hyperparameters,
    over the twin's copies of ``real_model``'s parameters (``twin.model``), learning rates times
    ``lr_scale``."""
    names = {id(p): name for name, p in real_model.named_parameters()}
    groups = []
    for group in real.param_groups:
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise UserInputError(f"LazyVsReal: the optimizer trains {len(missing)} parameters outside the model's backbone, which the twins cannot copy")
        settings = {key: value for key, value in group.items() if key != "params"}
        groups.append({**settings, "params": [twin.model.get_parameter(names[id(p)]) for p in group["params"]], "lr": group["lr"] * lr_scale})
    return type(real)(groups, **real.defaults)


def follow_hyperparameters(hyperparameters: list[dict[str, Any]], twin: torch.optim.Optimizer, lr_scale: float) -> None:
    """Set the twin's groups to the real optimizer's hyperparameters (one dict per group, as a
    scheduler left them), learning rates times ``lr_scale``."""
    for settings, twin_group in zip(hyperparameters, twin.param_groups):
        twin_group.update(settings)
        twin_group["lr"] = settings["lr"] * lr_scale


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module], inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example correctness (models, examples) bool and cross-entropy (models, examples)
    float32 of each model on ``inputs`` in eval mode; every module's mode is restored after."""
    modes = {module: module.training for model in models.values() for module in model.modules()}
    correct, losses = [], []
    try:
        for model in models.values():
            model.eval()
            logits = torch.cat([model(chunk) for chunk in inputs.split(batch_size)]).float()
            correct.append((logits.argmax(dim=-1) == targets).cpu())
            losses.append(F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing).cpu())
    finally:
        for module, training in modes.items():
            module.training = training
    return torch.stack(correct), torch.stack(losses)


class LazyVsReal(Callback):
    """Trains twins of the model (alpha-scaled ``alpha (f(w) - f(w0))`` for each alpha, and the
    linearisation ``f(w0) + J(w0)(w - w0)``) on the same batches as the model, and logs how
    the model and each twin learn training examples grouped by difficulty.

    The model is the LightningModule's ``backbone`` (a framework :class:`~framework.tasks.Task`),
    the batches ``(inputs, class indices, ...)`` and the loss cross-entropy (with the task's
    ``label_smoothing``). Twins start from the model's weights at the start of training. Each twin
    has an optimizer of the task's optimizer class with the same groups and the hyperparameters
    the real optimizer stepped with (so LR schedules apply), the learning rate times
    ``1/alpha^2`` for alpha-scaled twins (George et al.) and unchanged for the linearised one.
    With alpha = 1 the twin is the model minus its initial output, which changes the loss's
    gradient (the offset differs between classes), so it is not the model itself. A twin
    accumulates gradients over the batches of one real optimizer step
    (loss divided by ``accumulate_grad_batches``), steps when the real optimizer stepped, and is
    clipped like the model (the trainer's ``gradient_clip_val`` and algorithm). Under DDP each
    rank trains its twins on its own batch and the twin gradients are averaged across ranks
    (one all-reduce per twin per step), like DDP does for the model, so twins stay identical on
    all ranks. Twins compute in full precision whatever the trainer's precision.

    On a schedule (every ``every_k`` global steps, at the start of the step, and at the end of
    training) the model and every twin are evaluated, in eval mode, on the tracked examples
    (``num_examples`` training examples chosen with ``example_seed``, all by default; the same on
    every rank): per-example correctness and loss, kept as history. The ``difficulty`` score
    (:mod:`callbacks.linearization.difficulty`) splits the tracked examples into ``num_groups``
    groups, group 0 the easiest; dynamic scores (learning speed, forgetting) are recomputed from
    the history at each evaluation, so their groups move early in training.

    Logged through ``trainer.loggers`` at ``trainer.global_step``: ``lazy/<model>/acc``,
    ``lazy/<model>/loss`` (all tracked examples) and ``lazy/<model>/acc/group_<k>``,
    ``lazy/<model>/loss/group_<k>``, where ``<model>`` is ``real``, ``alpha_<alpha>`` or
    ``linearized``. At the end of training, on rank zero with a :class:`WandbLogger`, the whole
    history grouped by the final scores: a table ``lazy/groups`` (step, model, group, accuracy,
    loss) and a line plot ``lazy/<model>/acc_by_group`` per model. With ``save_scores`` the final
    scores of the training set (NaN for untracked examples) are written there, for a later run's
    :class:`~callbacks.linearization.difficulty.FileScores` (e.g. learning speed of an
    independent run, so that groups do not come from the very run they are compared on).

    Args:
        alphas: scales of the alpha-scaled twins (each > 0; may be empty).
        linearized: also train the linearised twin.
        difficulty: the difficulty score; default :class:`LearningSpeed` of the real model.
        num_groups: number of difficulty groups; default the score's own (deciles, or clean and
            noisy for label noise).
        every_k: evaluation interval in global steps.
        num_examples: number of tracked training examples; ``null`` tracks all of them.
        example_seed: seeds the choice of the tracked examples.
        eval_batch_size: examples per forward pass when evaluating.
        save_scores: ``.npy``, ``.pt`` or ``.csv`` file for the final scores, or ``null``.

    State (checkpointed, so a resumed run continues exactly): the twins (weights and their
    initial point), their optimizers' states, the next evaluation step and the history.
    """

    def __init__(
        self,
        alphas: Sequence[float] = (1.0, 10.0, 100.0),
        linearized: bool = True,
        difficulty: DifficultyScore | None = None,
        num_groups: int | None = None,
        every_k: int = 10,
        num_examples: int | None = None,
        example_seed: int = 0,
        eval_batch_size: int = 512,
        save_scores: str | None = None,
    ) -> None:
        for alpha in alphas:
            check_positive("alphas", alpha)
        names = [twin_name(alpha) for alpha in alphas] + ([LINEARIZED] if linearized else [])
        if len(set(names)) != len(names):
            raise UserInputError(f"alphas={list(alphas)} holds a value twice")
        difficulty = LearningSpeed() if difficulty is None else difficulty
        if not isinstance(difficulty, DifficultyScore):
            raise UserInputError(f"difficulty={difficulty!r} must be a DifficultyScore (LearningSpeed, ForgettingEvents, LabelNoise, FileScores)")
        if difficulty.dynamic:
            check_choice("difficulty.reference", difficulty.reference, [REAL, *names])
        num_groups = difficulty.num_groups if num_groups is None else num_groups
        difficulty.check_num_groups(num_groups)
        check_positive("every_k", every_k)
        if num_examples is not None:
            check_positive("num_examples", num_examples)
        check_positive("eval_batch_size", eval_batch_size)
        if save_scores is not None:
            check_choice("save_scores suffix", Path(save_scores).suffix, SCORE_SUFFIXES)
        self.alphas = [float(alpha) for alpha in alphas]
        self.linearized = linearized
        self.names = [REAL, *names]
        self.difficulty = difficulty
        self.num_groups = num_groups
        self.every_k = every_k
        self.num_examples = num_examples
        self.example_seed = example_seed
        self.eval_batch_size = eval_batch_size
        self.save_scores = save_scores
        self.twins: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.next_step = 0
        self.steps: list[int] = []
        self.correct: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.indices: torch.Tensor | None = None
        self.tracked: tuple[torch.Tensor, torch.Tensor] | None = None
        self.step_at_batch_start = 0
        self.hyperparameters: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alphas=self.alphas, linearized=self.linearized, difficulty=type(self.difficulty).__name__)

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return self._pending
        return {
            "twins": {name: twin.state_dict() for name, twin in self.twins.items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            "next_step": self.next_step,
            "steps": list(self.steps),
            "correct": list(self.correct),
            "losses": list(self.losses),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The twins and their optimizers are built at train start; their state is loaded then.
        self._pending = state_dict
        self.next_step = state_dict["next_step"]
        self.steps = list(state_dict["steps"])
        self.correct = list(state_dict["correct"])
        self.losses = list(state_dict["losses"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            if not isinstance(getattr(pl_module, "backbone", None), nn.Module):
                raise UserInputError("LazyVsReal needs a framework Task (a LightningModule with a `backbone` module)")
            self.difficulty.prepare(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise UserInputError(f"LazyVsReal needs a task with exactly one optimizer, not {len(trainer.optimizers)}")
        backbone = pl_module.backbone
        real_optimizer = trainer.optimizers[0]
        self.twins = {name: twin.to(pl_module.device) for name, twin in make_twins(backbone, self.alphas, self.linearized).items()}
        self.optimizers = {
            name: twin_optimizer(real_optimizer, backbone, twin, learning_rate_scale(name)) for name, twin in self.twins.items()
        }
        if self._pending is not None:
            for name, twin in self.twins.items():
                twin.load_state_dict(self._pending["twins"][name])
                self.optimizers[name].load_state_dict(self._pending["optimizers"][name])
            self._pending = None
        self._track(trainer, pl_module)

    def _track(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Choose and load the tracked examples (inputs and labels, on the model's device)."""
        loader = trainer.train_dataloader
        dataset = loader.dataset
        count = len(dataset) if self.num_examples is None else self.num_examples
        if count > len(dataset):
            raise UserInputError(f"num_examples={count} exceeds the {len(dataset)} training examples")
        if self.num_groups > count:
            raise UserInputError(f"num_groups={self.num_groups} exceeds the {count} tracked examples")
        generator = torch.Generator().manual_seed(self.example_seed)
        self.indices = torch.randperm(len(dataset), generator=generator)[:count].sort().values
        chosen = DataLoader(Subset(dataset, self.indices.tolist()), batch_size=self.eval_batch_size, collate_fn=loader.collate_fn)
        batches = [batch[:2] for batch in chosen]
        inputs, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        if targets.ndim != 1:
            raise UserInputError(f"LazyVsReal needs batches (inputs, class indices); the labels have shape {tuple(targets.shape[1:])} per example")
        self.tracked = move_data_to_device((inputs, targets), pl_module.device)
        self.difficulty.setup(dataset)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.step_at_batch_start = trainer.global_step
        # What the real optimizer steps with, should it step on this batch (schedulers move after).
        self.hyperparameters = [{key: value for key, value in group.items() if key != "params"} for group in trainer.optimizers[0].param_groups]
        if trainer.global_step >= self.next_step:
            self._evaluate_and_log(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch[0], batch[1]
        smoothing = getattr(pl_module, "label_smoothing", 0.0)
        with torch.enable_grad():
            for twin in self.twins.values():
                twin.train(pl_module.training)
                dtype = next(twin.parameters()).dtype
                logits = twin(inputs.to(dtype) if inputs.is_floating_point() else inputs)
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing) / trainer.accumulate_grad_batches
                loss.backward()
        if trainer.global_step > self.step_at_batch_start:  # the real optimizer stepped
            for name, twin in self.twins.items():
                self._step(trainer, name, twin)

    def _step(self, trainer: L.Trainer, name: str, twin: nn.Module) -> None:
        """Average the twin's gradients across ranks, clip them like the model's, and step."""
        parameters = [p for p in twin.model.parameters() if p.grad is not None]
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(torch.cat([p.grad.reshape(-1) for p in parameters]), reduce_op="mean")
            for parameter, grad in zip(parameters, flat.split([p.numel() for p in parameters])):
                parameter.grad.copy_(grad.view_as(parameter))
        if trainer.gradient_clip_val:
            if trainer.gradient_clip_algorithm == "value":
                nn.utils.clip_grad_value_(parameters, trainer.gradient_clip_val)
            else:
                nn.utils.clip_grad_norm_(parameters, trainer.gradient_clip_val)
        optimizer = self.optimizers[name]
        follow_hyperparameters(self.hyperparameters, optimizer, learning_rate_scale(name))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.steps or self.steps[-1] != trainer.global_step:
            self._evaluate_and_log(trainer, pl_module)
        if trainer.is_global_zero:
            self._log_history(trainer)
            if self.save_scores is not None:
                scores = torch.full((len(trainer.train_dataloader.dataset),), torch.nan, dtype=torch.float64)
                scores[self.indices] = self.scores()
                write_scores(self.save_scores, scores)

    def _evaluate_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        models = {REAL: pl_module.backbone, **self.twins}
        inputs, targets = self.tracked
        correct, losses = evaluate(models, inputs, targets, self.eval_batch_size, getattr(pl_module, "label_smoothing", 0.0))
        self.steps.append(step)
        self.correct.append(correct)
        self.losses.append(losses)
        self.next_step = (step // self.every_k + 1) * self.every_k
        groups = self.groups()
        group_accuracy = group_means(correct.double(), groups, self.num_groups)
        group_loss = group_means(losses, groups, self.num_groups)
        metrics: dict[str, float] = {}
        for m, name in enumerate(self.names):
            metrics[f"lazy/{name}/acc"] = correct[m].double().mean().item()
            metrics[f"lazy/{name}/loss"] = losses[m].double().mean().item()
            for g in range(self.num_groups):
                metrics[f"lazy/{name}/acc/group_{g}"] = group_accuracy[m, g].item()
                metrics[f"lazy/{name}/loss/group_{g}"] = group_loss[m, g].item()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def scores(self) -> torch.Tensor:
        """The difficulty scores of the tracked examples now (higher is harder)."""
        reference = self.names.index(self.difficulty.reference)
        history = torch.stack([correct[reference] for correct in self.correct]) if self.correct else torch.zeros(0, len(self.indices), dtype=torch.bool)
        return self.difficulty.scores(self.indices, history)

    def groups(self) -> torch.Tensor:
        """The difficulty group (0 easiest) of each tracked example now."""
        return self.difficulty.groups(self.scores(), self.num_groups)

    def group_curves(self) -> dict[str, torch.Tensor]:
        """The whole history grouped by the current scores: ``steps`` (T,), ``accuracy`` and
        ``loss`` (T, models, groups) with models in the order of ``names``, and ``groups`` (examples,)."""
        groups = self.groups()
        return {
            "steps": torch.tensor(self.steps),
            "accuracy": group_means(torch.stack(self.correct).double(), groups, self.num_groups),
            "loss": group_means(torch.stack(self.losses), groups, self.num_groups),
            "groups": groups,
        }

    def _log_history(self, trainer: L.Trainer) -> None:
        """The W&B table and per-model line plots of accuracy by group over training."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers or not self.steps:
            return
        import wandb

        curves = self.group_curves()
        steps = curves["steps"].tolist()
        rows = [
            [step, name, g, curves["accuracy"][t, m, g].item(), curves["loss"][t, m, g].item()]
            for t, step in enumerate(steps)
            for m, name in enumerate(self.names)
            for g in range(self.num_groups)
        ]
        payload: dict[str, Any] = {"lazy/groups": wandb.Table(columns=["step", "model", "group", "accuracy", "loss"], data=rows)}
        for m, name in enumerate(self.names):
            payload[f"lazy/{name}/acc_by_group"] = wandb.plot.line_series(
                xs=steps,
                ys=[curves["accuracy"][:, m, g].tolist() for g in range(self.num_groups)],
                keys=[f"group_{g}" for g in range(self.num_groups)],
                title=f"{name}: accuracy by difficulty group (0 easiest)",
                xname="trainer/global_step",
            )
        for logger in loggers:
            logger.experiment.log({**payload, "trainer/global_step": trainer.global_step})
