"""Stroop digits: digit images coloured congruently (the colour of their own class) or not.

The Stroop task of Kamanda's thesis: in training most digits wear the colour of their class, so
colour is a cheap shortcut to the label; at test time every digit wears another class's colour,
so only a network that reads the shape (the costly computation) keeps its accuracy.
"""

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from framework.data.files import check_mnist_root, load_mnist
from framework.data.images import DigitsDataModule, ImageFormat, carve_validation, check_val_size
from framework.errors import UserInputError, check_choice

# The fixed colour map: RGB in [0, 1] of the colour of each class (matplotlib's "tab10").
CLASS_COLOURS = torch.tensor(
    [
        [0.122, 0.467, 0.706],  # 0 blue
        [1.000, 0.498, 0.055],  # 1 orange
        [0.173, 0.627, 0.173],  # 2 green
        [0.839, 0.153, 0.157],  # 3 red
        [0.580, 0.404, 0.741],  # 4 purple
        [0.549, 0.337, 0.294],  # 5 brown
        [0.890, 0.467, 0.761],  # 6 pink
        [0.498, 0.498, 0.498],  # 7 grey
        [0.737, 0.741, 0.133],  # 8 olive
        [0.090, 0.745, 0.812],  # 9 cyan
    ]
)
SPLITS = ("train", "val", "test")
SOURCES = ("digits", "mnist")


def check_fraction(name: str, value: float) -> None:
    """Refuse a fraction outside [0, 1], naming the key."""
    if not 0.0 <= value <= 1.0:
        raise UserInputError(f"{name}={value!r} must be a fraction in [0, 1]")


def assign_colours(labels: torch.Tensor, congruent_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose a colour class per example: exactly ``round(congruent_fraction * N)`` examples,
    chosen at random, get their own class; each other one gets one of the other classes,
    uniformly. Returns ``(colour_classes, congruent)``, int64 and bool of shape (N,)."""
    num_examples = len(labels)
    num_classes = len(CLASS_COLOURS)
    congruent = torch.zeros(num_examples, dtype=torch.bool)
    congruent[torch.randperm(num_examples, generator=generator)[: round(congruent_fraction * num_examples)]] = True
    shift = torch.randint(1, num_classes, (num_examples,), generator=generator)
    colour_classes = torch.where(congruent, labels, (labels + shift) % num_classes)
    return colour_classes, congruent


def colourise(images: torch.Tensor, colour_classes: torch.Tensor) -> torch.Tensor:
    """Grey images (N, 1, H, W) in [0, 1] times the RGB colour of each example's colour class:
    colour images (N, 3, H, W) in [0, 1]."""
    return images * CLASS_COLOURS[colour_classes][:, :, None, None]


def colour_signature(inputs: torch.Tensor, black: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(N, 3) unit vectors: the summed offset from black of each input's pixels. Standardising
    and resizing act per channel and linearly, so every image coloured with one colour has the
    same signature, whatever its digit."""
    shape = [1] * inputs.dim()
    shape[channel_dim] = -1
    offsets = (inputs - black.to(inputs).view(shape)).movedim(channel_dim, 1).flatten(2).sum(dim=2)
    return F.normalize(offsets, dim=1)


class StroopDigitsDataModule(DigitsDataModule):
    """Digits each coloured with the colour of a class of :data:`CLASS_COLOURS`; the label
    stays the digit. ``source: digits`` takes the bundled 8x8 digits (split as
    :class:`DigitsDataModule`), ``source: mnist`` the MNIST IDX files in ``root`` (split as
    :class:`MNISTDataModule`: validation carved out of the official training set, the official
    test set; ``test_size`` unused).

    Batches are ``(x, y)`` as for any image data module, so :class:`ClassificationTask` works
    unchanged. Whether each example is congruent is kept per split, in dataset order, in
    ``congruent[split]`` (and its colour class in ``colour_classes[split]``), and
    :meth:`example_groups` tells it for any batch (in any order, on any rank) by reading the
    colour back from the inputs.

    Args:
        congruent_fraction: fraction of the training (and validation) images coloured with
            their own class's colour; the rest get another class's colour, uniformly.
        test_congruent_fraction: the same for the test set (0: all incongruent).
        source: ``digits`` (bundled, no file) or ``mnist`` (IDX files in ``root``).
        root: the MNIST directory when ``source: mnist``.
        (the rest as in :class:`DigitsDataModule`; ``seed`` also fixes the colours)
    """

    def __init__(
        self,
        congruent_fraction: float = 0.8,
        test_congruent_fraction: float = 0.0,
        source: Literal["digits", "mnist"] = "digits",
        root: str | Path = "data/mnist",
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
        super().__init__(val_size, test_size, format, image_size, augment, permutation_seed, batch_size, eval_batch_size, num_workers, seed)
        check_fraction("congruent_fraction", congruent_fraction)
        check_fraction("test_congruent_fraction", test_congruent_fraction)
        check_choice("source", source, SOURCES)
        if source == "mnist":
            check_val_size(val_size)
            root = check_mnist_root(root)
        self.source, self.root = source, root
        self.colour_signatures: torch.Tensor | None = None
        self.congruent_fractions = {"train": congruent_fraction, "val": congruent_fraction, "test": test_congruent_fraction}
        self.congruent: dict[str, torch.Tensor] = {}
        self.colour_classes: dict[str, torch.Tensor] = {}

    def load_grey_images(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The grey digits of ``source``, float in [0, 1], (N, 1, H, W), per split."""
        if self.source == "digits":
            return super().load_images()
        official = {}
        for split in ("train", "test"):
            images, labels = load_mnist(self.root, split)
            official[split] = (images[:, None], labels)
        return carve_validation(official, self.val_size, self.seed)

    def load_images(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        grey = self.load_grey_images()
        coloured = {}
        for index, split in enumerate(SPLITS):
            images, labels = grey[split]
            # One independent stream per split, a function of (seed, split) alone.
            state = np.random.SeedSequence([self.seed, index]).generate_state(1, dtype=np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state))
            colour_classes, congruent = assign_colours(labels, self.congruent_fractions[split], generator)
            self.colour_classes[split], self.congruent[split] = colour_classes, congruent
            coloured[split] = (colourise(images, colour_classes), labels)
        return coloured

    def build_datasets(self) -> dict[str, Dataset]:
        datasets = super().build_datasets()
        # One signature per colour, read from the training inputs as the model sees them.
        signatures = colour_signature(datasets["train"].tensors[0], self.black, self.channel_dim)
        colours = self.colour_classes["train"]
        self.colour_signatures = F.normalize(torch.stack([signatures[colours == k].mean(dim=0) for k in range(len(CLASS_COLOURS))]), dim=1)
        return datasets

    @property
    def channel_dim(self) -> int:
        """Where the colour channels are in a batch: 1 for images, 2 for pixel sequences."""
        return 1 if self.format == "image" else 2

    def example_groups(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"congruent": (N,) bool, "incongruent": (N,) bool}`` of a batch as the loaders give
        it: the colour read back from the inputs (the nearest colour signature) against the
        label. Needs ``setup`` first."""
        if self.colour_signatures is None:
            raise RuntimeError("StroopDigitsDataModule.example_groups needs setup() first")
        signatures = colour_signature(inputs, self.black.to(inputs.device), self.channel_dim)
        colours = (signatures @ self.colour_signatures.to(signatures).T).argmax(dim=1)
        labels = targets if targets.dim() == 1 else targets[:, -1]
        congruent = colours == labels
        return {"congruent": congruent, "incongruent": ~congruent}
