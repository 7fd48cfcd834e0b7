"""Tests for the data modules: MNIST and CIFAR on tiny files in the standard formats (written by
tests/helpers.py), the bundled digits, the deterministic sampler and the generated sequence tasks."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import write_cifar10, write_cifar100, write_mnist

from framework.data import (
    AddingTaskDataModule,
    CIFARDataModule,
    CopyTaskDataModule,
    DigitsDataModule,
    EpochRandomSampler,
    MNISTDataModule,
)
from framework.data.sequences import COPY_BLANK, COPY_MARKER, adding_task, copy_task, copy_task_baseline
from framework.errors import DataFileError, UserInputError

MNIST_TRAIN, MNIST_TEST, MNIST_VAL = 40, 10, 8


@pytest.fixture
def mnist_files(tmp_path):
    """A tiny MNIST in `tmp_path`: 40 training and 10 test images of 28x28, gzip IDX files."""
    train = write_mnist(tmp_path, "train", MNIST_TRAIN, gz=True, seed=1)
    test = write_mnist(tmp_path, "test", MNIST_TEST, gz=True, seed=2)
    return tmp_path, train, test


def mnist(root, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(root, **{"val_size": MNIST_VAL, "batch_size": 16, **kwargs})
    dm.setup("fit")
    return dm


def tensors(dm, split: str) -> tuple[torch.Tensor, ...]:
    return dm.datasets[split].tensors


def row_index(raw: np.ndarray) -> dict[bytes, int]:
    """Map each raw uint8 image to its index (the random test images are all distinct)."""
    index = {image.tobytes(): i for i, image in enumerate(raw)}
    assert len(index) == len(raw)
    return index


def indices_of(images: torch.Tensor, raw: np.ndarray) -> list[int]:
    """Indices in `raw` of float images in [0, 1] (as returned by `load_images`)."""
    index = row_index(raw)
    as_uint8 = (images * 255).round().to(torch.uint8).numpy().reshape(len(images), *raw.shape[1:])
    return [index[image.tobytes()] for image in as_uint8]


def fake_trainer(training: bool) -> SimpleNamespace:
    return SimpleNamespace(training=training)


# --- MNIST ----------------------------------------------------------------------------------


def test_mnist_image_format(mnist_files):
    dm = mnist(mnist_files[0])
    assert dm.num_classes == 10
    sizes = {"train": MNIST_TRAIN - MNIST_VAL, "val": MNIST_VAL, "test": MNIST_TEST}
    for split, n in sizes.items():
        x, y = tensors(dm, split)
        assert x.dtype == torch.float32 and x.shape == (n, 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (n,)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)


def test_mnist_load_images_carves_val_from_train(mnist_files):
    root, (train_raw, train_labels), (test_raw, test_labels) = mnist_files
    splits = MNISTDataModule(root, val_size=MNIST_VAL).load_images()
    for x, _ in splits.values():
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert 0.0 <= x.min() and x.max() <= 1.0
    train_idx = indices_of(splits["train"][0], train_raw)
    val_idx = indices_of(splits["val"][0], train_raw)
    assert len(val_idx) == MNIST_VAL and len(train_idx) == MNIST_TRAIN - MNIST_VAL
    assert not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(MNIST_TRAIN))
    np.testing.assert_array_equal(splits["train"][1].numpy(), train_labels[train_idx])
    np.testing.assert_array_equal(splits["val"][1].numpy(), train_labels[val_idx])
    # the official test set, in order, untouched by the split
    assert indices_of(splits["test"][0], test_raw) == list(range(MNIST_TEST))
    np.testing.assert_array_equal(splits["test"][1].numpy(), test_labels)


@pytest.mark.parametrize("val_size, expected", [(8, 8), (0.25, 10), (1, 1)])
def test_mnist_val_size_count_or_fraction(mnist_files, val_size, expected):
    dm = mnist(mnist_files[0], val_size=val_size)
    assert len(dm.datasets["val"]) == expected
    assert len(dm.datasets["train"]) == MNIST_TRAIN - expected


@pytest.mark.parametrize("val_size", [0, -3, 0.0, 1.0, 1.5, True, "10"])
def test_mnist_bad_val_size_fails_at_construction(mnist_files, val_size):
    with pytest.raises(UserInputError, match="val_size"):
        MNISTDataModule(mnist_files[0], val_size=val_size)


def test_mnist_val_size_too_large_fails_at_setup(mnist_files):
    dm = MNISTDataModule(mnist_files[0], val_size=MNIST_TRAIN)
    with pytest.raises(UserInputError, match="non-empty"):
        dm.setup("fit")


def test_mnist_split_follows_seed(mnist_files):
    root = mnist_files[0]
    val = {seed: MNISTDataModule(root, val_size=MNIST_VAL, seed=seed).load_images()["val"][0] for seed in (0, 1)}
    assert torch.equal(val[0], MNISTDataModule(root, val_size=MNIST_VAL, seed=0).load_images()["val"][0])
    assert not torch.equal(val[0], val[1])


def test_mnist_standardised_with_train_statistics(mnist_files):
    dm = mnist(mnist_files[0])
    raw = dm.load_images()
    mean = raw["train"][0].mean(dim=(0, 2, 3), keepdim=True)
    std = raw["train"][0].std(dim=(0, 2, 3), keepdim=True)
    for split in ("train", "val", "test"):
        torch.testing.assert_close(tensors(dm, split)[0], (raw[split][0] - mean) / std)
    x = tensors(dm, "train")[0]
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(1), atol=1e-5, rtol=0)
    assert abs(tensors(dm, "test")[0].mean()) > 1e-4  # test statistics are not used


def test_mnist_sequence_format(mnist_files):
    root = mnist_files[0]
    image = mnist(root)
    sequence = mnist(root, format="sequence")
    for split in ("train", "val", "test"):
        x_img, y_img = tensors(image, split)
        x, y, mask = tensors(sequence, split)
        n = len(x_img)
        assert x.shape == (n, 784, 1) and x.dtype == torch.float32
        assert y.shape == (n, 784) and y.dtype == torch.int64
        assert mask.shape == (n, 784) and mask.dtype == torch.bool
        assert mask[:, -1].all() and not mask[:, :-1].any()
        assert torch.equal(y, y_img[:, None].expand(n, 784))
        assert torch.equal(x[:, :, 0], x_img.reshape(n, 784))  # row-major pixel order
    x, y, mask = next(iter(sequence.train_dataloader()))
    assert x.shape == (16, 784, 1) and y.shape == (16, 784) and mask.shape == (16, 784)


def test_mnist_permuted_is_one_fixed_permutation_of_sequence(mnist_files):
    root = mnist_files[0]
    sequence = mnist(root, format="sequence")
    permuted = mnist(root, format="permuted", permutation_seed=3)
    seq_train, perm_train = tensors(sequence, "train")[0][..., 0], tensors(permuted, "train")[0][..., 0]
    columns = {seq_train[:, i].numpy().tobytes(): i for i in range(784)}
    assert len(columns) == 784
    order = torch.tensor([columns[perm_train[:, j].numpy().tobytes()] for j in range(784)])
    assert torch.equal(order.sort().values, torch.arange(784))
    assert not torch.equal(order, torch.arange(784))
    for split in ("train", "val", "test"):  # the same permutation for every example and split
        seq, perm = tensors(sequence, split), tensors(permuted, split)
        assert torch.equal(perm[0], seq[0][:, order])
        assert torch.equal(perm[1], seq[1]) and torch.equal(perm[2], seq[2])
    again = mnist(root, format="permuted", permutation_seed=3)
    assert torch.equal(tensors(again, "val")[0], tensors(permuted, "val")[0])
    other = mnist(root, format="permuted", permutation_seed=4)
    assert not torch.equal(tensors(other, "val")[0], tensors(permuted, "val")[0])


def test_mnist_image_size(mnist_files):
    root = mnist_files[0]
    x, _ = tensors(mnist(root, image_size=32), "test")
    assert x.shape == (MNIST_TEST, 1, 32, 32)
    x, _, mask = tensors(mnist(root, image_size=16, format="sequence"), "test")
    assert x.shape == (MNIST_TEST, 256, 1) and mask.shape == (MNIST_TEST, 256)


def test_mnist_augment_changes_training_batches_only(mnist_files):
    root = mnist_files[0]
    dm = mnist(root, augment=True)
    batch = next(iter(dm.train_dataloader()))
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no trainer attached
    dm.trainer = fake_trainer(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = fake_trainer(training=True)
    torch.manual_seed(0)
    x, y = dm.on_after_batch_transfer(batch, 0)
    assert x.shape == batch[0].shape and torch.equal(y, batch[1])
    assert not torch.equal(x, batch[0])
    torch.manual_seed(0)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], x)  # drawn from the global RNG

    plain = mnist(root)
    plain.trainer = fake_trainer(training=True)
    assert plain.on_after_batch_transfer(batch, 0) is batch


def test_augment_needs_image_format(mnist_files):
    with pytest.raises(UserInputError, match="augment"):
        MNISTDataModule(mnist_files[0], format="sequence", augment=True)


def test_mnist_missing_root_fails_at_construction(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(DataFileError) as e:
        MNISTDataModule(root)
    message = str(e.value)
    assert str(root) in message and "not a directory" in message
    assert "train-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte[.gz]" in message
    assert "\n" not in message


def test_mnist_root_that_is_a_file_fails_at_construction(tmp_path):
    root = tmp_path / "mnist.tar.gz"
    root.write_bytes(b"")
    with pytest.raises(DataFileError, match="not a directory"):
        MNISTDataModule(root)


def test_relative_root_error_names_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFileError) as e:
        MNISTDataModule("data/mnist")
    assert "data/mnist" in str(e.value) and str(tmp_path / "data" / "mnist") in str(e.value)


def test_mnist_corrupt_file_fails_at_setup(mnist_files):
    root = mnist_files[0]
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(b"not an idx file")
    dm = MNISTDataModule(root, val_size=MNIST_VAL)  # construction only checks the directory
    with pytest.raises(DataFileError) as e:
        dm.setup("fit")
    assert str(images) in str(e.value)


def test_mnist_missing_files_fail_at_setup(tmp_path):
    dm = MNISTDataModule(tmp_path)
    with pytest.raises(DataFileError, match="train-images-idx3-ubyte"):
        dm.setup("fit")


# --- CIFAR ----------------------------------------------------------------------------------


@pytest.fixture
def cifar10_root(tmp_path):
    """A tiny CIFAR-10 in `tmp_path/cifar-10-batches-py`: 17 training and 4 test images."""
    batches = write_cifar10(tmp_path / "cifar-10-batches-py")
    return tmp_path, batches


def cifar(root, **kwargs) -> CIFARDataModule:
    dm = CIFARDataModule(root, **{"val_size": 4, "batch_size": 8, **kwargs})
    dm.setup("fit")
    return dm


def test_cifar10_image_format_and_values(cifar10_root):
    root, batches = cifar10_root
    dm = cifar(root)
    assert dm.num_classes == 10
    for split, n in (("train", 13), ("val", 4), ("test", 4)):
        x, y = tensors(dm, split)
        assert x.dtype == torch.float32 and x.shape == (n, 3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (n,)
    raw = dm.load_images()
    train_raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    train_labels = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    train_idx, val_idx = indices_of(raw["train"][0], train_raw), indices_of(raw["val"][0], train_raw)
    assert sorted(train_idx + val_idx) == list(range(17)) and not set(train_idx) & set(val_idx)
    np.testing.assert_array_equal(raw["val"][1].numpy(), train_labels[val_idx])
    test = batches["test_batch"]
    # channel-first rows: the first 1024 values of a row are the red plane
    torch.testing.assert_close(raw["test"][0][:, 0].reshape(4, -1), torch.tensor(test[b"data"][:, :1024]) / 255.0)
    np.testing.assert_array_equal(raw["test"][1].numpy(), test[b"labels"])
    x = tensors(dm, "train")[0]
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)


def test_cifar10_sequence_format_and_image_size(cifar10_root):
    root, _ = cifar10_root
    x, y, mask = tensors(cifar(root, format="sequence"), "test")
    assert x.shape == (4, 1024, 3) and y.shape == (4, 1024) and mask.shape == (4, 1024)
    assert mask[:, -1].all() and not mask[:, :-1].any()
    x, _ = tensors(cifar(root, image_size=16), "val")
    assert x.shape == (4, 3, 16, 16)


def test_cifar10_augment_changes_training_batches_only(cifar10_root):
    dm = cifar(cifar10_root[0], augment=True)
    batch = next(iter(dm.train_dataloader()))
    dm.trainer = fake_trainer(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = fake_trainer(training=True)
    torch.manual_seed(1)
    x, y = dm.on_after_batch_transfer(batch, 0)
    assert x.shape == (8, 3, 32, 32) and torch.equal(y, batch[1]) and not torch.equal(x, batch[0])


@pytest.mark.parametrize(
    "label_kind, key, num_classes", [("fine", b"fine_labels", 100), ("coarse", b"coarse_labels", 20)]
)
def test_cifar100(tmp_path, label_kind, key, num_classes):
    batches = write_cifar100(tmp_path / "cifar-100-python")
    dm = cifar(tmp_path, num_classes=100, label_kind=label_kind, val_size=2)
    assert dm.num_classes == num_classes
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [5, 2, 3]
    np.testing.assert_array_equal(tensors(dm, "test")[1].numpy(), batches["test"][key])
    assert tensors(dm, "train")[0].shape == (5, 3, 32, 32)


def test_cifar_bad_label_kind_fails_at_construction(cifar10_root):
    with pytest.raises(UserInputError, match="label_kind"):
        CIFARDataModule(cifar10_root[0], label_kind="coarse")
    with pytest.raises(UserInputError, match="num_classes"):
        CIFARDataModule(cifar10_root[0], num_classes=20)


def test_cifar_missing_root_fails_at_construction(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(DataFileError) as e:
        CIFARDataModule(root)
    message = str(e.value)
    assert str(root) in message and "cifar-10-batches-py" in message and "data_batch_1" in message
    with pytest.raises(DataFileError) as e:
        CIFARDataModule(root, num_classes=100)
    assert str(root) in str(e.value) and "cifar-100-python" in str(e.value)


def test_cifar_corrupt_batch_fails_at_setup(cifar10_root):
    root, _ = cifar10_root
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(b"this is not a pickle")
    dm = CIFARDataModule(root, val_size=4)
    with pytest.raises(DataFileError) as e:
        dm.setup("fit")
    assert str(batch) in str(e.value) and "not a readable pickle" in str(e.value)


# --- digits and the sampler -----------------------------------------------------------------


def digit_rows(images: torch.Tensor) -> set[bytes]:
    rows = {image.numpy().tobytes() for image in images}
    assert len(rows) == len(images)  # the 1,797 digit images are all distinct
    return rows


def test_digits_splits_partition_the_1797_images():
    dm = DigitsDataModule()
    dm.setup("fit")
    sizes = {split: len(dm.datasets[split]) for split in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1797 - 180 - 359, "val": 180, "test": 359}
    rows = {split: digit_rows(x) for split, (x, _) in dm.load_images().items()}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert len(rows["train"] | rows["val"] | rows["test"]) == 1797
    assert dm.datasets["train"].tensors[0].shape[1:] == (1, 8, 8)


def test_digits_split_follows_seed():
    a, b, c = (DigitsDataModule(seed=s).load_images() for s in (0, 0, 1))
    for split in ("train", "val", "test"):
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])
        assert digit_rows(a[split][0]) != digit_rows(c[split][0])


def test_epoch_random_sampler_is_a_function_of_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochRandomSampler(range(50), seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(3, 2)) == list(range(50))
    assert order(3, 2) == order(3, 2)
    assert order(3, 2) != order(3, 3)
    assert order(3, 2) != order(4, 2)
    sampler = EpochRandomSampler(range(50), seed=3)
    first = list(sampler)
    assert list(sampler) == first  # no hidden state advances between passes
    assert first == order(3, 0)


def test_train_loader_order_follows_epoch():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")

    def first_batch(epoch: int) -> torch.Tensor:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(5)
    sampler = EpochRandomSampler(dm.datasets["train"], seed=dm.seed)
    sampler.set_epoch(5)
    expected = list(sampler)[:32]
    assert torch.equal(next(iter(loader))[0], dm.datasets["train"].tensors[0][expected])


def test_eval_loaders_are_in_order():
    dm = DigitsDataModule(batch_size=32, eval_batch_size=100)
    dm.setup("fit")
    x, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(x, dm.datasets["val"].tensors[0][:100])


# --- sequence tasks -------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [1, 5])
def test_copy_task_layout(delay):
    inputs, targets = copy_task(64, delay, torch.Generator().manual_seed(0))
    length = delay + 20
    assert inputs.shape == targets.shape == (64, length)
    symbols = inputs[:, :10]
    assert ((1 <= symbols) & (symbols <= 8)).all()
    assert (inputs[:, 10 : 10 + delay - 1] == COPY_BLANK).all()  # delay - 1 blanks
    assert (inputs[:, 10 + delay - 1] == COPY_MARKER).all()  # then the marker
    assert (inputs[:, -10:] == COPY_BLANK).all()  # then 10 blanks
    assert (targets[:, : delay + 10] == COPY_BLANK).all()
    assert torch.equal(targets[:, -10:], symbols)
    assert set(symbols.unique().tolist()) == set(range(1, 9))


def test_copy_task_baseline():
    assert copy_task_baseline(100) == pytest.approx(10 * math.log(8) / 120, rel=1e-12)


@pytest.mark.parametrize("length", [10, 7])
def test_adding_task(length):
    inputs, targets = adding_task(200, length, torch.Generator().manual_seed(0))
    assert inputs.shape == (200, length, 2) and targets.shape == (200,)
    values, markers = inputs[..., 0], inputs[..., 1]
    assert ((0 <= values) & (values < 1)).all()
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    half = length // 2
    assert (markers[:, :half].sum(1) == 1).all() and (markers[:, half:].sum(1) == 1).all()
    torch.testing.assert_close(targets, (values * markers).sum(1))


def generated_inputs(dm) -> dict[str, list[torch.Tensor]]:
    """The stored tensors of each split (copy-task inputs are kept as tokens)."""
    dm.setup("fit")
    out = {}
    for split, dataset in dm.datasets.items():
        out[split] = [dataset.inputs, dataset.targets] if hasattr(dataset, "inputs") else list(dataset.tensors)
    return out


@pytest.mark.parametrize("cls, kwargs", [(CopyTaskDataModule, {"delay": 5}), (AddingTaskDataModule, {"length": 12})])
def test_generated_data_follow_seed(cls, kwargs):
    def make(seed: int):
        return cls(**kwargs, train_size=20, val_size=6, test_size=6, batch_size=8, seed=seed)

    a, b, c = generated_inputs(make(0)), generated_inputs(make(0)), generated_inputs(make(1))
    for split in ("train", "val", "test"):
        assert all(torch.equal(x, y) for x, y in zip(a[split], b[split], strict=True))
        assert not torch.equal(a[split][0], c[split][0])
    assert not torch.equal(a["train"][0][:6], a["val"][0])  # each split is generated separately


def test_copy_task_batches():
    dm = CopyTaskDataModule(delay=5, train_size=20, val_size=6, test_size=6, batch_size=8)
    dm.setup("fit")
    x, y, mask = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 25, 10) and x.dtype == torch.float32
    assert y.shape == (8, 25) and y.dtype == torch.int64
    assert mask.shape == (8, 25) and mask.dtype == torch.bool and mask.all()
    assert (x.sum(-1) == 1).all()  # one-hot
    tokens = x.argmax(-1)
    assert (tokens[:, 14] == COPY_MARKER).all() and torch.equal(y[:, -10:], tokens[:, :10])
    assert dm.baseline_loss == copy_task_baseline(5)


def test_adding_task_batches():
    dm = AddingTaskDataModule(length=12, train_size=20, val_size=6, test_size=6, batch_size=8)
    dm.setup("fit")
    x, y, mask = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 12, 2) and y.shape == (6, 12) and mask.shape == (6, 12)
    assert y.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask[:, -1].all() and not mask[:, :-1].any()
    assert (y[:, :-1] == 0).all()
    torch.testing.assert_close(y[:, -1], (x[..., 0] * x[..., 1]).sum(1))
    assert dm.baseline_loss == pytest.approx(1 / 6)
