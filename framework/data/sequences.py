"""Synthetic sequence tasks generated from a seed: the copy task, the denoise task and the
adding problem.

Batches are ``(x, y, mask)``: inputs (N, L, D), per-step targets (N, L) and a boolean mask (N, L)
of the steps that count in the loss, as the sequence task expects.
"""

import math

import torch
from torch.utils.data import Dataset, TensorDataset

from framework.data.base import SplitDataModule
from framework.errors import UserInputError, check_positive

COPY_BLANK, COPY_MARKER, COPY_SYMBOLS, COPY_LENGTH = 0, 9, 8, 10


def copy_task(num_examples: int, delay: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016): 10 symbols drawn from
    1..8, ``delay - 1`` blanks (0), the marker 9, then 10 blanks; the target is blank for the
    first ``delay + 10`` steps, then the 10 symbols. Returns integer tokens (N, delay + 20) for
    the input and the target."""
    length = delay + 2 * COPY_LENGTH
    symbols = torch.randint(1, COPY_SYMBOLS + 1, (num_examples, COPY_LENGTH), generator=generator)
    inputs = torch.full((num_examples, length), COPY_BLANK, dtype=torch.int64)
    inputs[:, :COPY_LENGTH] = symbols
    inputs[:, COPY_LENGTH + delay - 1] = COPY_MARKER
    targets = torch.full((num_examples, length), COPY_BLANK, dtype=torch.int64)
    targets[:, -COPY_LENGTH:] = symbols
    return inputs, targets


def copy_task_baseline(delay: int) -> float:
    """Cross-entropy per step of the memoryless strategy: blanks predicted exactly, then a
    uniform guess over the 8 symbols for the last 10 steps, i.e. ``10 ln 8 / (delay + 20)``."""
    return COPY_LENGTH * math.log(COPY_SYMBOLS) / (delay + 2 * COPY_LENGTH)


def denoise_task(num_examples: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise task (Jing et al. 2017, as used by Kerg et al. 2020): 10 symbols drawn from 1..8
    at random distinct positions among the first ``length - 1`` steps, the noise token (0)
    everywhere else, the marker 9 at step ``length - 1``, then 10 noise steps; the target is the
    noise token for the first ``length`` steps, then the 10 symbols in the order they appeared.
    Unlike the copy task, the model has to find where the symbols are, i.e. filter the noise
    out. Returns integer tokens (N, length + 10) for the input and the target."""
    if length < COPY_LENGTH + 1:
        raise UserInputError(f"length={length} must be >= {COPY_LENGTH + 1} (10 symbols, then the marker)")
    total = length + COPY_LENGTH
    symbols = torch.randint(1, COPY_SYMBOLS + 1, (num_examples, COPY_LENGTH), generator=generator)
    positions = torch.rand(num_examples, length - 1, generator=generator).argsort(dim=1)[:, :COPY_LENGTH].sort(dim=1).values
    inputs = torch.full((num_examples, total), COPY_BLANK, dtype=torch.int64)
    inputs.scatter_(1, positions, symbols)
    inputs[:, length - 1] = COPY_MARKER
    targets = torch.full((num_examples, total), COPY_BLANK, dtype=torch.int64)
    targets[:, -COPY_LENGTH:] = symbols
    return inputs, targets


def denoise_task_baseline(length: int) -> float:
    """Cross-entropy per step of the memoryless strategy, as for the copy task: noise predicted
    exactly, then a uniform guess over the 8 symbols for the last 10 steps, i.e.
    ``10 ln 8 / (length + 10)``."""
    return COPY_LENGTH * math.log(COPY_SYMBOLS) / (length + COPY_LENGTH)


