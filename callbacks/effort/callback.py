"""``Effort``: the cost-of-effort penalty, ``lambda * expected compute`` added to the task's
training loss, with its schedule and its W&B logging."""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from callbacks.effort.core import ComputeRecord, LambdaSchedule, accuracy_by_steps, as_mapping, check_adaptive, effort_penalty, summarize
from framework.errors import check_choice
from framework.models.adaptive import MEASURES, ComputeMeasure


def gather_rows(pl_module: L.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` (n_r, k), concatenated in rank order, on every rank (the same
    collectives on each; ranks may hold different counts)."""
    if pl_module.trainer.world_size == 1:
        return rows
    counts = pl_module.all_gather(torch.tensor(len(rows), device=pl_module.device)).flatten()
    padded = F.pad(rows.to(pl_module.device), (0, 0, 0, int(counts.max()) - len(rows)))
    gathered = pl_module.all_gather(padded)
    return torch.cat([gathered[rank, : int(count)] for rank, count in enumerate(counts)]).cpu()


class Effort(Callback):
    """Makes effort costly: the training loss becomes ``task loss + lambda * mean expected
    compute`` of the backbone's last forward (:func:`effort_penalty`), ``measure`` ``steps``
    (PonderNet's and the early exit's expected steps, ACT's ponder cost N + R, 1 + the gate
    probability of the habitual/controlled network) or ``flops`` (expected FLOPs of the path).
    The backbone must implement the compute interface of
    :class:`framework.models.adaptive.AdaptiveComputation`.

    lambda follows :class:`LambdaSchedule` on the optimizer step (``trainer.global_step``), so
    a resumed run continues the schedule. Logs every training step ``effort/lambda``,
    ``effort/penalty``, ``effort/mean_steps`` and ``effort/flops``; after every validation and
    test epoch, on all ranks' examples, ``effort/<split>/...`` per group (``all``, each class,
    and the data module's ``example_groups(inputs, targets)``, e.g. Stroop's congruent and
    incongruent): the expected compute and the compute and accuracy of the adaptive inference
    (``forward_adaptive``, run on each evaluation batch); to W&B also histograms of the
    compute per input (all and per group) and tables with plots of accuracy against compute
    (per group, and per number of steps taken).

    The penalty joins the loss by wrapping the task's ``training_step`` during fit (as
    :class:`callbacks.distillation.Distillation` does; list it after Distillation to use both).

    Args:
        weight: lambda (its final value for ``linear``, its start for ``step``), >= 0.
        measure: ``steps`` or ``flops``.
        schedule: ``constant``, ``linear`` (warm-up over ``warmup_steps``) or ``step``
            (times ``gamma`` at each of ``milestones``).
        warmup_steps, milestones, gamma: see ``schedule``.
        evaluate: record compute on validation and test batches (an extra adaptive inference
            pass per batch).
    """

    def __init__(
        self,
        weight: float = 0.01,
        measure: Literal["steps", "flops"] = "steps",
        schedule: Literal["constant", "linear", "step"] = "constant",
        warmup_steps: int = 0,
        milestones: Sequence[int] = (),
        gamma: float = 10.0,
        evaluate: bool = True,
    ) -> None:
        check_choice("measure", measure, MEASURES)
        self.schedule = LambdaSchedule(weight, schedule, warmup_steps, tuple(milestones), gamma)
        self.measure: ComputeMeasure = measure
        self.evaluate = evaluate
        self.current_weight = self.schedule(0)
        self._records: list[ComputeRecord] = []

    def state_dict(self) -> dict[str, Any]:
        return {"current_weight": self.current_weight}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_weight = state_dict["current_weight"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_adaptive(pl_module.backbone)
        pl_module.training_step = functools.partial(self._penalised_step, pl_module, pl_module.training_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        vars(pl_module).pop("training_step", None)  # back to the class's own training_step

    def _penalised_step(self, pl_module: L.LightningModule, training_step: Callable, batch: Any, batch_idx: int) -> Any:
        output = training_step(batch, batch_idx)
        backbone = pl_module.backbone
        self.current_weight = self.schedule(pl_module.trainer.global_step)
        penalty = effort_penalty(backbone, self.measure)
        with torch.no_grad():
            mean_steps, flops = (backbone.expected_compute(measure).mean() for measure in MEASURES)
        for name, value in (("lambda", self.current_weight), ("penalty", penalty.detach()), ("mean_steps", mean_steps), ("flops", flops)):
            pl_module.log(f"effort/{name}", value, on_step=True, on_epoch=False)
        loss = output["loss"] if isinstance(output, Mapping) else output
        total = loss + self.current_weight * penalty
        return {**output, "loss": total} if isinstance(output, Mapping) else total

    # --- evaluation: compute per input and per group ---------------------------------------

    def _record_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        if not self.evaluate or trainer.sanity_checking:
            return
        inputs, targets = batch[0], batch[1]
        backbone = pl_module.backbone
        expected_steps, expected_flops = (backbone.expected_compute(measure).detach() for measure in MEASURES)
        logits, steps = backbone.forward_adaptive(inputs)
        example_groups = getattr(trainer.datamodule, "example_groups", None) if trainer.datamodule is not None else None
        groups = as_mapping(example_groups(inputs, targets) if example_groups else None, len(targets))
        self._records.append(
            ComputeRecord(
                expected_steps, expected_flops, steps, backbone.compute_of_steps(steps, "flops", inputs.shape[1:]),
                logits.argmax(dim=-1) == targets, targets, groups,
            )  # fmt: skip
        )

    def _log_split(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        if not self.evaluate or trainer.sanity_checking:
            return
        local, self._records = self._records, []
        group_names = list(local[0].groups) if local else []
        rows = ComputeRecord.concatenate(local).as_matrix() if local else torch.zeros(0, 6 + len(group_names), dtype=torch.float64)
        record = ComputeRecord.from_matrix(gather_rows(pl_module, rows), group_names)
        if len(record.targets) == 0:
            return
        summary = summarize(record)
        for group, values in summary.items():
            suffix = "" if group == "all" else f"/{group}"
            for key, value in values.items():
                if key != "count":
                    pl_module.log(f"effort/{split}/{key}{suffix}", value, on_step=False, on_epoch=True)
        self._log_wandb(trainer, split, record, summary)

    def _log_wandb(self, trainer: L.Trainer, split: str, record: ComputeRecord, summary: dict[str, dict[str, float]]) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        import wandb

        payload: dict[str, Any] = {"trainer/global_step": trainer.global_step}
        for group, members in record.all_groups().items():
            if members.any():
                suffix = "" if group == "all" else f"/{group}"
                payload[f"effort/{split}/steps_hist{suffix}"] = wandb.Histogram(record.expected_steps[members].numpy())
                payload[f"effort/{split}/inference_steps_hist{suffix}"] = wandb.Histogram(record.steps[members].numpy())
        columns = ["group", "count", "mean_steps", "flops", "inference_steps", "inference_flops", "accuracy"]
        groups = wandb.Table(columns=columns, data=[[group, *values.values()] for group, values in summary.items()])
        payload[f"effort/{split}/groups"] = groups
        payload[f"effort/{split}/accuracy_vs_compute_by_group"] = wandb.plot.scatter(groups, "inference_flops", "accuracy", title=f"{split}: accuracy against compute per group")
        by_steps = wandb.Table(columns=["steps", "count", "accuracy", "flops"], data=[list(row) for row in accuracy_by_steps(record)])
        payload[f"effort/{split}/accuracy_by_steps"] = by_steps
        payload[f"effort/{split}/accuracy_vs_compute"] = wandb.plot.line(by_steps, "flops", "accuracy", title=f"{split}: accuracy against the compute spent")
        for logger in loggers:
            logger.experiment.log(payload)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record_batch(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_split(trainer, pl_module, "val")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record_batch(trainer, pl_module, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_split(trainer, pl_module, "test")
