"""Tests for framework.data.files: the IDX and CIFAR-pickle readers, on tiny files written (by
tests/helpers.py and here) in exactly the standard formats (raw and gzip IDX, protocol-2 pickles
with bytes keys)."""

import datetime
import gzip
import pickle
import struct

import numpy as np
import pytest
from helpers import assert_error, idx_bytes, write_cifar10, write_cifar100, write_idx, write_mnist, write_pickle

from framework.data.files import load_cifar, load_mnist, read_idx
from framework.errors import DataFileError, UserInputError


# --- read_idx -------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_read_idx_round_trips_every_type(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    if dtype.startswith("f"):
        array = rng.normal(size=(4, 3, 2)).astype(dtype) * 1e3
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=(4, 3, 2), endpoint=True, dtype=dtype)
    out = read_idx(write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array, gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == (4, 3, 2)
    np.testing.assert_array_equal(out, array)
    out[0] = 0  # a writable copy, not a view of the read-only file bytes


def test_read_idx_multibyte_is_big_endian(tmp_path):
    path = tmp_path / "ints"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", 258, -2))
    np.testing.assert_array_equal(read_idx(path), [258, -2])


def test_read_idx_decides_gzip_by_magic_not_suffix(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "compressed-no-suffix", array, gz=True)), array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "raw-with-suffix.gz", array, gz=False)), array)


def test_read_idx_zero_items(tmp_path):
    out = read_idx(write_idx(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8)))
    assert out.shape == (0, 28, 28)


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(DataFileError) as e:
        read_idx(path)
    assert_error(e, path, "does not exist", "big-endian")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_bad_magic(tmp_path, gz):
    path = tmp_path / "bad"
    data = b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataFileError) as e:
        read_idx(path)
    assert_error(e, path, "bad magic", "0x00 0x00")


def test_read_idx_too_short_for_magic(tmp_path):
    path = tmp_path / "tiny"
    path.write_bytes(b"\x00")
    with pytest.raises(DataFileError) as e:
        read_idx(path)
    assert_error(e, path, "bad magic")


def test_read_idx_unknown_type_code(tmp_path):
    path = tmp_path / "weird"
    path.write_bytes(bytes([0, 0, 0x0A, 1]) + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataFileError) as e:
        read_idx(path)
    assert_error(e, path, "unknown type code 0x0A", "0x08 ubyte")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_data(tmp_path, gz):
    path = tmp_path / "trunc"
    data = idx_bytes(np.zeros((3, 4), np.int32))[:-5]
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataFileError) as e:
        read_idx(path)
    assert_error(e, path, "truncated", "[3, 4]", "48 data bytes", "found 43")


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "trunc-header"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">I", 2))
    with pytest.raises(DataFileError) as e:
        read_idx(path)
    assert_error(e, path, "truncated inside its header")


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"\x00")
    with pytest.raises(DataFileError) as e:
        read_idx(path)
    assert_error(e, path, "longer than its header declares")


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "corrupt.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-10])
    with pytest.raises(DataFileError) as e:
        read_idx(path)
    assert_error(e, path, "corrupt gzip")


# --- load_mnist -----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_round_trip(tmp_path, gz):
    train = write_mnist(tmp_path, "train", 12, gz=gz, seed=1)
    test = write_mnist(tmp_path, "test", 5, gz=gz, seed=2)
    for split, (images, labels) in (("train", train), ("test", test)):
        x, y = load_mnist(tmp_path, split)
        assert x.dtype == np.uint8 and x.shape == (len(images), 28, 28)
        assert y.dtype == np.int64 and y.shape == (len(images),)
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, labels)


def test_load_mnist_torchvision_raw_layout(tmp_path):
    images, labels = write_mnist(tmp_path / "MNIST" / "raw", "test", 6, gz=True)
    x, y = load_mnist(str(tmp_path), "test")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_load_mnist_prefers_uncompressed_and_accepts_mixed(tmp_path):
    images, labels = write_mnist(tmp_path, "train", 4)
    (tmp_path / "train-labels-idx1-ubyte").rename(tmp_path / "train-labels-idx1-ubyte.gz")  # raw bytes, .gz name
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8), gz=True)
    x, y = load_mnist(tmp_path, "train")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_load_mnist_other_image_size(tmp_path):
    images, _ = write_mnist(tmp_path, "train", 3, hw=(5, 7))
    x, _ = load_mnist(tmp_path, "train")
    assert x.shape == (3, 5, 7)
    np.testing.assert_array_equal(x, images)


def test_load_mnist_missing_files(tmp_path):
    write_mnist(tmp_path, "train", 3)
    with pytest.raises(DataFileError) as e:
        load_mnist(tmp_path, "test")
    assert_error(
        e, tmp_path, "t10k-images-idx3-ubyte[.gz]", "t10k-labels-idx1-ubyte[.gz]", str(tmp_path / "MNIST" / "raw")
    )


