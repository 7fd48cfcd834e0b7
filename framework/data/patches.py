"""Pairs of 64x64 grey patches labelled matching (+1) or not (-1), for patch-matching networks.

``BrownPatchesDataModule`` reads the Brown/UBC multi-view stereo dataset (Winder & Brown) from
disk; ``DigitPairsDataModule``, the embedded default, builds pairs from scikit-learn's digits.
Batches are ``(pairs, labels)``: pairs float (N, 2, 64, 64), channel 0 the first patch,
standardised with the training patches' mean and std; labels float (N,) in {+1, -1}.
"""

import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from framework.data.base import SplitDataModule
from framework.data.images import DigitsDataModule, check_val_size, split_off
from framework.errors import DataFileError, check_choice, check_positive

PATCH_SIZE = 64
SHEET_SIDE = 16  # a sheet holds 16 x 16 patches
SCENES = ("liberty", "notredame", "yosemite")
PAIR_COLUMNS = 7  # patchID1 3DpointID1 unused1 patchID2 3DpointID2 unused2 unused3

_BMP_LAYOUT = (
    "expected an uncompressed 8-bit palettised BMP: 'BM', a 40-byte (or larger) info header with "
    "1 plane, 8 bits per pixel and compression 0, a palette of up to 256 BGRA entries, then the "
    "rows padded to 4 bytes"
)


def brown_layout(root: Path, scene: str) -> str:
    """The expected layout of one scene of the Brown dataset, for error messages."""
    return (
        f"expected {root / scene}/ to hold info.txt (one line per patch: 3D point id, unused), "
        f"1024x1024 greyscale BMP sheets patch0000.bmp, patch0001.bmp, ... of 16x16 patches of 64x64 "
        f"(row-major), and pair files m50_<N>_<N>_0.txt (columns patchID1 3DpointID1 unused1 patchID2 "
        f"3DpointID2 unused2 unused3)"
    )


