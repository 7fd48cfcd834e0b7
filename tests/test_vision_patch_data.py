"""Patch-pair data: the BMP reader and the Brown/UBC reader on small files written here in the
dataset's layout, their errors, and the embedded digit pairs."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_error

from framework.data.patches import (
    BrownPatchesDataModule,
    DigitPairsDataModule,
    different_class_partners,
    load_brown_pairs,
    load_brown_patches,
    read_bmp,
)
from framework.errors import DataFileError


def bmp_bytes(indices: np.ndarray, palette: np.ndarray, top_down: bool = False) -> bytes:
    """An 8-bit palettised BMP of the palette indices (H, W), top row first in ``indices``;
    ``palette`` is (K, 3) RGB."""
    height, width = indices.shape
    row_bytes = (width + 3) // 4 * 4
    rows = indices if top_down else indices[::-1]
    pixels = b"".join(row.astype(np.uint8).tobytes() + b"\0" * (row_bytes - width) for row in rows)
    colours = b"".join(bytes([b, g, r, 0]) for r, g, b in palette)
    offset = 14 + 40 + len(colours)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, -height if top_down else height, 1, 8, 0, len(pixels), 2835, 2835, len(palette), 0)
    return header + info + colours + pixels


GREYS = np.repeat(np.arange(256)[:, None], 3, axis=1)


def write_scene(root: Path, scene: str, num_patches: int, pairs: list[tuple[int, int]], num_pairs: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write a scene in the Brown layout: sheets of 16x16 patches, info.txt and one pair file.
    Returns the patches (N, 64, 64) and their 3D point ids."""
    rng = np.random.default_rng(seed)
    directory = root / scene
    directory.mkdir(parents=True)
    patches = rng.integers(0, 256, size=(num_patches, 64, 64), dtype=np.uint8)
    point_ids = np.arange(num_patches) // 2  # patches 2k and 2k+1 show the same 3D point
    for sheet_index, start in enumerate(range(0, num_patches, 256)):
        sheet = np.zeros((256, 64, 64), dtype=np.uint8)
        chunk = patches[start : start + 256]
        sheet[: len(chunk)] = chunk
        image = sheet.reshape(16, 16, 64, 64).transpose(0, 2, 1, 3).reshape(1024, 1024)
        (directory / f"patch{sheet_index:04d}.bmp").write_bytes(bmp_bytes(image, GREYS))
    (directory / "info.txt").write_text("".join(f"{p} 0\n" for p in point_ids))
    lines = [f"{a} {point_ids[a]} 0 {b} {point_ids[b]} 0 0\n" for a, b in pairs]
    (directory / f"m50_{num_pairs}_{num_pairs}_0.txt").write_text("".join(lines))
    return patches, point_ids


@pytest.mark.parametrize("top_down", [False, True])
def test_read_bmp_maps_the_palette_and_strips_row_padding(tmp_path, top_down):
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 4, size=(5, 7))  # width 7: each row padded by 1 byte
    palette = np.array([[0, 0, 0], [255, 255, 255], [10, 10, 10], [255, 0, 0]])
    path = tmp_path / "a.bmp"
    path.write_bytes(bmp_bytes(indices, palette, top_down=top_down))
    image = read_bmp(path)
    expected = np.array([0, 255, 10, 76], dtype=np.uint8)[indices]  # pure red has luminance 0.299 * 255
    assert image.dtype == np.uint8 and np.array_equal(image, expected)


def test_read_bmp_refuses_other_formats_naming_the_file(tmp_path):
    path = tmp_path / "sheet.bmp"
    with pytest.raises(DataFileError) as missing:
        read_bmp(path)
    assert_error(missing, path, "8-bit palettised BMP")
    path.write_bytes(b"GIF89a" + b"\0" * 100)
    with pytest.raises(DataFileError) as not_bmp:
        read_bmp(path)
    assert_error(not_bmp, path, "does not start with a BMP header")
    rgb = bytearray(bmp_bytes(np.zeros((2, 2), dtype=int), GREYS))
    rgb[28:30] = struct.pack("<H", 24)
    path.write_bytes(bytes(rgb))
    with pytest.raises(DataFileError) as wrong_depth:
        read_bmp(path)
    assert_error(wrong_depth, path, "24 bits per pixel")
    path.write_bytes(bmp_bytes(np.zeros((4, 4), dtype=int), GREYS)[:-5])
    with pytest.raises(DataFileError) as truncated:
        read_bmp(path)
    assert_error(truncated, path, "truncated")


def test_brown_scene_patches_and_pairs_round_trip(tmp_path):
    pairs = [(0, 1), (0, 2), (300, 301), (256, 299), (3, 2), (299, 297)]  # 302 patches span two sheets
    patches, point_ids = write_scene(tmp_path, "liberty", 302, pairs)
    read_patches, read_ids = load_brown_patches(tmp_path, "liberty")
    assert np.array_equal(read_patches, patches) and np.array_equal(read_ids, point_ids)
    first, second, labels = load_brown_pairs(tmp_path, "liberty", 6, read_ids)
    assert first.tolist() == [a for a, _ in pairs] and second.tolist() == [b for _, b in pairs]
    assert labels.tolist() == [1, -1, 1, -1, 1, -1]


