"""Relational tasks built from digit images, with held-out digit classes for the
out-of-distribution test: same/different (are two handwritten digits the same digit?)."""

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from framework.data.base import SplitDataModule
from framework.data.images import split_off
from framework.errors import UserInputError, check_positive

DIGIT_CLASSES = range(10)


def same_different_pairs(images: torch.Tensor, labels: torch.Tensor, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of two distinct images from ``images`` (M, D): half of the same class (label 1),
    half of two different classes (label 0), classes drawn uniformly. Returns objects
    (num_examples, 2, D) and labels (num_examples,)."""
    classes = labels.unique()
    pools = [torch.nonzero(labels == c).flatten() for c in classes]
    if len(classes) < 2 or min(len(pool) for pool in pools) < 2:
        raise UserInputError("same/different pairs need at least 2 classes with at least 2 images each")
    same = torch.arange(num_examples) % 2 == 0
    first_class = torch.randint(len(classes), (num_examples,), generator=generator)
    # A different class: shift by 1..(classes - 1) positions, uniform over the other classes.
    shift = torch.randint(1, len(classes), (num_examples,), generator=generator)
    second_class = torch.where(same, first_class, (first_class + shift) % len(classes))
    objects = torch.empty(num_examples, 2, images.shape[1])
    for i in range(num_examples):
        pool_a, pool_b = pools[first_class[i]], pools[second_class[i]]
        a = torch.randint(len(pool_a), (), generator=generator)
        # For a same pair, the second image is another one of the class.
        b = (a + torch.randint(1, len(pool_a), (), generator=generator)) % len(pool_a) if same[i] else torch.randint(len(pool_b), (), generator=generator)
        objects[i, 0], objects[i, 1] = images[pool_a[a]], images[pool_b[b]]
    return objects, same.long()


class SameDifferentDataModule(SplitDataModule):
    """Same/different on scikit-learn's bundled 8x8 digits (no download): each example is two
    digit images, flattened to 64 features (batches ``(x, y)``, x of shape (N, 2, 64)), labelled
    1 when they show the same digit. Half the examples are "same".

    The digits in ``held_out_classes`` never appear in training: ``train`` and ``val`` pair
    images of the other digits (disjoint images: ``val`` measures in-distribution
    generalisation), ``test`` pairs images of the held-out digits only (out of distribution).

    Args:
        held_out_classes: the digits kept for the test split (at least 2, leaving at least 2).
        val_images: fraction of the training digits' images kept for ``val`` pairs.
        train_size, val_size, test_size: number of pairs of each split.
        (the rest as in :class:`SplitDataModule`)
    """

    def __init__(
        self,
        held_out_classes: Sequence[int] = (7, 8, 9),
        val_images: float = 0.2,
        train_size: int = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        held_out = sorted(set(held_out_classes))
        if not set(held_out) <= set(DIGIT_CLASSES) or not 2 <= len(held_out) <= len(DIGIT_CLASSES) - 2:
            raise UserInputError(f"held_out_classes={list(held_out_classes)} must be 2 to 8 distinct digits in 0..9")
        if not 0.0 < val_images < 1.0:
            raise UserInputError(f"val_images={val_images} must be a fraction in (0, 1)")
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            check_positive(name, size)
        self.held_out_classes = held_out
        self.val_images = val_images
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def build_datasets(self) -> dict[str, Dataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        held_out = torch.isin(labels, torch.tensor(self.held_out_classes))
        training_images = torch.nonzero(~held_out).flatten()
        train, val = (training_images[index] for index in split_off(len(training_images), self.val_images, self.seed))
        pools = {"train": train, "val": val, "test": torch.nonzero(held_out).flatten()}
        datasets = {}
        for offset, (split, pool) in enumerate(pools.items()):
            generator = torch.Generator().manual_seed(self.seed * 3 + offset)
            datasets[split] = TensorDataset(*same_different_pairs(images[pool], labels[pool], self.sizes[split], generator))
        return datasets

    @property
    def num_classes(self) -> int:
        """Two: different (0) and same (1)."""
        return 2