def read_bmp(path: str | Path) -> np.ndarray:
    """Read an 8-bit palettised BMP (the format of the Brown patch sheets) into a uint8 grey
    image (H, W), top row first; palette colours become their luminance. Pillow is not a
    dependency of the framework, hence this reader."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"BMP file {path} does not exist; {_BMP_LAYOUT}")
    raw = path.read_bytes()
    if len(raw) < 54 or raw[:2] != b"BM":
        raise DataFileError(f"BMP file {path} does not start with a BMP header; {_BMP_LAYOUT}")
    (data_offset,) = struct.unpack_from("<I", raw, 10)
    header_size, width, height, planes, bits, compression = struct.unpack_from("<IiiHHI", raw, 14)
    (palette_size,) = struct.unpack_from("<I", raw, 46)
    if header_size < 40 or planes != 1 or bits != 8 or compression != 0 or width <= 0 or height == 0:
        raise DataFileError(
            f"BMP file {path} has header size {header_size}, {planes} plane(s), {bits} bits per pixel, "
            f"compression {compression}, size {width}x{height}; {_BMP_LAYOUT}"
        )
    palette_size = palette_size or 256
    palette_start = 14 + header_size
    row_bytes = (width + 3) // 4 * 4
    rows = abs(height)
    if palette_size > 256 or palette_start + 4 * palette_size > data_offset or data_offset + row_bytes * rows > len(raw):
        raise DataFileError(
            f"BMP file {path} is truncated or inconsistent: {len(raw)} bytes for a {palette_size}-entry palette and "
            f"{rows} rows of {row_bytes} bytes from offset {data_offset}; {_BMP_LAYOUT}"
        )
    palette = np.frombuffer(raw, np.uint8, 4 * palette_size, palette_start).reshape(-1, 4)[:, :3].astype(np.float64)
    grey = np.rint(palette @ np.array([0.114, 0.587, 0.299])).astype(np.uint8)  # BGR luminance
    indices = np.frombuffer(raw, np.uint8, row_bytes * rows, data_offset).reshape(rows, row_bytes)[:, :width]
    if indices.max() >= palette_size:
        raise DataFileError(f"BMP file {path} has pixel index {indices.max()} beyond its {palette_size}-entry palette; {_BMP_LAYOUT}")
    image = grey[indices]
    return image[::-1].copy() if height > 0 else image  # positive height: bottom row first


def read_point_ids(root: Path, scene: str) -> np.ndarray:
    """The 3D point id of every patch of a scene, from its ``info.txt``."""
    path = root / scene / "info.txt"
    if not path.is_file():
        raise DataFileError(f"Brown patch index {path} does not exist; {brown_layout(root, scene)}")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataFileError(f"Brown patch index {path} is not a table of integers ({e}); {brown_layout(root, scene)}") from None
    if table.size == 0 or table.shape[1] < 1:
        raise DataFileError(f"Brown patch index {path} is empty; {brown_layout(root, scene)}")
    return table[:, 0]


def load_brown_patches(root: str | Path, scene: str) -> tuple[np.ndarray, np.ndarray]:
    """All patches of a scene as uint8 (N, 64, 64) and their 3D point ids (N,), N being the
    number of lines of ``info.txt``; patch i is in sheet ``i // 256`` at row ``i % 256 // 16``,
    column ``i % 16``."""
    check_choice("scene", scene, SCENES)
    root = Path(root)
    point_ids = read_point_ids(root, scene)
    per_sheet = SHEET_SIDE * SHEET_SIDE
    sheets = []
    for index in range(math.ceil(len(point_ids) / per_sheet)):
        path = root / scene / f"patch{index:04d}.bmp"
        if not path.is_file():
            raise DataFileError(
                f"Brown patch sheet {path} does not exist but info.txt lists {len(point_ids)} patches; {brown_layout(root, scene)}"
            )
        sheet = read_bmp(path)
        side = SHEET_SIDE * PATCH_SIZE
        if sheet.shape != (side, side):
            raise DataFileError(f"Brown patch sheet {path} is {sheet.shape[1]}x{sheet.shape[0]}; {brown_layout(root, scene)}")
        sheets.append(sheet.reshape(SHEET_SIDE, PATCH_SIZE, SHEET_SIDE, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(per_sheet, PATCH_SIZE, PATCH_SIZE))
    return np.concatenate(sheets)[: len(point_ids)], point_ids


def load_brown_pairs(root: str | Path, scene: str, num_pairs: int, point_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of ``m50_<num_pairs>_<num_pairs>_0.txt`` as (first patch ids, second patch ids,
    labels +1 where the two 3D point ids are equal, else -1), checked against ``point_ids``
    (from ``info.txt``)."""
    root = Path(root)
    path = root / scene / f"m50_{num_pairs}_{num_pairs}_0.txt"
    layout = brown_layout(root, scene)
    if not path.is_file():
        raise DataFileError(f"Brown pair file {path} does not exist; {layout}")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataFileError(f"Brown pair file {path} is not a table of integers ({e}); {layout}") from None
    if table.size == 0 or table.shape[1] != PAIR_COLUMNS:
        raise DataFileError(f"Brown pair file {path} has {table.shape[1] if table.size else 0} columns; {layout}")
    first, first_point, second, second_point = table[:, 0], table[:, 1], table[:, 3], table[:, 4]
    for patches, points in ((first, first_point), (second, second_point)):
        if patches.min() < 0 or patches.max() >= len(point_ids):
            raise DataFileError(f"Brown pair file {path} refers to patch {patches.max()} but info.txt lists {len(point_ids)} patches; {layout}")
        disagree = np.flatnonzero(point_ids[patches] != points)
        if disagree.size:
            row = disagree[0]
            raise DataFileError(
                f"Brown pair file {path} gives patch {patches[row]} the 3D point {points[row]} but info.txt gives "
                f"{point_ids[patches[row]]} (line {row + 1}); {layout}"
            )
    return first, second, np.where(first_point == second_point, 1, -1)