def test_brown_data_module_trains_on_one_scene_and_tests_on_another(tmp_path):
    liberty_pairs = [(i, i + 1 if i % 4 == 0 else i + 2) for i in range(0, 40, 2)]
    liberty, _ = write_scene(tmp_path, "liberty", 44, liberty_pairs, num_pairs=20)
    notredame, _ = write_scene(tmp_path, "notredame", 10, [(0, 1), (2, 5), (6, 7)], num_pairs=3, seed=1)
    data = BrownPatchesDataModule(str(tmp_path), "liberty", "notredame", train_pairs=20, test_pairs=3, val_size=5, batch_size=4)
    data.setup()
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [15, 5, 3]
    mean, std = liberty.astype(np.float64).mean(), liberty.astype(np.float64).std(ddof=1)
    pair, label = data.datasets["test"][1]
    expected = (np.stack([notredame[2], notredame[5]]) - mean) / std
    assert pair.shape == (2, 64, 64) and label.item() == -1.0
    np.testing.assert_allclose(pair.numpy(), expected, rtol=1e-5, atol=1e-5)
    pairs, labels = next(iter(data.train_dataloader()))
    assert pairs.shape == (4, 2, 64, 64) and set(labels.tolist()) <= {-1.0, 1.0}


def test_brown_files_missing_or_corrupt_fail_naming_the_path_and_the_layout(tmp_path):
    with pytest.raises(DataFileError) as no_scene:
        BrownPatchesDataModule(str(tmp_path))
    assert_error(no_scene, tmp_path / "liberty", "info.txt", "patch0000.bmp", "m50_<N>_<N>_0.txt")
    patches, point_ids = write_scene(tmp_path, "liberty", 300, [(0, 1)], num_pairs=1)
    scene = tmp_path / "liberty"

    (scene / "patch0001.bmp").unlink()
    with pytest.raises(DataFileError) as missing_sheet:
        load_brown_patches(tmp_path, "liberty")
    assert_error(missing_sheet, scene / "patch0001.bmp", "info.txt lists 300 patches")

    (scene / "patch0001.bmp").write_bytes(bmp_bytes(np.zeros((64, 64), dtype=int), GREYS))
    with pytest.raises(DataFileError) as small_sheet:
        load_brown_patches(tmp_path, "liberty")
    assert_error(small_sheet, scene / "patch0001.bmp", "64x64", "1024x1024")

    for text, fragment in (("1 2 3 4 5 6\n", "6 columns"), ("0 zero 0 1 0 0 0\n", "not a table of integers"), ("0 0 0 400 0 0 0\n", "refers to patch 400"), ("0 7 0 1 0 0 0\n", "3D point 7 but info.txt gives 0")):
        (scene / "m50_1_1_0.txt").write_text(text)
        with pytest.raises(DataFileError) as bad_pairs:
            load_brown_pairs(tmp_path, "liberty", 1, point_ids)
        assert_error(bad_pairs, scene / "m50_1_1_0.txt", fragment, "patchID1 3DpointID1")

    with pytest.raises(DataFileError) as no_pair_file:
        load_brown_pairs(tmp_path, "liberty", 500000, point_ids)
    assert_error(no_pair_file, scene / "m50_500000_500000_0.txt")

    (scene / "info.txt").unlink()
    with pytest.raises(DataFileError) as no_info:
        load_brown_patches(tmp_path, "liberty")
    assert_error(no_info, scene / "info.txt", "one line per patch")


def test_different_class_partners_never_pick_the_same_class():
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])
    partners = different_class_partners(labels, torch.Generator().manual_seed(0))
    assert (labels[partners] != labels).all()


def test_digit_pairs_are_reproducible_and_match_exactly_without_transform():
    identity = DigitPairsDataModule(max_rotation=0.0, max_scale_change=0.0, max_shift=0.0, pairs_per_image=2, seed=3)
    identity.setup()
    pairs, labels = identity.datasets["val"].tensors
    assert pairs.shape[1:] == (2, 64, 64) and len(pairs) == 4 * 180  # 10% of 1,797 images, 2 + 2 pairs each
    assert (labels == 1).sum() == (labels == -1).sum()
    same = (pairs[:, 0] - pairs[:, 1]).abs().flatten(1).amax(dim=1) < 1e-4
    assert torch.equal(same, labels == 1)  # a matching pair is one image twice; a non-matching pair, two digits

    def train_pairs() -> torch.Tensor:
        data = DigitPairsDataModule(seed=0)
        data.setup()
        return data.datasets["train"].tensors[0]

    first = train_pairs()
    assert torch.equal(first, train_pairs())
    differences = (first[:, 0] - first[:, 1]).abs().flatten(1).amax(dim=1)
    assert (differences > 1e-3).all()  # with the default transform even a matching pair differs
