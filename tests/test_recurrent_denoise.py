"""The denoise task: symbols hidden among noise at random positions, recalled in order after the
marker; its memoryless baseline; the data module and its bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F

from framework.data.sequences import COPY_BLANK, COPY_MARKER, DenoiseTaskDataModule, denoise_task, denoise_task_baseline
from framework.errors import UserInputError


def test_symbols_hidden_in_noise_are_the_targets_after_the_marker_in_order():
    length = 30
    inputs, targets = denoise_task(200, length, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (200, length + 10)
    assert (inputs[:, length - 1] == COPY_MARKER).all()
    assert (inputs[:, length:] == COPY_BLANK).all()  # noise while recalling
    assert (targets[:, :length] == COPY_BLANK).all()
    positions = []
    for row_inputs, row_targets in zip(inputs, targets):
        marked = torch.nonzero(row_inputs[: length - 1] != COPY_BLANK).flatten()
        assert len(marked) == 10  # distinct positions
        assert torch.equal(row_inputs[marked], row_targets[length:])  # in the order they appeared
        assert row_inputs[marked].min() >= 1 and row_inputs[marked].max() <= 8
        positions.append(marked)
    positions = torch.stack(positions)
    assert len({tuple(p.tolist()) for p in positions}) == 200  # random positions, not the copy task's
    assert positions.min() == 0 and positions.max() == length - 2  # anywhere before the marker


def test_memoryless_baseline_is_the_loss_of_predicting_noise_then_uniform_symbols():
    length = 40
    _, targets = denoise_task(50, length, torch.Generator().manual_seed(1))
    logits = torch.full((50, length + 10, 9), -1e9)
    logits[:, :length, COPY_BLANK] = 0.0  # noise, certainly
    logits[:, length:, 1:] = 0.0  # uniform over the 8 symbols
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert loss == pytest.approx(denoise_task_baseline(length), rel=1e-6)
    assert denoise_task_baseline(100) == pytest.approx(10 * math.log(8) / 110)


def test_data_module_builds_one_hot_batches_from_the_seed():
    data = DenoiseTaskDataModule(length=20, train_size=16, val_size=8, test_size=8, batch_size=4, seed=3)
    data.setup()
    x, y, mask = next(iter(data.val_dataloader()))
    assert x.shape == (4, 30, 10) and y.shape == mask.shape == (4, 30) and mask.all()
    assert torch.equal(x.sum(dim=-1), torch.ones(4, 30))
    again = DenoiseTaskDataModule(length=20, train_size=16, val_size=8, test_size=8, batch_size=4, seed=3)
    again.setup()
    assert torch.equal(next(iter(again.val_dataloader()))[0], x)
    assert data.baseline_loss == denoise_task_baseline(20)


def test_too_short_sequences_are_refused():
    with pytest.raises(UserInputError, match="length=10 must be >= 11"):
        DenoiseTaskDataModule(length=10)
