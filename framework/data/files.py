"""Readers for standard dataset files already on disk: MNIST / Fashion-MNIST IDX files and
CIFAR-10 / CIFAR-100 python-pickle batches.

Pure numpy (no Lightning, no torchvision, no downloads), so data modules and scripts can share
them and a missing or malformed file fails with a `DataFileError` that names the path and the
layout that was expected instead of a traceback from deep inside a parser.
"""

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from framework.errors import DataFileError, UserInputError, check_choice

__all__ = ["read_idx", "load_mnist", "load_cifar", "check_mnist_root", "check_cifar_root"]

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type code -> element dtype; multi-byte types are stored big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_LAYOUT = (
    "expected an IDX file (raw or gzip): bytes 0x00 0x00, a type code (0x08 ubyte, 0x09 byte, "
    "0x0B short, 0x0C int, 0x0D float, 0x0E double), a dimension count, one big-endian u32 per "
    "dimension, then the data"
)

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    100: ("cifar-100-python", {"train": ["train"], "test": ["test"]}),
}
# (num_classes, label_kind) -> (label key in a batch, number of distinct labels)
_CIFAR_LABEL_KEYS = {
    (10, "fine"): ("labels", 10),
    (100, "fine"): ("fine_labels", 100),
    (100, "coarse"): ("coarse_labels", 20),
}
_CIFAR_IMAGE_SHAPE = (3, 32, 32)
# The only globals a CIFAR batch refers to: numpy's array reconstruction (numpy 1.x and 2.x
# module names) and `_codecs.encode`, which protocol-2 pickles written by Python 3 use for bytes.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not, judged by its magic bytes) into a native-endian
    array shaped as the header declares, so MNIST-style files load without torchvision."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"IDX file {path} does not exist; {_IDX_LAYOUT}")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataFileError(f"IDX file {path} is a corrupt gzip file ({e}); {_IDX_LAYOUT}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataFileError(f"IDX file {path} has bad magic bytes {raw[:4].hex(' ')}; {_IDX_LAYOUT}")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataFileError(f"IDX file {path} has unknown type code 0x{type_code:02X}; {_IDX_LAYOUT}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFileError(
            f"IDX file {path} is truncated inside its header ({len(raw)} bytes for {ndim} dimensions); {_IDX_LAYOUT}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header_len
    if got != expected:
        problem = "truncated" if got < expected else "longer than its header declares"
        raise DataFileError(
            f"IDX file {path} is {problem}: dimensions {list(dims)} of {dtype.name} need {expected} data bytes, "
            f"found {got}; {_IDX_LAYOUT}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def _require_directory(what: str, root: Path, layout: str) -> None:
    """Refuse a `root` that is not an existing directory, naming it (and, when relative, where it
    resolved from the working directory) and the expected layout."""
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (resolved to {root.absolute()})"
        raise DataFileError(f"{what} root {root}{where} is not a directory; {layout}")


def _mnist_layout(root: Path, splits: tuple[str, ...]) -> str:
    names = [f"{name}[.gz]" for split in splits for name in _MNIST_FILES[split]]
    return f"expected the IDX files {', '.join(names)} in {root} or {root / 'MNIST' / 'raw'}"


def check_mnist_root(root: str | Path) -> Path:
    """Refuse (with `DataFileError`, naming the path and the expected files) an MNIST `root`
    that is not an existing directory; a cheap check for constructors, which leave reading the
    files to `load_mnist`. Returns `root` as a Path."""
    root = Path(root)
    _require_directory("MNIST", root, _mnist_layout(root, tuple(_MNIST_FILES)))
    return root


def _find_mnist_files(root: Path, split: str) -> tuple[Path, Path]:
    """Locate the split's image and label IDX files, both from the same directory: `root` or
    torchvision's `root/MNIST/raw`; uncompressed files win over `.gz` when both exist."""
    expected = _mnist_layout(root, (split,))
    _require_directory("MNIST", root, expected)
    names = _MNIST_FILES[split]
    for directory in (root, root / "MNIST" / "raw"):
        found = []
        for name in names:
            candidates = [directory / name, directory / f"{name}.gz"]
            found.append(next((c for c in candidates if c.is_file()), None))
        if all(found):
            return found[0], found[1]
    raise DataFileError(f"no MNIST {split} files found; {expected}")


def load_mnist(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST or Fashion-MNIST split ("train" or "test") from its IDX files as uint8
    images (N, H, W) and int64 labels (N,), checking that they agree."""
    check_choice("split", split, _MNIST_FILES)
    images_path, labels_path = _find_mnist_files(Path(root), split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataFileError(
            f"MNIST images file {images_path} holds {images.dtype.name} of shape {images.shape}; "
            "expected ubyte (type 0x08) images with 3 dimensions (N, H, W)"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataFileError(
            f"MNIST labels file {labels_path} holds {labels.dtype.name} of shape {labels.shape}; "
            "expected ubyte (type 0x08) labels with 1 dimension (N,)"
        )
    if len(images) != len(labels):
        raise DataFileError(
            f"MNIST {split} files disagree: {images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels; expected one label per image"
        )
    if labels.size and labels.max() > 9:
        raise DataFileError(f"MNIST labels file {labels_path} has label {labels.max()}; expected labels in 0..9")
    return images, labels.astype(np.int64)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs, so a stray or hostile file
    in the data directory cannot run code while being read."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str, num_labels: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR pickle batch into uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    if not path.is_file():
        raise DataFileError(f"CIFAR batch {path} does not exist; {layout}")
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a non-pickle can fail in many ways (UnpicklingError, EOFError, ValueError, ...)
        raise DataFileError(
            f"CIFAR batch {path} is not a readable pickle ({type(e).__name__}: {e}); {layout}"
        ) from None
    if not isinstance(batch, dict):
        raise DataFileError(
            f"CIFAR batch {path} holds a {type(batch).__name__}; expected a dict with keys data, {label_key}"
        )
    # Python 2 pickles load with bytes keys; accept str keys from files re-pickled under Python 3.
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [key for key in ("data", label_key) if key not in batch]
    if missing:
        raise DataFileError(
            f"CIFAR batch {path} lacks key(s) {missing} (has {sorted(map(str, batch))}); "
            f"expected a dict with keys data, {label_key}"
        )
    data = np.asarray(batch["data"])
    row = int(np.prod(_CIFAR_IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        raise DataFileError(
            f"CIFAR batch {path} has data of {data.dtype.name} {data.shape}; expected uint8 (N, {row}), "
            "each row a 3x32x32 image stored channel-first"
        )
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataFileError(f"CIFAR batch {path} has non-integer {label_key} ({e}); expected a list of ints") from None
    if labels.shape != (len(data),):
        raise DataFileError(
            f"CIFAR batch {path} has {label_key} of shape {labels.shape} for {len(data)} images; "
            "expected one label per image"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise DataFileError(
            f"CIFAR batch {path} has {label_key} in {labels.min()}..{labels.max()}; expected 0..{num_labels - 1}"
        )
    return data.reshape(-1, *_CIFAR_IMAGE_SHAPE), labels


def _cifar_layout(root: Path, num_classes: int, label_kind: str) -> str:
    label_key, _ = _CIFAR_LABEL_KEYS[num_classes, label_kind]
    dirname, files = _CIFAR_LAYOUT[num_classes]
    return (
        f"expected the CIFAR-{num_classes} python-pickle batches {', '.join(files['train'] + files['test'])} "
        f"(dicts with uint8 data (N, 3072) and {label_key}) in {root / dirname} or {root}"
    )


def check_cifar_root(root: str | Path, num_classes: int = 10, label_kind: str = "fine") -> Path:
    """Refuse a bad `num_classes`/`label_kind` (`UserInputError`) or a CIFAR `root` that is not
    an existing directory (`DataFileError`, naming the path and the expected batches); a cheap
    check for constructors, which leave reading the batches to `load_cifar`. Returns `root` as
    a Path."""
    check_choice("num_classes", num_classes, _CIFAR_LAYOUT)
    check_choice("label_kind", label_kind, ("fine", "coarse"))
    if (num_classes, label_kind) not in _CIFAR_LABEL_KEYS:
        raise UserInputError(f"label_kind={label_kind!r} needs num_classes=100; CIFAR-10 has only fine labels")
    root = Path(root)
    _require_directory(f"CIFAR-{num_classes}", root, _cifar_layout(root, num_classes, label_kind))
    return root


def load_cifar(
    root: str | Path, split: str, num_classes: int = 10, label_kind: str = "fine"
) -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-10 or CIFAR-100 split ("train" or "test") from the python-pickle batches as
    uint8 images (N, 3, 32, 32) and int64 labels (N,).

    `root` is the directory holding `cifar-10-batches-py` / `cifar-100-python`, or that directory
    itself. `label_kind` picks CIFAR-100's 100 "fine" or 20 "coarse" labels; CIFAR-10 has only "fine".
    """
    check_choice("split", split, ("train", "test"))
    root = check_cifar_root(root, num_classes, label_kind)
    label_key, num_labels = _CIFAR_LABEL_KEYS[num_classes, label_kind]
    dirname, files = _CIFAR_LAYOUT[num_classes]
    directory = root / dirname if (root / dirname).is_dir() else root
    layout = _cifar_layout(root, num_classes, label_kind)
    parts = [_read_cifar_batch(directory / name, label_key, num_labels, layout) for name in files[split]]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
