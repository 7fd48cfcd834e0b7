"""The EKFAC/KFAC optimiser: SGD under identity curvature, the functional core's damped solves,
refusals, eigendecomposition failures, a plain training loop, and the callback contract."""

import csv
from collections import OrderedDict
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from callbacks.curvature import CurvatureError, EKFACStatistics, FisherStatistics, PVector, fisher
from callbacks.curvature.builder import CapturedBatch
from callbacks.curvature.optimizer import EKFAC
from framework.data import DigitsDataModule
from framework.errors import UserInputError
from framework.models import MLP
from framework.tasks import ClassificationTask
from framework.testing import CHECKS, CallbackContract


def identity_curvature_batch(size: int = 4) -> CapturedBatch:
    """Statistics of a bias-free (size x size) Linear layer named "" whose factors A, G and
    per-example-gradient scaling are all exactly the identity / ones: one example per (i, j)
    with input 2 e_j and output gradient 2 e_i."""
    eye = torch.eye(size)
    inputs = 2 * eye.repeat(size, 1)[:, None, :]
    gradients = 2 * eye.repeat_interleave(size, dim=0)[:, None, :]
    return CapturedBatch(size * size, {"": inputs}, [{"": gradients}])


@pytest.mark.parametrize("scale_every", [1, None], ids=["ekfac", "kfac"])
def test_identity_curvature_is_sgd_exactly(scale_every):
    torch.manual_seed(0)
    model, reference = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    reference.load_state_dict(model.state_dict())
    # (I + 1 * I)^-1 halves the direction, so EKFAC at lr 0.2 is SGD at lr 0.1, bit for bit.
    optimizer = EKFAC(
        model.parameters(), lr=0.2, damping=1.0, momentum=0.9, weight_decay=0.01, decay=0.5, eigen_every=2, scale_every=scale_every
    )
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    FisherStatistics(model, optimizer)
    for _ in range(5):
        gradient = torch.randn(4, 4)
        model.weight.grad, reference.weight.grad = gradient.clone(), gradient.clone()
        optimizer.add_statistics(identity_curvature_batch())
        optimizer.step()
        sgd.step()
        assert torch.equal(model.weight, reference.weight)


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
@pytest.mark.parametrize(("representation", "scale_every"), [("ekfac", 1), ("kfac", None)])
def test_step_equals_damped_solve_of_the_functional_core(representation, scale_every, fisher_type):
    torch.manual_seed(0)
    model = conv_net()
    lr, damping = 0.5, 0.1
    optimizer = EKFAC(model.parameters(), lr=lr, damping=damping, momentum=0.0, decay=0.0, eigen_every=1, scale_every=scale_every)
    statistics = FisherStatistics(model, optimizer, fisher_type=fisher_type)
    for _ in range(2):
        inputs, targets = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
        curvature = fisher(model, [(inputs, targets)], representation=representation, fisher_type=fisher_type)
        optimizer.zero_grad()
        with statistics.record(targets):
            logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        gradient = PVector.from_model_grads(curvature.layout).flatten()
        damped = curvature.to_dense() + damping * torch.eye(len(gradient), dtype=torch.float64)
        expected = PVector.from_model(curvature.layout).flatten() - lr * torch.linalg.solve(damped, gradient)
        optimizer.step()
        torch.testing.assert_close(PVector.from_model(curvature.layout).flatten(), expected, rtol=1e-10, atol=1e-12)


