"""Shared machinery of the data modules: deterministic shuffling and loaders.

A run resumed from an end-of-epoch checkpoint must see exactly the batches the uninterrupted
run would have seen. So the training order is a pure function of ``(seed, epoch)``, and every
DataLoader owns a seeded generator instead of drawing from the global RNG (which the tasks save
and restore with the checkpoint for the model's own randomness).
"""

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from framework.errors import UserInputError, check_positive


class EpochRandomSampler(RandomSampler):
    """A fresh permutation each epoch, computed from ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` at the start of every epoch. Under DDP, Lightning replaces any
    ``RandomSampler`` by a ``DistributedSampler``, whose order is a function of the global seed
    (``seed_everything``) and the epoch, so runs stay resumable there too.
    """

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class SplitDataModule(L.LightningDataModule):
    """A data module whose subclasses only build the ``train``/``val``/``test`` datasets.

    Args:
        batch_size: examples per training batch (per process under DDP).
        eval_batch_size: examples per validation/test batch; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: seeds the split, the generated data where there is any, and the shuffling.
    """

    def __init__(self, batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        if eval_batch_size is not None:
            check_positive("eval_batch_size", eval_batch_size)
        check_positive("num_workers", num_workers, allow_zero=True)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}

    def build_datasets(self) -> dict[str, Dataset]:
        """Return the ``train``, ``val`` and ``test`` datasets."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.build_datasets()
            for split in ("train", "val", "test"):
                if len(self.datasets[split]) == 0:
                    raise UserInputError(f"the {split} split of {type(self).__name__} is empty; check its sizes/fractions")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=EpochRandomSampler(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
