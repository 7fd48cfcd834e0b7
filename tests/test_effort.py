"""The cost-of-effort penalty: the lambda schedules, the penalty the callback adds to the loss
(checked against the task loss + lambda * expected compute recomputed by hand), its per-group
evaluation against a direct computation, compute that grows or stays without the penalty and
falls to the minimum with a large one, and the callback contract."""

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import MemoryLogger
from lightning.pytorch.callbacks import Callback

from callbacks.effort import ComputeRecord, Effort, LambdaSchedule, accuracy_by_steps, summarize
from framework.data import DigitsDataModule
from framework.data.stroop import StroopDigitsDataModule
from framework.errors import UserInputError
from framework.models import MLP
from framework.models.adaptive import EarlyExitCNN, HabitualControlledNet, PonderNet
from framework.tasks import ClassificationTask
from framework.testing import CHECKS, CallbackContract

TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def adam(lr: float) -> functools.partial:
    return functools.partial(torch.optim.Adam, lr=lr)


def test_lambda_schedules():
    assert [LambdaSchedule(0.2)(step) for step in (0, 50, 10**6)] == [0.2, 0.2, 0.2]
    linear = LambdaSchedule(0.2, "linear", warmup_steps=100)
    assert [linear(step) for step in (0, 25, 100, 500)] == pytest.approx([0.0, 0.05, 0.2, 0.2])
    step = LambdaSchedule(0.01, "step", milestones=(10, 20), gamma=10.0)
    assert [step(s) for s in (0, 9, 10, 19, 20, 99)] == pytest.approx([0.01, 0.01, 0.1, 0.1, 1.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": -1.0}, "weight=-1.0"),
        ({"schedule": "cosine"}, "schedule='cosine' is not allowed"),
        ({"schedule": "linear"}, "warmup_steps=0"),
        ({"schedule": "step", "milestones": [20, 10]}, "milestones=\\[20, 10\\]"),
        ({"measure": "seconds"}, "measure='seconds' is not allowed"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        Effort(**kwargs)


def test_a_backbone_without_the_compute_interface_is_refused():
    trainer = L.Trainer(max_steps=1, callbacks=[Effort()], **TRAINER)
    with pytest.raises(UserInputError, match="needs an adaptive backbone.*MLP lacks"):
        trainer.fit(ClassificationTask(MLP(64, 10, hidden=(8,))), datamodule=DigitsDataModule())


def test_summaries_by_hand():
    record = ComputeRecord(
        expected_steps=torch.tensor([1.5, 2.5, 1.0, 3.0]), expected_flops=torch.tensor([10.0, 20.0, 5.0, 30.0]),
        steps=torch.tensor([1, 2, 1, 3]), flops=torch.tensor([8.0, 16.0, 8.0, 24.0]),
        correct=torch.tensor([True, False, True, True]), targets=torch.tensor([0, 0, 1, 1]),
        groups={"congruent": torch.tensor([True, False, False, False]), "incongruent": torch.tensor([False, True, True, True])},
    )  # fmt: skip
    summary = summarize(record)
    assert list(summary) == ["all", "class_0", "class_1", "congruent", "incongruent"]
    assert summary["all"] == pytest.approx({"count": 4, "mean_steps": 2.0, "flops": 16.25, "inference_steps": 1.75, "inference_flops": 14.0, "accuracy": 0.75})
    assert summary["incongruent"]["inference_steps"] == pytest.approx(2.0) and summary["incongruent"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["class_0"]["mean_steps"] == pytest.approx(2.0)
    assert accuracy_by_steps(record) == [(1, 2, 1.0, 8.0), (2, 1, 0.0, 16.0), (3, 1, 1.0, 24.0)]
    round_trip = summarize(ComputeRecord.from_matrix(record.as_matrix(), ["congruent", "incongruent"]))
    assert round_trip.keys() == summary.keys() and all(round_trip[g] == pytest.approx(summary[g]) for g in summary)


class LossProbe(Callback):
    """Recomputes, before each backward, task loss + lambda * mean expected steps by hand."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        inputs, targets = self.batch
        with torch.no_grad():
            backbone = pl_module.backbone
            expected = F.cross_entropy(backbone(inputs), targets) + effort_callback(trainer).current_weight * backbone.expected_compute("steps").mean()
        self.pairs.append((loss.item(), expected.item()))


def effort_callback(trainer: L.Trainer) -> Effort:
    return next(callback for callback in trainer.callbacks if isinstance(callback, Effort))


def test_the_penalty_joins_the_training_loss_and_follows_the_schedule():
    L.seed_everything(0, verbose=False)
    task = ClassificationTask(PonderNet(64, 10, hidden=8, max_steps=3).double(), optimizer=adam(1e-2))
    probe, logger = LossProbe(), MemoryLogger()
    trainer = L.Trainer(max_steps=6, callbacks=[Effort(0.5, schedule="linear", warmup_steps=4), probe], **{**TRAINER, "logger": logger}, log_every_n_steps=1, limit_val_batches=0)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    data.datasets = {split: torch.utils.data.TensorDataset(d.tensors[0].double(), d.tensors[1]) for split, d in data.datasets.items()}
    trainer.fit(task, datamodule=data)
    assert len(probe.pairs) == 6
    for loss, expected in probe.pairs:
        assert loss == pytest.approx(expected, rel=1e-9)
    lambdas = [metrics["effort/lambda"] for _, metrics in logger.records if "effort/lambda" in metrics]
    assert lambdas == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    assert "training_step" not in vars(task)  # unwrapped after fit


def test_evaluation_per_group_matches_a_direct_computation(tmp_path):
    L.seed_everything(0, verbose=False)
    backbone = HabitualControlledNet(3, 8, 10, habitual_hidden=8, controlled_channels=(4, 8))
    with torch.no_grad():
        backbone.gate.bias.fill_(0.2)  # a mix of habitual and controlled inputs
    task, logger = ClassificationTask(backbone, optimizer=adam(1e-3)), MemoryLogger()
    data = StroopDigitsDataModule(batch_size=64, eval_batch_size=50)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[Effort(0.1)], **{**TRAINER, "logger": logger}, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=data)
    logged = {key: value for _, metrics in logger.records for key, value in metrics.items() if key.startswith("effort/val/")}
    x, y = data.datasets["val"].tensors
    backbone.eval()
    with torch.no_grad():
        logits, path = backbone.forward_adaptive(x)
    assert 0 < int((path == 2).sum()) < len(y)
    congruent = data.congruent["val"]
    correct = logits.argmax(dim=1) == y
    for group, members in (("", torch.ones_like(congruent)), ("/congruent", congruent), ("/incongruent", ~congruent), ("/class_3", y == 3)):
        assert logged[f"effort/val/inference_steps{group}"] == pytest.approx(path[members].double().mean().item(), rel=1e-6)
        assert logged[f"effort/val/accuracy{group}"] == pytest.approx(correct[members].double().mean().item(), rel=1e-6)
    flops = backbone.cumulative_flops((3, 8, 8))
    assert logged["effort/val/inference_flops"] == pytest.approx(flops[path - 1].mean().item(), rel=1e-6)


def mean_expected_steps(model: torch.nn.Module, data: DigitsDataModule) -> float:
    model.eval()
    with torch.no_grad():
        model(data.datasets["val"].tensors[0])
    return model.expected_compute("steps").mean().item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory", [functools.partial(PonderNet, 64, 10, hidden=16, max_steps=4), functools.partial(EarlyExitCNN, 1, 10, channels=(8, 16))], ids=["pondernet", "early_exit"]
)
def test_no_penalty_keeps_the_compute_and_a_large_one_drives_it_to_the_minimum(factory):
    data = DigitsDataModule(batch_size=64)
    data.setup()
    final = {}
    for weight in (0.0, 1.0):
        L.seed_everything(0, verbose=False)
        task = ClassificationTask(factory(), optimizer=adam(1e-2))
        initial = mean_expected_steps(task.backbone, data)
        trainer = L.Trainer(max_epochs=3, limit_val_batches=0, callbacks=[Effort(weight, evaluate=False)], **TRAINER)
        trainer.fit(task, datamodule=data)
        final[weight] = mean_expected_steps(task.backbone, data)
    minimum, _ = task.backbone.compute_bounds("steps")
    assert final[0.0] >= initial  # without a cost, these models spend at least what they started with
    assert final[1.0] <= minimum + 0.1 < initial


def tiny_adaptive_task() -> L.LightningModule:
    return ClassificationTask(PonderNet(64, 10, hidden=8, max_steps=3), optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_effort_contract(check, tmp_path):
    factory = functools.partial(Effort, 0.05, schedule="step", milestones=(5, 20), gamma=2.0)
    CallbackContract(factory, task_factory=tiny_adaptive_task, max_epochs=3, resume_epoch=1).check(check, tmp_path)
