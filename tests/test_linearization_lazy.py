"""Lazy vs real training: the difficulty scores on hand-built histories, the label-noise wrapper,
score files and their errors, the twins inside the LazyVsReal callback (first steps, learning
rates, accumulation), its logging (memory and W&B read back), bad options, the callback contract
and the digits experiment from the command line."""

import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import TensorDataset

from helpers import MemoryLogger, run_framework

from callbacks.linearization import (
    FileScores,
    ForgettingEvents,
    LabelNoise,
    LazyVsReal,
    LearningSpeed,
    NoisyLabels,
    flip_labels,
    forgetting_events,
    group_means,
    learning_speed,
    quantile_groups,
    read_scores,
    write_scores,
)
from framework.errors import DataFileError, UserInputError
from framework.models import MLP
from framework.tasks import ClassificationTask
from framework.testing import CHECKS, CallbackContract
from framework.testing.contract import tiny_digits
from framework.wandb_offline import find_offline_runs, read_history

EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "lazy_vs_real_digits.yaml"
SMALL = partial(LazyVsReal, alphas=(10.0,), linearized=True, every_k=7, num_examples=96, num_groups=4)

# --- scores ---------------------------------------------------------------------------------

# Five examples over six evaluations (rows): always right; learned at 2; forgotten twice;
# never right; right then wrong for good.
HISTORY = torch.tensor(
    [
        [1, 0, 1, 0, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
    ],
    dtype=torch.bool,
)


def test_learning_speed_is_the_cumulative_accuracy_of_each_example():
    assert learning_speed(HISTORY).tolist() == pytest.approx([1.0, 4 / 6, 4 / 6, 0.0, 1 / 6])
    assert learning_speed(HISTORY[:2]).tolist() == pytest.approx([1.0, 0.0, 0.5, 0.0, 0.5])
    assert learning_speed(HISTORY[:0]).tolist() == [0.0] * 5
    assert LearningSpeed().scores(torch.arange(5), HISTORY).tolist() == pytest.approx([0.0, 2 / 6, 2 / 6, 1.0, 5 / 6])


def test_forgetting_events_count_correct_to_incorrect_transitions():
    assert forgetting_events(HISTORY).tolist() == [0, 0, 2, 0, 1]
    assert forgetting_events(HISTORY[:1]).tolist() == [0] * 5
    # Never-learned examples are the hardest (Toneva et al.).
    assert ForgettingEvents().scores(torch.arange(5), HISTORY).tolist() == [0.0, 0.0, 2.0, math.inf, 1.0]


def test_quantile_groups_are_equal_sized_easiest_first_and_break_ties_by_position():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 0.7, 0.5, 0.2])
    assert quantile_groups(scores, 4).tolist() == [3, 0, 1, 2, 1, 3, 2, 0]
    assert quantile_groups(scores, 1).tolist() == [0] * 8
    assert torch.bincount(quantile_groups(torch.randn(103), 10)).tolist() == [11, 10, 10, 11, 10, 10, 11, 10, 10, 10]
    with pytest.raises(UserInputError, match="num_groups=9 exceeds the 8 tracked examples"):
        quantile_groups(scores, 9)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])
    assert group_means(values, torch.tensor([0, 1, 0, 1]), 3).tolist()[0][:2] == [2.0, 3.0]
    assert group_means(values, torch.tensor([0, 1, 0, 1]), 3).isnan()[:, 2].all(), "an empty group is NaN"


# --- label noise ----------------------------------------------------------------------------


def test_label_flips_are_deterministic_exact_in_number_and_always_change_the_class():
    labels = torch.arange(1000) % 10
    noisy, flipped = flip_labels(labels, 0.25, 10, seed=3)
    assert flipped.sum().item() == 250
    assert torch.equal(noisy != labels, flipped), "every chosen label changes, no other does"
    again, flipped_again = flip_labels(labels, 0.25, 10, seed=3)
    assert torch.equal(again, noisy) and torch.equal(flipped_again, flipped)
    other, flipped_other = flip_labels(labels, 0.25, 10, seed=4)
    assert not torch.equal(flipped_other, flipped)
    assert flip_labels(labels[:7], 0.5, 10, seed=0)[1].sum().item() == 4  # round(3.5) = 4
    new_classes = torch.bincount(noisy[flipped], minlength=10)
    assert new_classes.min() > 10, "new labels spread over the classes"


