"""MNIST (or Fashion-MNIST) from the standard IDX files on disk. No download."""

from pathlib import Path

import torch

from framework.data.files import check_mnist_root, load_mnist
from framework.data.images import ImageDataModule, ImageFormat, carve_validation, check_val_size


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
