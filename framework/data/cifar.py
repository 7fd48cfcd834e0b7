"""CIFAR-10 and CIFAR-100 from the standard python-pickle batches on disk. No download."""

from pathlib import Path
from typing import Literal

import torch

from framework.data.files import check_cifar_root, load_cifar
from framework.data.images import ImageDataModule, ImageFormat, carve_validation, check_val_size

_NUM_LABELS = {(10, "fine"): 10, (100, "fine"): 100, (100, "coarse"): 20}


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 32x32 colour images, (N, 3, 32, 32), read from the python-pickle
    batches (``cifar-10-batches-py`` / ``cifar-100-python`` as extracted from the official
    archives). The validation split is carved out of the official 50,000 training images by a
    permutation fixed by ``seed``; the official 10,000 test images are the test split.

    Args:
        root: the directory holding ``cifar-10-batches-py`` (or ``cifar-100-python``), or that
            directory itself; a relative path is relative to the working directory. Checked to
            exist at construction; the batches are read in ``setup``.
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100.
        label_kind: CIFAR-100's 100 ``fine`` or 20 ``coarse`` (superclass) labels; CIFAR-10 has
            only ``fine``.
        val_size: count (int) or fraction (float) of the official training images used for
            validation.
        (the rest as in :class:`~framework.data.images.ImageDataModule`; ``augment=True`` is
        the standard random crop with padding 4 and horizontal flip)
    """

    def __init__(
        self,
        root: str | Path = "data/cifar10",
        num_classes: Literal[10, 100] = 10,
        label_kind: Literal["fine", "coarse"] = "fine",
        val_size: int | float = 5000,
        format: ImageFormat = "image",
        image_size: int | None = None,
        augment: bool = False,
        permutation_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(format, image_size, augment, permutation_seed, batch_size, eval_batch_size, num_workers, seed)
        check_val_size(val_size)
        self.root = check_cifar_root(root, num_classes, label_kind)
        self.cifar_classes = num_classes
        self.label_kind = label_kind
        self.val_size = val_size

    def load_images(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        official = {
            split: load_cifar(self.root, split, self.cifar_classes, self.label_kind) for split in ("train", "test")
        }
        return carve_validation(official, self.val_size, self.seed)

    @property
    def num_classes(self) -> int:
        """10 for CIFAR-10; 100 for CIFAR-100, or 20 with ``label_kind="coarse"``."""
        return _NUM_LABELS[self.cifar_classes, self.label_kind]