def test_load_mnist_files_split_across_locations_is_missing(tmp_path):
    write_mnist(tmp_path, "train", 3)
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "train-labels-idx1-ubyte").rename(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte")
    with pytest.raises(DataFileError) as e:
        load_mnist(tmp_path, "train")
    assert_error(e, tmp_path, "train-labels-idx1-ubyte[.gz]")


def test_load_mnist_missing_root(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(DataFileError) as e:
        load_mnist(root, "train")
    assert_error(e, root, "not a directory", "train-images-idx3-ubyte[.gz]")


def test_load_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path, "train", 5)
    labels_path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataFileError) as e:
        load_mnist(tmp_path, "train")
    assert_error(e, labels_path, str(tmp_path / "train-images-idx3-ubyte"), "5 images", "4 labels")


def test_load_mnist_label_out_of_range(tmp_path):
    write_mnist(tmp_path, "train", 3)
    labels_path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 10, 2], np.uint8))
    with pytest.raises(DataFileError) as e:
        load_mnist(tmp_path, "train")
    assert_error(e, labels_path, "label 10", "0..9")


def test_load_mnist_wrong_image_type_and_rank(tmp_path):
    write_mnist(tmp_path, "train", 3)
    images_path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.int32))
    with pytest.raises(DataFileError) as e:
        load_mnist(tmp_path, "train")
    assert_error(e, images_path, "int32", "ubyte")
    write_idx(images_path, np.zeros((3, 784), np.uint8))
    with pytest.raises(DataFileError) as e:
        load_mnist(tmp_path, "train")
    assert_error(e, images_path, "(N, H, W)")


def test_load_mnist_wrong_label_rank(tmp_path):
    write_mnist(tmp_path, "train", 3)
    labels_path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((3, 1), np.uint8))
    with pytest.raises(DataFileError) as e:
        load_mnist(tmp_path, "train")
    assert_error(e, labels_path, "(N,)")


def test_load_mnist_bad_file_names_its_path(tmp_path):
    write_mnist(tmp_path, "train", 3, gz=True)
    images_path = tmp_path / "train-images-idx3-ubyte.gz"
    images_path.write_bytes(b"not an idx file")
    with pytest.raises(DataFileError) as e:
        load_mnist(tmp_path, "train")
    assert_error(e, images_path, "bad magic")


def test_load_mnist_bad_split(tmp_path):
    with pytest.raises(UserInputError, match="split"):
        load_mnist(tmp_path, "val")


# --- load_cifar -----------------------------------------------------------------------------


def expected_cifar(batches: dict[str, dict], names: list[str], label_key: bytes):
    data = np.concatenate([batches[n][b"data"] for n in names])
    labels = np.concatenate([batches[n][label_key] for n in names]).astype(np.int64)
    return data, labels


@pytest.mark.parametrize("inside", [True, False])
def test_load_cifar10_round_trip(tmp_path, inside):
    directory = tmp_path / "cifar-10-batches-py"
    batches = write_cifar10(directory)
    root = tmp_path if inside else directory
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        x, y = load_cifar(root, split)
        data, labels = expected_cifar(batches, names, b"labels")
        assert x.dtype == np.uint8 and x.shape == (len(data), 3, 32, 32)
        assert y.dtype == np.int64 and y.shape == (len(data),)
        np.testing.assert_array_equal(x.reshape(len(data), -1), data)
        # Rows are channel-first: the first 1024 values are the red plane, row-major.
        np.testing.assert_array_equal(x[:, 0], data[:, :1024].reshape(-1, 32, 32))
        np.testing.assert_array_equal(x[:, 2, 31], data[:, -32:])
        np.testing.assert_array_equal(y, labels)