def test_noisy_labels_wraps_a_dataset_and_records_the_flipped_examples():
    dataset = TensorDataset(torch.randn(50, 3), torch.arange(50) % 5, torch.arange(50))
    wrapped = NoisyLabels(dataset, fraction=0.2, seed=1)
    assert len(wrapped) == 50 and wrapped.num_classes == 5 and wrapped.flipped.sum() == 10
    for i in range(50):
        x, y, extra = wrapped[i]
        assert torch.equal(x, dataset[i][0]) and extra == i
        assert (y != dataset[i][1]) == wrapped.flipped[i]
    assert torch.equal(LabelNoise(0.2, seed=1).groups(wrapped.flipped.double(), 2), wrapped.flipped.long())


# --- score files ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".csv"])
def test_scores_written_then_read_back_in_every_format(tmp_path, suffix):
    scores = torch.tensor([0.5, -1.25, 3.0, float("nan"), 2.0], dtype=torch.float64)
    write_scores(tmp_path / f"s{suffix}", scores)
    read = read_scores(tmp_path / f"s{suffix}", 5)
    assert torch.equal(read.isnan(), scores.isnan()) and torch.equal(read.nan_to_num(), scores.nan_to_num())


def test_csv_scores_with_one_column_or_shuffled_index_column(tmp_path):
    (tmp_path / "one.csv").write_text("cscore\n0.1\n0.7\n0.3\n")
    assert read_scores(tmp_path / "one.csv", 3).tolist() == [0.1, 0.7, 0.3]
    (tmp_path / "two.csv").write_text("2,0.3\n0,0.1\n1,0.7\n")
    assert read_scores(tmp_path / "two.csv", 3).tolist() == [0.1, 0.7, 0.3]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.npy", None, "does not exist"),
        ("short.npy", np.zeros(4), "has shape (4,), not (5,)"),
        ("matrix.npy", np.zeros((5, 2)), "has shape (5, 2), not (5,)"),
        ("infinite.npy", np.array([0, 1, np.inf, 2, 3.0]), "infinite"),
        ("dict.pt", {"scores": torch.zeros(5)}, "holds a dict, not a tensor"),
        ("ragged.csv", "1,2\n3\n4,5\n6,7\n8,9\n", "one column (score) or two"),
        ("words.csv", "score\nhigh\nlow\nlow\nhigh\nlow\n", "could not be read"),
        ("duplicate.csv", "0,1\n0,2\n2,3\n3,4\n4,5\n", "each index 0..N-1 exactly once"),
        ("garbage.npy", b"not numpy", "could not be read"),
    ],
)
def test_bad_score_files_raise_one_line_naming_the_path_and_the_layout(tmp_path, name, content, fragment):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, dict):
        torch.save(content, path)
    elif isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(DataFileError) as info:
        read_scores(path, 5)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message
    assert "one finite score per training example" in message


def test_file_scores_refuse_unscored_tracked_examples_and_flip_the_sign_for_c_scores(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.array([0.9, np.nan, 0.2, 0.5]))
    dataset = TensorDataset(torch.zeros(4, 1), torch.zeros(4))
    scores = FileScores(str(path), higher_is_harder=False)
    scores.setup(dataset)
    assert scores.scores(torch.tensor([0, 2, 3]), HISTORY).tolist() == [-0.9, -0.2, -0.5]
    with pytest.raises(DataFileError, match=r"c.npy has no score \(NaN\) for tracked examples \[1\]"):
        scores.scores(torch.tensor([0, 1]), HISTORY)
    with pytest.raises(UserInputError, match=r"must end in .npy, .pt or .csv"):
        FileScores(str(tmp_path / "c.txt"))