class PatchPairs(Dataset):
    """Pairs drawn from one array of patches, standardised on the fly, so a scene's patches are
    held once (as uint8) however many pairs refer to them."""

    def __init__(self, patches: torch.Tensor, first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> None:
        self.patches, self.first, self.second, self.labels = patches, first, second, labels
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = torch.stack([self.patches[self.first[index]], self.patches[self.second[index]]]).float()
        return (pair - self.mean) / self.std, self.labels[index]


class BrownPatchesDataModule(SplitDataModule):
    """The Brown/UBC multi-view stereo patch dataset (liberty, notredame, yosemite) from files
    on disk (layout in :func:`brown_layout`), with the usual protocol: train on the pairs of one
    scene, test on the pairs of another. Nothing is downloaded.

    Args:
        root: the directory holding the scene directories.
        train_scene: scene whose pairs train (and validate).
        test_scene: scene whose pairs test.
        train_pairs: N of the training pair file ``m50_<N>_<N>_0.txt`` (e.g. 100000, 500000).
        test_pairs: N of the test pair file (the benchmark uses 100000).
        val_size: fraction (float) or count (int) of the training pairs held out for validation.
        (the rest as in :class:`~framework.data.base.SplitDataModule`)
    """

    def __init__(
        self,
        root: str = "data/brown",
        train_scene: str = "liberty",
        test_scene: str = "notredame",
        train_pairs: int = 100000,
        test_pairs: int = 100000,
        val_size: int | float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        check_choice("train_scene", train_scene, SCENES)
        check_choice("test_scene", test_scene, SCENES)
        check_positive("train_pairs", train_pairs)
        check_positive("test_pairs", test_pairs)
        check_val_size(val_size)
        self.root = Path(root)
        for scene in dict.fromkeys((train_scene, test_scene)):
            if not (self.root / scene).is_dir():
                raise DataFileError(f"Brown scene directory {self.root / scene} does not exist; {brown_layout(self.root, scene)}")
        self.train_scene, self.test_scene = train_scene, test_scene
        self.train_pairs, self.test_pairs = train_pairs, test_pairs
        self.val_size = val_size

    def _scene(self, scene: str, num_pairs: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
        patches, point_ids = load_brown_patches(self.root, scene)
        first, second, labels = load_brown_pairs(self.root, scene, num_pairs, point_ids)
        return patches, torch.from_numpy(first), torch.from_numpy(second), torch.from_numpy(labels).float()

    def build_datasets(self) -> dict[str, Dataset]:
        train_patches, first, second, labels = self._scene(self.train_scene, self.train_pairs)
        # Mean and std from the histogram of the uint8 pixels: no float copy of the whole scene.
        counts = np.bincount(train_patches.ravel(), minlength=256).astype(np.float64)
        values = np.arange(256.0)
        mean = float(counts @ values / counts.sum())
        std = max(math.sqrt(counts @ (values - mean) ** 2 / (counts.sum() - 1)), 1e-6)
        patches = torch.from_numpy(train_patches)
        kept, held_out = split_off(len(labels), self.val_size, self.seed)
        datasets: dict[str, Dataset] = {
            split: PatchPairs(patches, first[index], second[index], labels[index], mean, std) for split, index in (("train", kept), ("val", held_out))
        }
        test_patches, *test_pairs = self._scene(self.test_scene, self.test_pairs)
        datasets["test"] = PatchPairs(torch.from_numpy(test_patches), *test_pairs, mean, std)
        return datasets


def random_affine(images: torch.Tensor, generator: torch.Generator, max_rotation: float, max_scale_change: float, max_shift: float) -> torch.Tensor:
    """Each image (N, C, H, W) under its own random rotation (degrees), scaling and shift
    (fraction of the side), drawn uniformly from ``generator``; uncovered pixels become 0."""
    n = len(images)

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = torch.deg2rad(uniform(max_rotation))
    scale = 1 + uniform(max_scale_change)
    shift = torch.stack([uniform(2 * max_shift), uniform(2 * max_shift)], dim=1)  # grid coordinates span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], dim=1), torch.stack([sin, cos], dim=1)], dim=1)
    theta = torch.cat([theta, shift[:, :, None]], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def different_class_partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each example, the index of a random example of another class."""
    partners = torch.randint(len(labels), (len(labels),), generator=generator)
    same = labels[partners] == labels
    while same.any():
        partners[same] = torch.randint(len(labels), (int(same.sum()),), generator=generator)
        same = labels[partners] == labels
    return partners


class DigitPairsDataModule(SplitDataModule):
    """Patch pairs from scikit-learn's bundled digits, upsampled to 64x64: a matching pair is a
    digit image and the same image under a random affine transform, a non-matching pair a digit
    image and a transformed image of a different digit. The images are split into train/val/test
    as in :class:`~framework.data.DigitsDataModule` before pairing, so no image is shared across
    splits; the pairs are fixed by ``seed``. No download: the embedded default.

    Args:
        pairs_per_image: matching pairs, and as many non-matching, per image.
        max_rotation: largest rotation of the transform, in degrees.
        max_scale_change: largest relative change of scale.
        max_shift: largest shift, as a fraction of the side.
        val_size, test_size: as in :class:`~framework.data.DigitsDataModule`.
        (the rest as in :class:`~framework.data.base.SplitDataModule`)
    """

    def __init__(
        self,
        pairs_per_image: int = 1,
        max_rotation: float = 15.0,
        max_scale_change: float = 0.1,
        max_shift: float = 0.1,
        val_size: int | float = 0.1,
        test_size: int | float = 0.2,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        check_positive("pairs_per_image", pairs_per_image)
        for name, value in (("max_rotation", max_rotation), ("max_scale_change", max_scale_change), ("max_shift", max_shift)):
            check_positive(name, value, allow_zero=True)
        self.pairs_per_image = pairs_per_image
        self.max_rotation, self.max_scale_change, self.max_shift = max_rotation, max_scale_change, max_shift
        self.val_size, self.test_size = val_size, test_size

    def _pairs(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images = F.interpolate(images, size=(PATCH_SIZE, PATCH_SIZE), mode="bilinear", align_corners=False)
        partners = []
        for _ in range(self.pairs_per_image):
            partners += [images, images[different_class_partners(labels, generator)]]
        # Image-major order (image 0: match, non-match, ...; image 1: ...), so any prefix of an
        # unshuffled split, e.g. under limit_val_batches, holds both classes.
        partners = torch.stack(partners, dim=1).flatten(0, 1)
        transformed = random_affine(partners, generator, self.max_rotation, self.max_scale_change, self.max_shift)
        anchors = images.repeat_interleave(2 * self.pairs_per_image, dim=0)
        matching = torch.tensor([1.0, -1.0]).repeat(len(images) * self.pairs_per_image)
        return torch.cat([anchors, transformed], dim=1), matching

    def build_datasets(self) -> dict[str, Dataset]:
        splits = DigitsDataModule(val_size=self.val_size, test_size=self.test_size, seed=self.seed).load_images()
        pairs = {}
        for index, (split, (images, labels)) in enumerate(splits.items()):
            state = np.random.SeedSequence([self.seed, index]).generate_state(1, dtype=np.uint64)[0]
            pairs[split] = self._pairs(images, labels, torch.Generator().manual_seed(int(state)))
        train = pairs["train"][0]
        mean, std = train.mean(), train.std().clamp_min(1e-6)
        return {split: TensorDataset((x - mean) / std, y) for split, (x, y) in pairs.items()}