def test_load_cifar10_numpy1_python2_style_pickle(tmp_path):
    """Real batches name numpy 1.x's `numpy.core.multiarray`; those must load too."""
    directory = tmp_path / "cifar-10-batches-py"
    batches = write_cifar10(directory)
    path = directory / "test_batch"
    content = path.read_bytes()
    assert b"numpy._core.multiarray\n" in content
    path.write_bytes(content.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    x, y = load_cifar(tmp_path, "test")
    np.testing.assert_array_equal(x.reshape(len(x), -1), batches["test_batch"][b"data"])
    np.testing.assert_array_equal(y, batches["test_batch"][b"labels"])


def test_load_cifar_accepts_str_keys(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    batches = write_cifar10(directory)
    batch = batches["test_batch"]
    write_pickle(directory / "test_batch", {"data": batch[b"data"], "labels": batch[b"labels"]})
    _, y = load_cifar(tmp_path, "test")
    np.testing.assert_array_equal(y, batch[b"labels"])


@pytest.mark.parametrize("label_kind, key", [("fine", b"fine_labels"), ("coarse", b"coarse_labels")])
def test_load_cifar100_round_trip(tmp_path, label_kind, key):
    batches = write_cifar100(tmp_path / "cifar-100-python")
    for split in ("train", "test"):
        x, y = load_cifar(tmp_path, split, num_classes=100, label_kind=label_kind)
        data, labels = expected_cifar(batches, [split], key)
        assert x.shape == (len(data), 3, 32, 32) and y.dtype == np.int64
        np.testing.assert_array_equal(x.reshape(len(data), -1), data)
        np.testing.assert_array_equal(y, labels)
    x, _ = load_cifar(tmp_path / "cifar-100-python", "test", num_classes=100)
    assert len(x) == 3


def test_load_cifar_bad_arguments(tmp_path):
    with pytest.raises(UserInputError, match="label_kind"):
        load_cifar(tmp_path, "train", num_classes=10, label_kind="coarse")
    with pytest.raises(UserInputError, match="num_classes"):
        load_cifar(tmp_path, "train", num_classes=20)
    with pytest.raises(UserInputError, match="split"):
        load_cifar(tmp_path, "valid")


def test_load_cifar_missing_root(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(DataFileError) as e:
        load_cifar(root, "train")
    assert_error(e, root, "not a directory", "cifar-10-batches-py", "data_batch_1")


def test_load_cifar_missing_directory_contents(tmp_path):
    with pytest.raises(DataFileError) as e:
        load_cifar(tmp_path, "test", num_classes=100)
    assert_error(e, tmp_path / "test", "does not exist", str(tmp_path / "cifar-100-python"))


def test_load_cifar_missing_batch(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    (directory / "data_batch_3").unlink()
    with pytest.raises(DataFileError) as e:
        load_cifar(tmp_path, "train")
    assert_error(e, directory / "data_batch_3", "does not exist", "test_batch")
    load_cifar(tmp_path, "test")  # the test split does not need it


@pytest.mark.parametrize(
    "content",
    [b"this is not a pickle", b"", pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}, protocol=2)[:-20]],
    ids=["garbage", "empty", "truncated"],
)
def test_load_cifar_not_a_pickle(tmp_path, content):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    (directory / "test_batch").write_bytes(content)
    with pytest.raises(DataFileError) as e:
        load_cifar(tmp_path, "test")
    assert_error(e, directory / "test_batch", "not a readable pickle")


def test_load_cifar_refuses_foreign_globals(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    write_pickle(directory / "test_batch", {b"data": datetime.date(2020, 1, 1), b"labels": []})
    with pytest.raises(DataFileError) as e:
        load_cifar(tmp_path, "test")
    assert_error(e, directory / "test_batch", "datetime.date")


@pytest.mark.parametrize(
    "obj, fragments",
    [
        ([1, 2, 3], ["holds a list"]),
        ({b"labels": [0]}, ["lacks key(s) ['data']"]),
        ({b"data": np.zeros((2, 3072), np.uint8)}, ["lacks key(s) ['labels']"]),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, ["(2, 3000)", "(N, 3072)"]),
        ({b"data": np.zeros((2, 3, 32, 32), np.uint8), b"labels": [0, 1]}, ["(2, 3, 32, 32)", "(N, 3072)"]),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, ["float32", "uint8"]),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, ["one label per image"]),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, ["0..10", "expected 0..9"]),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]}, ["non-integer labels"]),
    ],
    ids=["not-dict", "no-data", "no-labels", "short-rows", "4d-data", "float-data", "few-labels", "label-range", "bytes-labels"],
)
def test_load_cifar_malformed_batch(tmp_path, obj, fragments):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    write_pickle(directory / "test_batch", obj)
    with pytest.raises(DataFileError) as e:
        load_cifar(tmp_path, "test")
    assert_error(e, directory / "test_batch", *fragments)


def test_load_cifar100_coarse_range_and_missing_key(tmp_path):
    directory = tmp_path / "cifar-100-python"
    write_cifar100(directory)
    data = np.zeros((2, 3072), np.uint8)
    write_pickle(directory / "test", {b"data": data, b"fine_labels": [0, 99], b"coarse_labels": [0, 20]})
    load_cifar(tmp_path, "test", num_classes=100)
    with pytest.raises(DataFileError) as e:
        load_cifar(tmp_path, "test", num_classes=100, label_kind="coarse")
    assert_error(e, directory / "test", "expected 0..19")
    write_pickle(directory / "test", {b"data": data, b"labels": [0, 1]})
    with pytest.raises(DataFileError) as e:
        load_cifar(tmp_path, "test", num_classes=100)
    assert_error(e, directory / "test", "fine_labels")