def test_accumulated_step_uses_the_statistics_of_every_micro_batch():
    torch.manual_seed(0)
    model = conv_net()
    optimizer = EKFAC(model.parameters(), lr=0.5, damping=0.1, momentum=0.0, decay=0.0)
    statistics = FisherStatistics(model, optimizer, fisher_type="empirical")
    halves = [(torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(2)]
    curvature = fisher(model, halves, representation="ekfac", fisher_type="empirical")
    for inputs, targets in halves:
        with statistics.record(targets):
            logits = model(inputs)
        (F.cross_entropy(logits, targets) / 2).backward()
    expected = PVector.from_model(curvature.layout) - 0.5 * curvature.solve(PVector.from_model_grads(curvature.layout), 0.1)
    optimizer.step()
    torch.testing.assert_close(PVector.from_model(curvature.layout).flatten(), expected.flatten(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"damping": 0.0}, "damping=0.0 must be > 0"),
        ({"damping": -1e-3}, "damping"),
        ({"stats_every": 0}, "stats_every=0 must be an integer >= 1"),
        ({"eigen_every": 0}, "eigen_every"),
        ({"scale_every": 0}, "scale_every"),
        ({"eigen_every": 2.5}, "eigen_every"),
        ({"decay": 1.0}, r"decay=1.0 must be in \[0, 1\)"),
        ({"decay": -0.1}, "decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr": 0.0}, "lr"),
        ({"kl_clip": 0.0}, "kl_clip"),
    ],
)
def test_bad_hyperparameters_are_refused(setting, message):
    with pytest.raises(UserInputError, match=message):
        EKFAC(nn.Linear(2, 2).parameters(), **setting)


def named_linear() -> nn.Module:
    return nn.Sequential(OrderedDict(fc=nn.Linear(3, 2)))


def test_non_finite_factors_are_refused_naming_layer_and_step():
    model = named_linear()
    optimizer = EKFAC(model.parameters(), lr=0.1)
    statistics = FisherStatistics(model, optimizer)
    for step in range(2):
        with statistics.record():
            outputs = model(torch.randn(4, 3))
        outputs.sum().backward()
        if step == 0:
            optimizer.step()
    overflowed = torch.full((1, 1, 4), float("inf"))  # an input of 'fc' (bias 1 appended) that overflowed
    optimizer.add_statistics(CapturedBatch(1, {"fc": overflowed}, [{"fc": torch.ones(1, 1, 2)}]))
    with pytest.raises(CurvatureError, match=r"the input factor of layer 'fc' became non-finite at step 1"):
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_model_output_is_refused():
    model = named_linear()
    optimizer = EKFAC(model.parameters(), lr=0.1)
    statistics = FisherStatistics(model, optimizer)
    with pytest.raises(CurvatureError, match="non-finite model output at step 0"):
        with statistics.record():
            model(torch.full((4, 3), float("nan")))


def test_failed_eigendecomposition_is_retried_in_float64_then_refused(monkeypatch):
    model = named_linear()
    optimizer = EKFAC(model.parameters(), lr=0.1)
    statistics = FisherStatistics(model, optimizer)
    eigh, dtypes = torch.linalg.eigh, []

    def eigh_failing_in_float32(matrix: torch.Tensor):
        dtypes.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure to converge")
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_float32)
    with statistics.record():
        outputs = model(torch.randn(4, 3))
    outputs.sum().backward()
    before = model.fc.weight.detach().clone()
    optimizer.step()
    assert dtypes == [torch.float32, torch.float64] * 2
    assert torch.isfinite(model.fc.weight).all() and not torch.equal(model.fc.weight, before)
    assert model.fc.weight.dtype == torch.float32 and optimizer.state[model.fc.weight]["input_basis"].dtype == torch.float32

    def eigh_failing(matrix: torch.Tensor):
        raise torch.linalg.LinAlgError("simulated failure to converge")

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing)
    optimizer.steps = optimizer.eigen_every
    with statistics.record():
        outputs = model(torch.randn(4, 3))
    outputs.sum().backward()
    failure = "input factor of layer 'fc' could not be eigendecomposed at step 20, also in float64"
    with pytest.raises(CurvatureError, match=failure):
        optimizer.step()


def test_step_without_statistics_is_refused():
    model = named_linear()
    with pytest.raises(UserInputError, match="not attached to a model"):
        EKFAC(model.parameters()).step()
    optimizer = EKFAC(model.parameters())
    FisherStatistics(model, optimizer)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(UserInputError, match="no curvature statistics for layer 'fc' at step 0"):
        optimizer.step()


