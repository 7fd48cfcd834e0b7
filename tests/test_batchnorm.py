"""Precise batch-norm statistics: the functional core against direct per-batch statistics in
float64, pooling over processes, BN-LSTM's per-step statistics, and the callback (logs, contract)."""

import copy

import lightning as L
import pytest
import torch
from helpers import MemoryLogger
from torch import nn

from callbacks.batchnorm import PreciseBatchNorm, population_statistics_modules, recompute_population_statistics
from framework.data import DigitsDataModule
from framework.errors import UserInputError
from framework.models import MLP
from framework.models.rnn_batchnorm import BNLSTM, StepwiseBatchNorm
from framework.tasks import ClassificationTask
from framework.testing import CHECKS, CallbackContract

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def mlp_with_batchnorm() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def test_recomputed_statistics_are_the_average_of_each_batch_mean_and_unbiased_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3), nn.BatchNorm1d(3)).double().eval()
    model[1].running_mean.fill_(3.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(n, 5, dtype=torch.float64) * 2 + 1 for n in (8, 5, 11)]
    changes = recompute_population_statistics(model, batches)

    projected = [model[0](x) for x in batches]
    assert torch.allclose(model[1].running_mean, torch.stack([p.mean(0) for p in projected]).mean(0))
    assert torch.allclose(model[1].running_var, torch.stack([p.var(0) for p in projected]).mean(0))
    assert model[1].momentum == 0.1 and model[1].num_batches_tracked.item() == 0
    assert not model.training and not model[2].training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert set(changes) == {"1", "4"}
    expected_shift = ((3.0 - model[1].running_mean) / (model[1].running_var + model[1].eps).sqrt()).square().mean().sqrt()
    assert changes["1"]["mean_shift"] == pytest.approx(expected_shift.item())


