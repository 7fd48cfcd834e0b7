"""Tasks: losses and metrics, optimizer construction from config, checkpointed RNG states."""

import random
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework.data import CopyTaskDataModule, DigitsDataModule
from framework.errors import UserInputError
from framework.models import MLP, WideResNet
from framework.tasks import ClassificationTask, SequenceTask
from framework.tasks.base import CHECKPOINT_KEY, collect_rng_states, restore_rng_states


class PerStepLinear(nn.Module):
    """A sequence backbone for tests: the same Linear map at every step."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs)


def test_no_weight_decay_patterns_make_a_separate_group():
    task = ClassificationTask(
        WideResNet(10, 1, in_channels=1),
        optimizer=partial(torch.optim.SGD, lr=0.1, weight_decay=5e-4),
        no_weight_decay=["*bn*", "*.bias"],
    )
    optimizer = task.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in task.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all("bn" in names[id(p)] or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert all(not ("bn" in names[id(p)] or names[id(p)].endswith(".bias")) for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.parameters()))


def test_default_optimizer_and_plateau_scheduler_monitor():
    task = ClassificationTask(MLP(), lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=2))
    config = task.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].defaults["lr"] == 0.1
    assert config["lr_scheduler"]["monitor"] == "val/loss"
    with pytest.raises(UserInputError, match="lr_scheduler_interval='batch'"):
        ClassificationTask(MLP(), lr_scheduler_interval="batch")


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    states = collect_rng_states()
    torch.save(states, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_classification_fit_logs_per_split_metrics_and_checkpoints_extras(tmp_path):
    L.seed_everything(0)
    task = ClassificationTask(MLP(64, 10, hidden=(32,)), optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp_path)
    data = DigitsDataModule(batch_size=128)
    trainer.fit(task, datamodule=data)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.logged_metrics)
    (result,) = trainer.test(task, datamodule=data, verbose=False)
    assert result["test/acc"] > 0.8
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    checkpoint = torch.load(tmp_path / "task.ckpt", weights_only=True)
    assert set(checkpoint[CHECKPOINT_KEY]) == {"rng_states", "wandb_run_id"}
    assert checkpoint["hyper_parameters"]["num_classes"] == 10


def test_sequence_task_masks_the_loss():
    task = SequenceTask(PerStepLinear(3, 4))
    inputs, targets = torch.randn(2, 5, 3), torch.randint(0, 4, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, -1] = True
    task.log = lambda *args, **kwargs: None
    loss = task.shared_step((inputs, targets, mask), "train")
    torch.testing.assert_close(loss, F.cross_entropy(task(inputs)[:, -1], targets[:, -1]))
    regression = SequenceTask(PerStepLinear(3, 1), loss="mse")
    regression.log = task.log
    real_targets = torch.randn(2, 5)
    loss = regression.shared_step((inputs, real_targets, mask), "train")
    torch.testing.assert_close(loss, F.mse_loss(regression(inputs)[:, -1, 0], real_targets[:, -1]))


def test_sequence_task_trains_on_the_copy_task_but_no_memoryless_model_beats_the_baseline():
    L.seed_everything(0)
    data = CopyTaskDataModule(delay=5, train_size=512, val_size=64, test_size=64, batch_size=64)
    task = SequenceTask(PerStepLinear(10, 10), optimizer=partial(torch.optim.Adam, lr=0.05))
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(task, datamodule=data)
    # A per-step map learns (well below the uniform guess ln 10) but, having no memory, cannot
    # beat the memoryless baseline 10 ln 8 / (delay + 20).
    assert trainer.callback_metrics["val/loss"] < 0.75 * np.log(10)
    assert trainer.callback_metrics["val/loss"] > data.baseline_loss


class PenalisedBackbone(PerStepLinear):
    """A backbone with its own penalty, like nnRNN's alpha penalty and decay on T."""

    def regularization(self) -> torch.Tensor:
        return self.linear.weight.square().sum()


def test_training_loss_includes_the_backbones_regularization():
    task = SequenceTask(PenalisedBackbone(3, 4))
    task.log = lambda *args, **kwargs: None
    inputs, targets = torch.randn(2, 5, 3), torch.randint(0, 4, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss = task.training_step((inputs, targets, mask), 0)
    expected = F.cross_entropy(task(inputs).reshape(10, 4), targets.reshape(10)) + task.backbone.linear.weight.square().sum()
    torch.testing.assert_close(loss, expected)