@pytest.mark.parametrize("kl_clip", [1e-6, 1e6])
def test_kl_clipping_scales_the_preconditioned_step(kl_clip):
    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    steps, gradients = [], []
    for clip in (None, kl_clip):
        torch.manual_seed(1)
        model = conv_net()
        optimizer = EKFAC(model.parameters(), lr=0.5, damping=0.1, momentum=0.0, kl_clip=clip)
        statistics = FisherStatistics(model, optimizer, fisher_type="empirical")
        with statistics.record(targets):
            logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        optimizer.step()
        steps.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    unclipped, clipped = steps
    predicted_kl = -0.5 * unclipped @ gradients[0]  # lr^2 v.g with the step -lr v, lr 0.5
    expected_factor = min(1.0, (kl_clip / predicted_kl.item()) ** 0.5)
    assert (expected_factor < 1e-2) == (kl_clip < 1)
    torch.testing.assert_close(clipped, expected_factor * unclipped, rtol=1e-10, atol=1e-14)


def digits_loss(model: nn.Module, loader) -> float:
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in loader) / len(loader.dataset)


@pytest.mark.parametrize("scale_every", [1, None], ids=["ekfac", "kfac"])
def test_plain_loop_training_decreases_the_loss_on_digits(scale_every):
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    loader = data.train_dataloader()
    model = MLP(64, 10, hidden=(32,))
    optimizer = EKFAC(model.parameters(), lr=0.1, damping=0.03, eigen_every=5, scale_every=scale_every, kl_clip=1e-3)
    statistics = FisherStatistics(model, optimizer, seed=0)
    initial = digits_loss(model, loader)
    for _ in range(2):
        for inputs, targets in loader:
            optimizer.zero_grad()
            with statistics.record(targets):
                logits = model(inputs)
            F.cross_entropy(logits, targets).backward()
            optimizer.step()
    final = digits_loss(model, loader)
    # SGD (lr 0.05 or 0.2, momentum 0.9) reaches 0.19 or 0.28 in these 2 epochs.
    assert initial > 2.0 and final < 0.1, (initial, final)
    metrics = optimizer.pop_metrics()
    expected = {"ekfac/damping", "ekfac/kl_clip_factor", "ekfac/preconditioned_to_raw_norm", "ekfac/condition/layers.1"}
    assert expected <= metrics.keys()


def ekfac_task() -> ClassificationTask:
    """The contract's tiny MLP on digits, trained by EKFAC."""
    optimizer = partial(
        EKFAC, lr=0.1, damping=0.03, momentum=0.9, weight_decay=1e-4, eigen_every=3, stats_every=1, scale_every=2, kl_clip=1e-3
    )
    return ClassificationTask(MLP(64, 10, hidden=(32,)), optimizer=optimizer, no_weight_decay=("*.bias",))


@pytest.mark.parametrize("check", CHECKS)
def test_callback_passes_the_contract(check, tmp_path):
    CallbackContract(EKFACStatistics, task_factory=ekfac_task, max_epochs=2, resume_epoch=1).check(check, tmp_path)


def test_callback_logs_the_optimizers_measurements(tmp_path):
    trainer = L.Trainer(
        callbacks=[EKFACStatistics()], max_steps=3, log_every_n_steps=1, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(ekfac_task(), datamodule=DigitsDataModule(batch_size=64, seed=0))
    with open(trainer.logger.experiment.metrics_file_path) as file:
        rows = list(csv.DictReader(file))
    logged = {(int(row["step"]), key) for row in rows for key, value in row.items() if key.startswith("ekfac/") and value}
    per_step = ["ekfac/damping", "ekfac/kl_clip_factor", "ekfac/preconditioned_to_raw_norm"]
    per_step += ["ekfac/condition/backbone.layers.1", "ekfac/condition/backbone.layers.3"]
    # Three steps (0, 1, 2, logged at global steps 1, 2, 3); eigen_every=3 decomposes in step 0 only.
    assert {(step, key) for step in (1, 2, 3) for key in per_step} | {(1, "ekfac/eigen_seconds")} == logged, logged


def test_callback_refuses_a_task_without_ekfac(tmp_path):
    trainer = L.Trainer(
        callbacks=[EKFACStatistics()], max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    task = ClassificationTask(MLP(64, 10, hidden=(8,)))
    with pytest.raises(UserInputError, match=r"needs exactly one EKFAC optimizer in the task, got \['SGD'\]"):
        trainer.fit(task, datamodule=DigitsDataModule(batch_size=64, seed=0))