# --- the callback ---------------------------------------------------------------------------


def fit(callback: LazyVsReal, tmp_path, task: L.LightningModule | None = None, wandb: bool = False, **trainer_kwargs) -> tuple[MemoryLogger, L.Trainer]:
    """A short fit on digits logging in memory (and to an offline W&B run under tmp_path)."""
    L.seed_everything(0, verbose=False)
    memory = MemoryLogger()
    loggers = [memory, WandbLogger(save_dir=tmp_path, offline=True, project="lazy")] if wandb else [memory]
    settings = dict(max_epochs=1, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer = L.Trainer(callbacks=[callback], logger=loggers, **{**settings, **trainer_kwargs})
    task = task or ClassificationTask(MLP(64, 10, hidden=(32,)), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    trainer.fit(task, datamodule=tiny_digits())
    if wandb:
        loggers[1].experiment.finish()
    return memory, trainer


def zero_head_mlp() -> nn.Module:
    """An MLP whose output layer starts at zero, so f(x; w0) = 0 and the alpha = 1 twin
    alpha (f(w) - f(w0)) is the model itself."""
    model = MLP(64, 10, hidden=(32,))
    nn.init.zeros_(model.layers[-1].weight)
    nn.init.zeros_(model.layers[-1].bias)
    return model


def test_alpha_one_twin_of_a_zero_output_model_follows_the_real_model_step_by_step(tmp_path):
    callback = LazyVsReal(alphas=(1.0,), linearized=False, every_k=1, num_examples=64)
    optimizer = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    task = ClassificationTask(zero_head_mlp(), optimizer=optimizer, no_weight_decay=["*.bias"])
    logger, _ = fit(callback, tmp_path, task=task, limit_train_batches=4)
    twin = callback.twins["alpha_1"].model
    for name, parameter in task.backbone.named_parameters():
        torch.testing.assert_close(twin.get_parameter(name), parameter, rtol=1e-5, atol=1e-6)
    assert not torch.equal(task.backbone.layers[1].weight, callback.twins["alpha_1"].initial.layers[1].weight), "it trained"
    for step, metrics in logger.records:
        if "lazy/real/loss" in metrics:
            assert metrics["lazy/alpha_1/loss"] == pytest.approx(metrics["lazy/real/loss"], rel=1e-5), step
    groups = callback.optimizers["alpha_1"].param_groups
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0] and all(g["momentum"] == 0.9 for g in groups)


def test_alpha_one_twin_takes_the_real_optimizers_first_step_on_the_centred_output(tmp_path):
    """A generic model: the twin's first step is the real optimizer's step on the loss of
    f(w) - f(w0) (the alpha-scaled model is centred, so it differs from the model's own step)."""
    callback = LazyVsReal(alphas=(1.0,), linearized=True, every_k=1, num_examples=64)
    task = ClassificationTask(MLP(64, 10, hidden=(32,)), optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    initial = {name: p.detach().clone() for name, p in task.backbone.named_parameters()}
    reference = MLP(64, 10, hidden=(32,))
    reference.load_state_dict(task.backbone.state_dict())
    frozen = MLP(64, 10, hidden=(32,))
    frozen.load_state_dict(task.backbone.state_dict())

    class FirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

    first = FirstBatch()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=[callback, first], max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(task, datamodule=tiny_digits())
    inputs, targets = first.batch
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(reference(inputs) - frozen(inputs).detach(), targets).backward()
    optimizer.step()
    twin = callback.twins["alpha_1"].model
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(twin.get_parameter(name), parameter)
        assert not torch.equal(parameter, initial[name])
    # The model itself took a different step: its loss was at f(w0), not at 0.
    assert not torch.allclose(task.backbone.layers[1].weight, reference.layers[1].weight)


def test_twins_at_the_start_the_linearised_equals_the_model_and_alpha_scaled_output_zero(tmp_path):
    logger, _ = fit(SMALL(alphas=(10.0, 100.0)), tmp_path, limit_train_batches=3)
    start = next(metrics for step, metrics in logger.records if step == 0 and "lazy/real/loss" in metrics)
    assert start["lazy/linearized/loss"] == pytest.approx(start["lazy/real/loss"], rel=1e-5)
    assert start["lazy/linearized/acc"] == start["lazy/real/acc"]
    for g in range(4):
        assert start[f"lazy/linearized/acc/group_{g}"] == start[f"lazy/real/acc/group_{g}"]
        # A zero output: cross-entropy log(10) on every example.
        assert start[f"lazy/alpha_100/loss/group_{g}"] == pytest.approx(math.log(10), rel=1e-6)


def test_twin_learning_rates_are_scaled_by_one_over_alpha_squared_and_follow_the_schedule(tmp_path):
    callback = SMALL(alphas=(1.0, 10.0))
    scheduler = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    task = ClassificationTask(MLP(64, 10, hidden=(32,)), optimizer=partial(torch.optim.Adam, lr=0.01), lr_scheduler=scheduler, lr_scheduler_interval="step")
    fit(callback, tmp_path, task=task, limit_train_batches=3)
    real_lr = 0.01 * 0.5**2  # the third step used the learning rate after two scheduler steps
    assert type(callback.optimizers["alpha_10"]) is torch.optim.Adam
    assert callback.optimizers["alpha_1"].param_groups[0]["lr"] == pytest.approx(real_lr)
    assert callback.optimizers["alpha_10"].param_groups[0]["lr"] == pytest.approx(real_lr / 100)
    assert callback.optimizers["linearized"].param_groups[0]["lr"] == pytest.approx(real_lr)
    assert all(state["step"].item() == 3 for state in callback.optimizers["alpha_10"].state.values())


def test_twins_step_once_per_accumulated_real_step(tmp_path):
    callback = SMALL()
    fit(callback, tmp_path, limit_train_batches=5, accumulate_grad_batches=2)
    # Lightning steps after batches 2 and 4 and at the epoch's last batch (5): three steps.
    assert all(state["momentum_buffer"] is not None for state in callback.optimizers["linearized"].state.values())
    assert callback.steps == [0, 3]
    assert all(p.grad is None for p in callback.twins["linearized"].parameters())


def test_logged_groups_match_the_history_and_wandb_holds_the_keys_table_and_plots(tmp_path):
    callback = SMALL(difficulty=LabelNoise(0.3, seed=2), num_groups=None)
    logger, trainer = fit(callback, tmp_path, wandb=True, limit_train_batches=8)
    logged = {step: metrics for step, metrics in logger.records if "lazy/real/acc" in metrics}
    assert list(logged) == callback.steps == [0, 7, 8]
    flipped = callback.difficulty.flipped[callback.indices]
    assert flipped.sum() > 10, "the tracked examples include flipped ones"
    for t, step in enumerate(callback.steps):
        for m, name in enumerate(callback.names):
            correct = callback.correct[t][m].double()
            assert logged[step][f"lazy/{name}/acc/group_0"] == pytest.approx(correct[~flipped].mean().item())
            assert logged[step][f"lazy/{name}/acc/group_1"] == pytest.approx(correct[flipped].mean().item())
            assert logged[step][f"lazy/{name}/loss"] == pytest.approx(callback.losses[t][m].double().mean().item(), rel=1e-6)
    # The model trains on the noisy labels, and the tracked examples carry them.
    noisy = trainer.train_dataloader.dataset
    assert isinstance(noisy, NoisyLabels) and noisy.flipped is callback.difficulty.flipped
    clean = noisy.dataset.tensors[1][callback.indices]
    assert torch.equal(callback.tracked[1] != clean, flipped)

    (run,) = find_offline_runs(tmp_path, finished_within=60)
    rows = read_history(run)
    scalars = [row for row in rows if "lazy/alpha_10/acc/group_1" in row]
    assert [row["trainer/global_step"] for row in scalars] == [0, 7, 8]
    assert scalars[-1]["lazy/linearized/loss/group_0"] == pytest.approx(logged[8]["lazy/linearized/loss/group_0"])
    final = next(row for row in rows if "lazy/groups" in row or "lazy/groups/_type" in row)
    assert final["lazy/groups/_type"] == "table-file" and final["lazy/groups/nrows"] == 3 * 3 * 2
    for name in ("real", "alpha_10", "linearized"):
        assert final[f"lazy/{name}/acc_by_group_table/_type"] == "table-file"


def test_learning_speed_scores_saved_by_one_run_group_the_next(tmp_path):
    path = tmp_path / "speed.npy"
    first = SMALL(alphas=(), linearized=False, save_scores=str(path), num_examples=None)
    fit(first, tmp_path, limit_train_batches=8)
    saved = read_scores(path, len(first.indices))
    torch.testing.assert_close(saved, first.scores())
    second = SMALL(alphas=(), linearized=False, difficulty=FileScores(str(path)), num_examples=None)
    fit(second, tmp_path, limit_train_batches=1)
    assert torch.equal(second.groups(), first.groups())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"alphas": [1.0, 0.0]}, r"alphas=0.0 must be > 0"),
        ({"alphas": [10, 10.0]}, r"alphas=\[10, 10.0\] holds a value twice"),
        ({"difficulty": LearningSpeed("alpha_3")}, r"difficulty.reference='alpha_3' is not allowed; choose one of \['real', 'alpha_1', 'alpha_10', 'alpha_100', 'linearized'\]"),
        ({"difficulty": "learning_speed"}, r"difficulty='learning_speed' must be a DifficultyScore"),
        ({"num_groups": 0}, r"num_groups=0 must be > 0"),
        ({"every_k": 0}, r"every_k=0 must be > 0"),
        ({"num_examples": 0}, r"num_examples=0 must be > 0"),
        ({"eval_batch_size": -1}, r"eval_batch_size=-1 must be > 0"),
        ({"save_scores": "scores.txt"}, r"save_scores suffix='.txt' is not allowed; choose one of \['.npy', '.pt', '.csv'\]"),
        ({"difficulty": LabelNoise(0.2), "num_groups": 3}, r"num_groups=3: LabelNoise has exactly 2 groups"),
    ],
)
def test_bad_options_are_refused_with_one_line(arguments, message, tmp_path):
    with pytest.raises(UserInputError, match=message) as info:
        callback = LazyVsReal(**arguments)
        fit(callback, tmp_path, limit_train_batches=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("arguments", "message"), [({"fraction": 1.0}, r"fraction=1.0 must be in \(0, 1\)"), ({"num_classes": 1}, "num_classes=1 must be >= 2")])
def test_bad_label_noise_is_refused(arguments, message):
    with pytest.raises(UserInputError, match=message):
        LabelNoise(**arguments)


def test_more_tracked_examples_than_the_training_set_is_refused(tmp_path):
    with pytest.raises(UserInputError, match=r"num_examples=5000 exceeds the \d+ training examples"):
        fit(SMALL(num_examples=5000), tmp_path, limit_train_batches=1)


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_lazy_vs_real_passes_the_callback_contract(check, tmp_path):
    CallbackContract(SMALL, max_epochs=2, resume_epoch=1).check(check, tmp_path)


@pytest.mark.slow
def test_the_digits_experiment_runs_from_the_command_line(tmp_path):
    shortened = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "1"]
    run_framework(tmp_path, "fit", "--config", str(EXPERIMENT), *shortened)
    (run,) = find_offline_runs(tmp_path / "logs" / "wandb", finished_within=60)
    rows = [row for row in read_history(run) if "lazy/real/acc" in row]
    assert [row["trainer/global_step"] for row in rows] == [0, 5, 6]
    for name in ("real", "alpha_1", "alpha_10", "alpha_100", "linearized"):
        assert f"lazy/{name}/acc/group_9" in rows[-1]
