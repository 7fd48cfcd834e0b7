"""Shared test helpers: writers of tiny data files in exactly the standard formats (raw and
gzip IDX, CIFAR protocol-2 pickles with bytes keys), and running ``python -m framework`` as a
user would."""

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.loggers import Logger

IDX_TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray, type_code: int | None = None) -> bytes:
    """Encode `array` as an IDX file: magic, big-endian dims, big-endian data."""
    dtype = array.dtype
    code = IDX_TYPE_CODES[f"{dtype.kind}{dtype.itemsize}"] if type_code is None else type_code
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(directory: Path, split: str, n: int, gz: bool = False, hw: tuple[int, int] = (28, 28), seed: int = 0):
    """Write one MNIST split into `directory`; return the arrays written."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    return images, labels


def write_pickle(path: Path, obj) -> Path:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


def cifar_batch(n: int, rng: np.random.Generator, **labels: list[int]) -> dict:
    """A batch dict shaped like the real files: bytes keys, uint8 (n, 3072) data, label lists."""
    batch = {b"batch_label": b"testing batch", b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
    batch.update({k.encode(): v for k, v in labels.items()})
    batch[b"filenames"] = [f"img_{i}.png".encode() for i in range(n)]
    return batch


def write_cifar10(directory: Path, sizes=(3, 4, 2, 5, 3), test_size=4) -> dict[str, dict]:
    """Write cifar-10-batches-py contents into `directory`; return the batches by file name."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for name, n in zip(names, (*sizes, test_size)):
        batches[name] = cifar_batch(n, rng, labels=rng.integers(0, 10, size=n).tolist())
        write_pickle(directory / name, batches[name])
    write_pickle(directory / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return batches


def write_cifar100(directory: Path) -> dict[str, dict]:
    rng = np.random.default_rng(2)
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name, n in (("train", 7), ("test", 3)):
        fine = rng.integers(0, 100, size=n).tolist()
        batches[name] = cifar_batch(n, rng, fine_labels=fine, coarse_labels=[f // 5 for f in fine])
        write_pickle(directory / name, batches[name])
    write_pickle(directory / "meta", {b"fine_label_names": [], b"coarse_label_names": []})
    return batches


def assert_error(exc_info: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(exc_info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def run_framework(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m framework ...`` in ``cwd``, W&B offline, no progress bar; asserts success.

    WANDB_SERVICE is not passed on: set by this process's own W&B runs, it would make the child
    hand its run to this process's wandb-core, which writes the run file after the child exits.
    """
    inherited = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    env = {**inherited, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "framework", *args, "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class MemoryLogger(Logger):
    """Keeps every (step, metrics) it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass
