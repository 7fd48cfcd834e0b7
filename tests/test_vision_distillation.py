"""Knowledge distillation and attention transfer: the losses against their definitions, the
callback's loss and logging, a frozen eval-mode teacher, and the callback contract."""

import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from callbacks.distillation import Distillation, at_loss, attention_map, kd_loss
from framework.data import DigitsDataModule
from framework.errors import DataFileError, UserInputError
from framework.models import SmallCNN, WideResNet
from framework.tasks import ClassificationTask
from framework.testing import CHECKS, CallbackContract

LAYERS = ("features.2", "features.5")  # after each conv-relu-pool stage of SmallCNN


def small_teacher() -> SmallCNN:
    return SmallCNN(1, 10, channels=(8, 16))


def small_student_task() -> ClassificationTask:
    return ClassificationTask(SmallCNN(1, 10, channels=(4, 8)), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def test_kd_loss_is_t_squared_times_the_kl_of_softened_distributions():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 10), torch.randn(5, 10) * 3
    p_teacher = (teacher / 4).softmax(1)
    expected = 16 * (p_teacher * (p_teacher.log() - (student / 4).log_softmax(1))).sum(1).mean()
    torch.testing.assert_close(kd_loss(student, teacher, temperature=4.0), expected)
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_maps_and_at_loss():
    torch.manual_seed(0)
    activation = torch.randn(3, 6, 4, 5)
    maps = attention_map(activation)
    expected = activation.square().mean(1).flatten(1)
    torch.testing.assert_close(maps, expected / expected.norm(dim=1, keepdim=True))
    assert at_loss(activation, activation).item() == 0.0  # student equal to teacher
    # Channel counts may differ; a map does not depend on the activation's scale.
    assert at_loss(torch.cat([activation, activation], 1) * 7, activation).item() == pytest.approx(0.0, abs=1e-12)
    other = torch.randn(3, 2, 4, 5)
    torch.testing.assert_close(at_loss(activation, other), (maps - attention_map(other)).square().mean())
    with pytest.raises(UserInputError, match="same size"):
        at_loss(activation, torch.randn(3, 6, 2, 2))


def fit(callback: Distillation, task: ClassificationTask, batches: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=batches, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    return trainer


def test_teacher_stays_frozen_in_eval_mode_and_outside_the_task():
    torch.manual_seed(0)
    teacher = small_teacher()
    before = copy.deepcopy(teacher.state_dict())
    seen_modes = []
    teacher.register_forward_hook(lambda module, inputs, output: seen_modes.append(module.training))
    task = small_student_task()
    trainer = fit(Distillation(teacher, layers=LAYERS), task)
    assert seen_modes and not any(seen_modes)  # every teacher forward ran in eval mode
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p is q for p in task.parameters() for q in teacher.parameters())
    assert "training_step" not in vars(task)  # the class's training_step is back after fit
    logged = trainer.callback_metrics
    assert {"distill/kd_loss", "distill/at_loss/features.2", "distill/at_loss/features.5"} <= set(logged)


def test_the_training_loss_combines_task_loss_kd_and_at(monkeypatch):
    torch.manual_seed(0)
    teacher, task = small_teacher(), small_student_task()
    callback = Distillation(teacher, layers=LAYERS, temperature=4.0, alpha=0.9, beta=1e3)
    batch = digits_batch()
    monkeypatch.setattr(task, "log", lambda *args, **kwargs: None)  # no trainer loop to log into
    callback.on_fit_start(None, task)
    total = task.training_step(batch, 1)
    vars(task).pop("training_step")
    inputs, targets = batch
    student = task.backbone
    expected = 0.1 * F.cross_entropy(student(inputs), targets) + 0.9 * kd_loss(student(inputs), teacher(inputs))
    for layer in LAYERS:
        expected = expected + 500 * at_loss(student.features[: int(layer[-1]) + 1](inputs), teacher.features[: int(layer[-1]) + 1](inputs))
    torch.testing.assert_close(total, expected)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())  # no gradient reaches the teacher


def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule(batch_size=16)
    data.setup()
    return next(iter(data.train_dataloader()))


def test_teacher_loads_from_a_task_checkpoint_and_bad_settings_are_refused(tmp_path):
    torch.manual_seed(0)
    trained = ClassificationTask(WideResNet(10, 1, in_channels=1))
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": trained.state_dict()}, path)
    teacher = WideResNet(10, 1, in_channels=1)
    Distillation(teacher, teacher_checkpoint=str(path))
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), trained.backbone.state_dict().values()))
    with pytest.raises(DataFileError, match="nowhere.ckpt"):
        Distillation(teacher, teacher_checkpoint=str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(UserInputError, match="alpha=1.5"):
        Distillation(teacher, alpha=1.5)
    with pytest.raises(UserInputError, match=r"\['groups.7'\] are not modules of the student"):
        fit(Distillation(small_teacher(), layers=["groups.7"]), small_student_task(), batches=1)


def test_kd_and_at_each_pull_the_student_towards_the_teacher():
    torch.manual_seed(0)
    teacher = small_teacher()
    inputs = digits_batch()[0]
    runs = {
        "alone": [],
        "kd": [Distillation(teacher, alpha=1.0)],
        # beta below the paper's 1e3: maps of 4x4 and 2x2 on 8x8 digits make AT large, and
        # beta = 1e3 diverges at this learning rate.
        "at": [Distillation(teacher, layers=LAYERS, alpha=0.0, beta=30.0)],
    }
    kd_gap, at_gap = {}, {}
    for name, callbacks in runs.items():
        torch.manual_seed(1)
        task = small_student_task()
        trainer = L.Trainer(
            max_epochs=1, limit_train_batches=10, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        )
        trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
        with torch.no_grad():
            kd_gap[name] = kd_loss(task.backbone(inputs), teacher(inputs)).item()
            at_gap[name] = at_loss(task.backbone.features[:3](inputs), teacher.features[:3](inputs)).item()
    assert kd_gap["kd"] < 0.6 * kd_gap["alone"], kd_gap  # measured 0.035 vs 0.067
    assert at_gap["at"] < 0.5 * at_gap["alone"], at_gap  # measured 0.0045 vs 0.023


def distillation_for_contract() -> Distillation:
    return Distillation(small_teacher(), layers=LAYERS)


def digits_in_large_batches() -> DigitsDataModule:
    return DigitsDataModule(batch_size=128)


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_callback_contract(check, tmp_path):
    # No W&B run: the callback logs only through LightningModule.log, which needs no logger.
    contract = CallbackContract(
        distillation_for_contract, task_factory=small_student_task, datamodule_factory=digits_in_large_batches,
        max_epochs=2, resume_epoch=1, wandb=False,
    )
    contract.check(check, tmp_path)
