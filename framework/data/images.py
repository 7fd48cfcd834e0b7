"""Image classification data modules, with the image shown as an image or as a pixel sequence."""

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from framework.data.base import SplitDataModule
from framework.errors import UserInputError, check_choice

ImageFormat = Literal["image", "sequence", "permuted"]
FORMATS = ("image", "sequence", "permuted")


def split_off(num_examples: int, size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(num_examples)`` into (kept, split-off) index sets with a seeded permutation;
    ``size`` is a count, or a fraction when it is a float in (0, 1)."""
    count = round(size * num_examples) if isinstance(size, float) else size
    if not 0 < count < num_examples:
        raise UserInputError(f"split size {size!r} must leave both parts non-empty (out of {num_examples} examples)")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return order[count:].sort().values, order[:count].sort().values


def random_crop_flip(images: torch.Tensor, fill: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The CIFAR augmentation: pad with ``fill`` (one value per channel: black, once
    standardised), crop back at a random offset, flip half the images.

    Draws from the global RNG, which the tasks checkpoint, so a resumed run draws the same crops.
    """
    n, _, h, w = images.shape
    padded = F.pad(images - fill.view(1, -1, 1, 1), (padding,) * 4) + fill.view(1, -1, 1, 1)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    cropped = padded[batch, channels, rows, cols]
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


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


class ImageDataModule(SplitDataModule):
    """Base of the image data modules. Subclasses return float images in [0, 1] from
    ``load_images``; this class carves the validation split, resizes, standardises with the
    training set's per-channel statistics and converts to the requested format.

    Formats:
        ``image``: batches ``(x, y)``, x of shape (N, C, H, W).
        ``sequence``: batches ``(x, y, mask)``, x of shape (N, H*W, C) in row-major pixel order,
            y the label repeated at every step, mask true at the last step only (the label is
            predicted after the whole sequence).
        ``permuted``: as ``sequence`` with the pixel order permuted by a permutation fixed by
            ``permutation_seed``.

    Args:
        format: ``image``, ``sequence`` or ``permuted``.
        image_size: resize (bilinear) to this square size, e.g. 32 for CIFAR-style networks;
            ``None`` keeps the native size.
        augment: random crop (padding 4) and horizontal flip of training images.
        permutation_seed: seed of the pixel permutation of the ``permuted`` format.
    """

    def __init__(
        self,
        format: ImageFormat = "image",
        image_size: int | None = None,
        augment: bool = False,
        permutation_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        check_choice("format", format, FORMATS)
        if image_size is not None and image_size < 1:
            raise UserInputError(f"image_size={image_size} must be a positive number of pixels or null")
        if augment and format != "image":
            raise UserInputError(f"augment=True needs format='image', got format={format!r}")
        self.format = format
        self.image_size = image_size
        self.augment = augment
        self.permutation_seed = permutation_seed

    def load_images(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return ``{"train": (images, labels), "val": ..., "test": ...}``; images float in
        [0, 1] of shape (N, C, H, W), labels int64."""
        raise NotImplementedError

    def build_datasets(self) -> dict[str, Dataset]:
        splits = self.load_images()
        if self.image_size is not None:
            splits = {
                name: (F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False), y)
                for name, (x, y) in splits.items()
            }
        train_images = splits["train"][0]
        mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
        std = train_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.black = (-mean / std).flatten()
        return {name: self._dataset((x - mean) / std, y) for name, (x, y) in splits.items()}

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        if self.format == "image":
            return TensorDataset(images, labels)
        n, c, h, w = images.shape
        sequence = images.reshape(n, c, h * w).transpose(1, 2).contiguous()
        if self.format == "permuted":
            order = torch.randperm(h * w, generator=torch.Generator().manual_seed(self.permutation_seed))
            sequence = sequence[:, order]
        # Expanded views: one label and one mask row per image in memory, not one per pixel.
        targets = labels[:, None].expand(n, h * w)
        last_step = torch.zeros(h * w, dtype=torch.bool)
        last_step[-1] = True
        return TensorDataset(sequence, targets, last_step.expand(n, h * w))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment and self.trainer is not None and self.trainer.training:
            images, labels = batch
            return random_crop_flip(images, self.black.to(images.device)), labels
        return batch

    @property
    def num_classes(self) -> int:
        """Number of classes (10 unless a subclass says otherwise)."""
        return 10


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), split into
    train/val/test by a permutation fixed by ``seed``. No download: the data ship with
    scikit-learn. The embedded default data of the framework.

    Args:
        val_size: fraction (float) or count (int) of all images used for validation.
        test_size: fraction (float) or count (int) of all images held out for testing.
        (the rest as in :class:`ImageDataModule`)
    """

    def __init__(
        self,
        val_size: int | float = 0.1,
        test_size: int | float = 0.2,
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
        self.val_size = val_size
        self.test_size = test_size

    def load_images(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        rest, test = split_off(len(labels), self.test_size, self.seed)
        val_count = round(self.val_size * len(labels)) if isinstance(self.val_size, float) else self.val_size
        train_in_rest, val_in_rest = split_off(len(rest), val_count, self.seed + 1)
        train, val = rest[train_in_rest], rest[val_in_rest]
        return {name: (images[idx], labels[idx]) for name, idx in (("train", train), ("val", val), ("test", test))}
