"""Same/different digits: correct and balanced labels, held-out digits only in the test split,
disjoint images; and the relational experiment configs parse and fit their data."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.datasets import load_digits

from framework.cli import main
from framework.data.relational import SameDifferentDataModule
from framework.errors import UserInputError

BACKBONES = {"corelnet": "CoRelNet", "relation_network": "RelationNetwork", "mlp": "ConcatMLP"}
EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("relational_*.yaml"))


@pytest.fixture(scope="module")
def digit_of():
    """Maps an image's bytes back to its digit (the bundled images are distinct enough)."""
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return {image.numpy().tobytes(): int(label) for image, label in zip(images, digits.target)}


@pytest.fixture(scope="module")
def splits():
    data = SameDifferentDataModule(held_out_classes=(2, 5, 9), train_size=600, val_size=200, test_size=200, seed=3)
    data.setup()
    return {split: data.datasets[split].tensors for split in ("train", "val", "test")}


def test_labels_say_whether_the_two_digits_are_the_same(splits, digit_of):
    for objects, labels in splits.values():
        first = [digit_of[image.numpy().tobytes()] for image in objects[:, 0]]
        second = [digit_of[image.numpy().tobytes()] for image in objects[:, 1]]
        assert labels.tolist() == [int(a == b) for a, b in zip(first, second)]
        assert labels.float().mean().item() == 0.5
        same = labels.bool()
        assert not (objects[same, 0] == objects[same, 1]).all(dim=-1).any()  # two different images


def test_held_out_digits_appear_only_in_the_test_split(splits, digit_of):
    def digits(split):
        objects = splits[split][0]
        return {digit_of[image.numpy().tobytes()] for image in objects.flatten(0, 1)}

    assert digits("test") == {2, 5, 9}
    assert digits("train") == digits("val") == {0, 1, 3, 4, 6, 7, 8}


def test_train_and_val_pairs_use_disjoint_images(splits):
    def images(split):
        return {image.numpy().tobytes() for image in splits[split][0].flatten(0, 1)}

    assert not images("train") & images("val")


def test_pairs_are_a_function_of_the_seed():
    def first_batch(seed):
        data = SameDifferentDataModule(train_size=50, val_size=10, test_size=10, seed=seed)
        data.setup()
        return data.datasets["train"].tensors[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"held_out_classes": (3,)}, "must be 2 to 8 distinct digits"),
        ({"held_out_classes": (1, 2, 3, 4, 5, 6, 7, 8, 9)}, "must be 2 to 8 distinct digits"),
        ({"held_out_classes": (8, 10)}, "must be 2 to 8 distinct digits"),
        ({"val_images": 1.0}, "val_images=1.0"),
        ({"test_size": 0}, "test_size=0"),
    ],
)
def test_bad_data_arguments_are_refused(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        SameDifferentDataModule(**kwargs)


def test_every_relational_model_has_an_experiment():
    assert {p.stem for p in EXPERIMENTS} == {f"relational_same_different_{name}" for name in BACKBONES}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_relational_experiment_resolves(path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["framework", "fit", "--config", str(path), "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    backbone = printed["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == f"framework.models.relational.{BACKBONES[path.stem.removeprefix('relational_same_different_')]}"
    assert printed["data"]["class_path"] == "framework.data.relational.SameDifferentDataModule"
    assert printed["model"]["init_args"]["num_classes"] == backbone["init_args"]["num_classes"] == 2
