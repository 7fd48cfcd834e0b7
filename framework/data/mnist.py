"""MNIST (or Fashion-MNIST) from the standard IDX files on disk. No download."""

from pathlib import Path

import numpy as np
import torch

from framework.data.files import check_mnist_root, load_mnist
from framework.data.images import ImageDataModule, ImageFormat, split_off
from framework.errors import UserInputError


def check_val_size(val_size: int | float) -> None:
    """Refuse a validation size that can never leave a non-empty split: a count must be a
    positive int, a fraction a float in (0, 1). (Whether a count fits is known only once the
    files are read.)"""
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise UserInputError(f"val_size={val_size!r} must be a count (int) or a fraction (float)")
    if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
        raise UserInputError(f"val_size={val_size!r} must be a fraction in (0, 1) when it is a float")
    if isinstance(val_size, int) and val_size < 1:
        raise UserInputError(f"val_size={val_size!r} must be a positive count when it is an int")


def carve_validation(
    official: dict[str, tuple[np.ndarray, np.ndarray]], val_size: int | float, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Turn the official ``train``/``test`` splits (uint8 images (N, C, H, W), int64 labels)
    into ``train``/``val``/``test`` float images in [0, 1] and int64 labels, the validation
    split carved out of the official training set by a permutation fixed by ``seed``. Splits
    before converting, so the float copy of the training set is made once."""
    images, labels = official["train"]
    kept, held_out = (index.numpy() for index in split_off(len(labels), val_size, seed))
    parts = {
        "train": (images[kept], labels[kept]),
        "val": (images[held_out], labels[held_out]),
        "test": official["test"],
    }
    return {
        name: (torch.from_numpy(x).to(torch.float32).div_(255.0), torch.from_numpy(y).to(torch.int64))
        for name, (x, y) in parts.items()
    }


class MNISTDataModule(ImageDataModule):
    """MNIST 28x28 grey-scale digits (or Fashion-MNIST, same files) read from IDX files,
    gzip-compressed or not, in ``root`` or torchvision's ``root/MNIST/raw``. The validation
    split is carved out of the official 60,000 training images by a permutation fixed by
    ``seed``; the official 10,000 test images are the test split. Images are (N, 1, 28, 28).

    Args:
        root: directory holding ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``; a relative path
            is relative to the working directory. Checked to exist at construction; the files
            are read in ``setup``.
        val_size: count (int) or fraction (float) of the official training images used for
            validation.
        (the rest as in :class:`~framework.data.images.ImageDataModule`)
    """

    def __init__(
        self,
        root: str | Path = "data/mnist",
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
        self.root = check_mnist_root(root)
        self.val_size = val_size

    def load_images(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        official = {}
        for split in ("train", "test"):
            images, labels = load_mnist(self.root, split)
            official[split] = (images[:, None], labels)  # add the channel axis: (N, 1, H, W)
        return carve_validation(official, self.val_size, self.seed)