def adding_task(num_examples: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Adding problem (Hochreiter & Schmidhuber 1997): at each step a value uniform in [0, 1]
    and a marker; exactly two markers are 1, one in each half of the sequence; the target is
    the sum of the two marked values. Returns inputs (N, length, 2) and targets (N,)."""
    values = torch.rand(num_examples, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (num_examples,), generator=generator)
    second = torch.randint(half, length, (num_examples,), generator=generator)
    markers = torch.zeros(num_examples, length)
    rows = torch.arange(num_examples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), targets


ADDING_TASK_BASELINE = 1.0 / 6.0
"""Mean squared error of always predicting 1, the variance of the sum of two U(0, 1) values."""


class OneHotCopyDataset(Dataset):
    """Copy- or denoise-task tokens stored compactly, one-hot encoded (10 channels) when indexed."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs = inputs.to(torch.uint8)
        self.targets = targets
        self.mask = torch.ones(inputs.shape[1], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        one_hot = torch.nn.functional.one_hot(self.inputs[index].long(), COPY_MARKER + 1).float()
        return one_hot, self.targets[index], self.mask


class _GeneratedDataModule(SplitDataModule):
    """Generates each split once, from ``seed`` and the split's index, so every process and
    every resumed run builds identical data."""

    def __init__(self, train_size: int, val_size: int, test_size: int, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            check_positive(name, size)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def generate(self, num_examples: int, generator: torch.Generator) -> Dataset:
        raise NotImplementedError

    def build_datasets(self) -> dict[str, Dataset]:
        return {
            split: self.generate(size, torch.Generator().manual_seed(self.seed * 3 + offset))
            for offset, (split, size) in enumerate(self.sizes.items())
        }


class CopyTaskDataModule(_GeneratedDataModule):
    """The copy task with delay ``delay`` (sequences of ``delay + 20`` steps); the loss counts
    every step, so the memoryless baseline is ``copy_task_baseline(delay)``."""

    def __init__(
        self,
        delay: int = 100,
        train_size: int = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(train_size, val_size, test_size, batch_size, eval_batch_size, num_workers, seed)
        if delay < 1:
            raise UserInputError(f"delay={delay} must be >= 1")
        self.delay = delay

    def generate(self, num_examples: int, generator: torch.Generator) -> Dataset:
        return OneHotCopyDataset(*copy_task(num_examples, self.delay, generator))

    @property
    def baseline_loss(self) -> float:
        return copy_task_baseline(self.delay)


class AddingTaskDataModule(_GeneratedDataModule):
    """The adding problem on sequences of ``length`` steps; the target is given at the last
    step (mask true there only). Predicting 1 scores ``ADDING_TASK_BASELINE`` (MSE 0.167)."""

    def __init__(
        self,
        length: int = 100,
        train_size: int = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(train_size, val_size, test_size, batch_size, eval_batch_size, num_workers, seed)
        if length < 2:
            raise UserInputError(f"length={length} must be >= 2 (one marker in each half)")
        self.length = length

    def generate(self, num_examples: int, generator: torch.Generator) -> Dataset:
        inputs, sums = adding_task(num_examples, self.length, generator)
        targets = torch.zeros(num_examples, self.length)
        targets[:, -1] = sums
        mask = torch.zeros(num_examples, self.length, dtype=torch.bool)
        mask[:, -1] = True
        return TensorDataset(inputs, targets, mask)

    @property
    def baseline_loss(self) -> float:
        return ADDING_TASK_BASELINE


class DenoiseTaskDataModule(_GeneratedDataModule):
    """The denoise task on sequences of ``length + 10`` steps (:func:`denoise_task`): 10 symbols
    hidden at random positions among ``length - 1`` noise steps, recalled in order after the
    marker. Batches as for the copy task (10 one-hot channels, 9 target classes, every step in
    the loss), so the memoryless baseline is ``denoise_task_baseline(length)``."""

    def __init__(
        self,
        length: int = 100,
        train_size: int = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(train_size, val_size, test_size, batch_size, eval_batch_size, num_workers, seed)
        if length < COPY_LENGTH + 1:
            raise UserInputError(f"length={length} must be >= {COPY_LENGTH + 1} (10 symbols, then the marker)")
        self.length = length

    def generate(self, num_examples: int, generator: torch.Generator) -> Dataset:
        return OneHotCopyDataset(*denoise_task(num_examples, self.length, generator))

    @property
    def baseline_loss(self) -> float:
        return denoise_task_baseline(self.length)
