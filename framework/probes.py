"""Fixed probe batches: the same few training examples at every evaluation of a callback."""

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from framework.errors import UserInputError


def training_probe(trainer: L.Trainer, size: int, seed: int, name: str = "probe_size") -> tuple[torch.Tensor, ...]:
    """``size`` examples of the trainer's training dataset chosen with ``seed`` (the same on every
    rank), collated as the training loader collates them, on the CPU. ``name`` is the option
    that set ``size``, for the error when the dataset is smaller."""
    loader = trainer.train_dataloader
    dataset = loader.dataset
    if size > len(dataset):
        raise UserInputError(f"{name}={size} exceeds the {len(dataset)} training examples")
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return tuple(next(iter(DataLoader(Subset(dataset, chosen.tolist()), batch_size=size, collate_fn=loader.collate_fn))))