def test_pooled_over_processes_equals_one_process_seeing_every_batch():
    """Two 'ranks' with 1 and 3 batches: the all-reduce of sums and counts gives the statistics
    of all 4 batches on one process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    batches = [torch.randn(6, 5, dtype=torch.float64) * (k + 1) for k in range(4)]
    recompute_population_statistics(model, batches)
    single = model[1].running_mean.clone(), model[1].running_var.clone()

    other_rank: list[torch.Tensor] = []
    recompute_population_statistics(model, batches[1:], all_reduce=lambda t: other_rank.append(t.clone()) or t)
    received = iter(other_rank)
    recompute_population_statistics(model, batches[:1], all_reduce=lambda t: t + next(received))
    assert torch.allclose(model[1].running_mean, single[0]) and torch.allclose(model[1].running_var, single[1])


def test_bnlstm_statistics_per_time_step_and_steps_not_reached_keep_their_values():
    torch.manual_seed(0)
    model = BNLSTM(2, 6, 3, max_steps=5).double()
    batches = [torch.randn(7, 3, 2, dtype=torch.float64) for _ in range(3)]
    norm = model.input_norm
    norm.running_mean[3:].fill_(0.5)
    recompute_population_statistics(model, batches)
    terms = [model.input_to_hidden(x) for x in batches]  # (N, L, 4H); step t is terms[:, t]
    for t in range(3):
        assert torch.allclose(norm.running_mean[t], torch.stack([z[:, t].mean(0) for z in terms]).mean(0))
        assert torch.allclose(norm.running_var[t], torch.stack([z[:, t].var(0) for z in terms]).mean(0))
    assert torch.equal(norm.running_mean[3:], torch.full_like(norm.running_mean[3:], 0.5))
    assert norm.momentum == 0.1 and not norm.num_batches_tracked.any()
    assert set(population_statistics_modules(model)) == {"input_norm", "hidden_norm", "cell_norm"}


def test_statistics_are_restored_when_a_forward_pass_fails():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(2.0)
    with pytest.raises(RuntimeError):
        recompute_population_statistics(model, [torch.randn(4, 5), torch.randn(4, 6)])
    assert torch.equal(model[1].running_mean, torch.full((4,), 2.0)) and model[1].momentum == 0.1


def test_callback_recomputes_before_each_validation_and_logs_the_shift():
    torch.manual_seed(0)
    logger = MemoryLogger()
    callback = PreciseBatchNorm(num_batches=4, seed=3)
    task = ClassificationTask(mlp_with_batchnorm())
    data = DigitsDataModule(batch_size=32, seed=0)
    trainer = L.Trainer(max_epochs=2, logger=logger, callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)

    expected = nn.Sequential(*[layer for layer in mlp_with_batchnorm()])
    expected.load_state_dict(task.backbone.state_dict())
    examples = torch.randperm(len(data.datasets["train"]), generator=torch.Generator().manual_seed(3))[:128]
    inputs = torch.stack([data.datasets["train"][i][0] for i in examples.tolist()])
    recompute_population_statistics(expected, inputs.split(32))
    assert torch.allclose(task.backbone[2].running_mean, expected[2].running_mean, atol=1e-6)
    assert torch.allclose(task.backbone[2].running_var, expected[2].running_var, rtol=1e-5)
    shifts = [(step, m["batchnorm/mean_shift"]) for step, m in logger.records if "batchnorm/mean_shift" in m]
    assert [step for step, _ in shifts] == [trainer.num_training_batches, 2 * trainer.num_training_batches]
    assert all(shift > 0 for _, shift in shifts)
    assert any("batchnorm/mean_shift/backbone.2" in m for _, m in logger.records)


def test_bad_settings_and_models_without_batchnorm_are_refused():
    with pytest.raises(UserInputError, match="num_batches"):
        PreciseBatchNorm(num_batches=0)
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[PreciseBatchNorm()], enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(UserInputError, match="no batch norm"):
        trainer.fit(ClassificationTask(MLP(64, 10, hidden=(16,))), datamodule=DigitsDataModule(batch_size=64, seed=0))


def task_with_batchnorm() -> ClassificationTask:
    from functools import partial

    return ClassificationTask(mlp_with_batchnorm(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def precise_batchnorm_for_contract() -> PreciseBatchNorm:
    return PreciseBatchNorm(num_batches=3)


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_callback_contract(check, tmp_path):
    CallbackContract(precise_batchnorm_for_contract, task_factory=task_with_batchnorm, max_epochs=2, resume_epoch=1, wandb=False).check(check, tmp_path)


@pytest.mark.slow
def test_bnlstm_experiment_logs_the_recomputed_statistics(tmp_path):
    from pathlib import Path

    from helpers import run_framework

    from framework.wandb_offline import find_offline_runs, read_history

    config = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "bnlstm_sequential_digits.yaml"
    small = ["--model.init_args.backbone.init_args.hidden_size", "8", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_test_batches", "1"]
    run_framework(tmp_path, "fit", "--config", str(config), *small)
    (run,) = find_offline_runs(tmp_path / "logs" / "wandb", finished_within=60)
    history = read_history(run)
    (row,) = [row for row in history if "batchnorm/mean_shift" in row]
    assert row["trainer/global_step"] == 3 and row["batchnorm/mean_shift"] > 0
    assert any("batchnorm/mean_shift/backbone.input_norm" in r for r in history) and any("test/acc" in r for r in history)


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("length", [3, 6])
def test_stepwise_batchnorm_on_a_whole_sequence_equals_step_by_step(momentum, length):
    """BN-LSTM normalises its input term for all steps at once; it must equal the per-step
    normalisation, in training (outputs, gradients, running statistics; with steps beyond
    T_max = 4 when length is 6) and in evaluation."""
    torch.manual_seed(0)
    stepwise = StepwiseBatchNorm(5, max_steps=4, shift=True, momentum=momentum).double()
    with torch.no_grad():
        stepwise.weight.uniform_(0.5, 1.5)
        stepwise.bias.uniform_(-1, 1)
    whole = copy.deepcopy(stepwise)
    for _ in range(2):  # two batches: the running statistics' update weights change
        x = torch.randn(7, length, 5, dtype=torch.float64) * 3 + 1
        x.requires_grad_(True)
        expected = torch.stack([stepwise(step, t) for t, step in enumerate(x.unbind(1))], dim=1)
        result = whole.normalise_sequence(x)
        torch.testing.assert_close(result, expected)
        upstream = torch.randn_like(result)
        torch.testing.assert_close(torch.autograd.grad(result, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0])
    torch.testing.assert_close(whole.running_mean, stepwise.running_mean)
    torch.testing.assert_close(whole.running_var, stepwise.running_var)
    assert torch.equal(whole.num_batches_tracked, stepwise.num_batches_tracked)
    whole.eval(), stepwise.eval()
    x = torch.randn(2, length, 5, dtype=torch.float64)
    torch.testing.assert_close(whole.normalise_sequence(x), torch.stack([stepwise(step, t) for t, step in enumerate(x.unbind(1))], dim=1))
