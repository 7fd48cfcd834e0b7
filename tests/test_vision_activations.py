"""ActivationNorms and its core: the RMS of activations and of the loss gradient at chosen
modules, against a direct computation, logged on schedule, and the callback contract."""

import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import MemoryLogger
from torch import nn

from callbacks.activations import ActivationNorms, SignalCapture, default_modules, signal_norms
from framework.data import DigitsDataModule
from framework.errors import UserInputError
from framework.models import MLP, SmallCNN, WideResNet
from framework.tasks import ClassificationTask
from framework.testing import CHECKS, CallbackContract


def test_default_modules_are_the_groups_or_the_parametrised_leaves():
    assert default_modules(WideResNet(10, 1, in_channels=1)) == ["groups.0", "groups.1", "groups.2"]
    assert default_modules(MLP(64, 10, hidden=(32,))) == [name for name, m in MLP(64, 10, hidden=(32,)).named_modules() if isinstance(m, nn.Linear)]


def test_signal_norms_equal_a_direct_computation_and_leave_grads_alone():
    torch.manual_seed(0)
    model = WideResNet(10, 1, in_channels=1).double()
    inputs, targets = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 5])
    loss_fn = partial(F.cross_entropy, target=targets)
    forward, backward = signal_norms(model, inputs, loss_fn)

    outputs, x = [], model.stem(inputs)
    for group in model.groups:
        x = group(x)
        outputs.append(x)
    loss = loss_fn(model.classifier(F.relu(model.bn(x)).mean(dim=(2, 3))))
    gradients = torch.autograd.grad(loss, outputs)
    for g, (output, gradient) in enumerate(zip(outputs, gradients)):
        assert forward[f"groups.{g}"] == pytest.approx(output.square().mean().sqrt().item(), rel=1e-6)
        assert backward[f"groups.{g}"] == pytest.approx(gradient.square().mean().sqrt().item(), rel=1e-6)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(UserInputError, match=r"\['groups.9'\] are not modules of WideResNet"):
        SignalCapture(model, ["groups.9"])


class KeepFirstBatch(L.Callback):
    """Keeps the first training batch and the backbone before the first update."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.batch, self.backbone = batch, copy.deepcopy(pl_module.backbone)


def test_callback_logs_the_training_step_at_initialisation_then_every_n_steps():
    torch.manual_seed(0)
    logger, first = MemoryLogger(), KeepFirstBatch()
    task = ClassificationTask(SmallCNN(1, 10, channels=(4, 8)))
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=7, limit_val_batches=0, logger=logger, callbacks=[first, ActivationNorms(every_n_steps=3)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    records = {step: metrics for step, metrics in logger.records if any(k.startswith("activations/") for k in metrics)}
    assert sorted(records) == [0, 3, 6]
    modules = default_modules(task.backbone)
    assert set(records[0]) == {f"activations/{kind}/{m}" for kind in ("norm", "grad_norm") for m in modules}
    inputs, targets = first.batch
    forward, backward = signal_norms(first.backbone, inputs, partial(F.cross_entropy, target=targets))
    for module in modules:  # step 0: the real training step, train mode, the task's loss
        assert records[0][f"activations/norm/{module}"] == pytest.approx(forward[module], rel=1e-5)
        assert records[0][f"activations/grad_norm/{module}"] == pytest.approx(backward[module], rel=1e-5)
    assert records[6] != records[0]


def test_bad_settings_are_refused():
    with pytest.raises(UserInputError, match="every_n_steps=-1"):
        ActivationNorms(every_n_steps=-1)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, callbacks=[ActivationNorms(["nowhere"])], enable_progress_bar=False)
    with pytest.raises(UserInputError, match="nowhere"):
        trainer.fit(ClassificationTask(MLP(64, 10, hidden=(8,))), datamodule=DigitsDataModule())


def activation_norms_for_contract() -> ActivationNorms:
    return ActivationNorms(every_n_steps=5)


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_callback_contract(check, tmp_path):
    # No W&B run: the callback logs through trainer.loggers like any metric.
    CallbackContract(activation_norms_for_contract, max_epochs=2, resume_epoch=1, wandb=False).check(check, tmp_path)
