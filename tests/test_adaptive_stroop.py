"""Stroop digits: the colour map, the congruent fractions per split, an all-incongruent test set,
determinism by seed, and batches that ClassificationTask reads unchanged."""

import pytest
import torch

from framework.data.images import DigitsDataModule
from framework.data.stroop import CLASS_COLOURS, StroopDigitsDataModule
from framework.errors import UserInputError


@pytest.fixture(scope="module")
def stroop() -> tuple[StroopDigitsDataModule, dict]:
    data = StroopDigitsDataModule(seed=0)
    return data, data.load_images()


@pytest.fixture(scope="module")
def grey() -> dict:
    return DigitsDataModule(seed=0).load_images()


def test_colour_map_is_ten_distinct_rgb_colours():
    assert CLASS_COLOURS.shape == (10, 3)
    assert ((CLASS_COLOURS >= 0) & (CLASS_COLOURS <= 1)).all()
    assert len({tuple(c.tolist()) for c in CLASS_COLOURS}) == 10


def test_each_image_is_the_grey_digit_times_its_colour(stroop, grey):
    data, splits = stroop
    for split in ("train", "val", "test"):
        images, labels = splits[split]
        grey_images, grey_labels = grey[split]
        assert torch.equal(labels, grey_labels)  # labels stay the digit, splits as DigitsDataModule
        assert images.shape == (len(labels), 3, 8, 8)
        colours = CLASS_COLOURS[data.colour_classes[split]]
        for channel in range(3):
            assert torch.allclose(images[:, channel], grey_images[:, 0] * colours[:, channel, None, None])


def test_congruence_matches_colour_and_fractions_are_exact(stroop):
    data, splits = stroop
    for split, fraction in (("train", 0.8), ("val", 0.8), ("test", 0.0)):
        labels = splits[split][1]
        congruent = data.congruent[split]
        assert torch.equal(congruent, data.colour_classes[split] == labels)
        assert int(congruent.sum()) == round(fraction * len(labels))
    assert not data.congruent["test"].any()


def test_incongruent_colours_spread_over_the_nine_other_classes(stroop):
    data, splits = stroop
    labels = splits["train"][1]
    shifts = (data.colour_classes["train"] - labels) % 10
    incongruent_shifts = shifts[~data.congruent["train"]]
    counts = torch.bincount(incongruent_shifts, minlength=10)
    assert counts[0] == 0 and (counts[1:] > 0).all()
    expected = len(incongruent_shifts) / 9
    assert ((counts[1:] - expected).abs() < 4 * expected**0.5).all()  # uniform up to sampling noise


@pytest.mark.parametrize(("fraction", "test_fraction"), [(0.5, 0.25), (1.0, 1.0), (0.0, 0.0)])
def test_fractions_are_configurable(fraction, test_fraction):
    data = StroopDigitsDataModule(congruent_fraction=fraction, test_congruent_fraction=test_fraction)
    splits = data.load_images()
    for split, expected in (("train", fraction), ("val", fraction), ("test", test_fraction)):
        assert int(data.congruent[split].sum()) == round(expected * len(splits[split][1]))


def test_colours_follow_the_seed():
    a, b, c = (StroopDigitsDataModule(seed=s) for s in (0, 0, 1))
    images = [m.load_images() for m in (a, b, c)]
    for split in ("train", "val", "test"):
        assert torch.equal(images[0][split][0], images[1][split][0])
        assert torch.equal(a.colour_classes[split], b.colour_classes[split])
        assert not torch.equal(a.colour_classes[split], c.colour_classes[split])


def test_batches_are_image_label_pairs_in_congruence_order():
    data = StroopDigitsDataModule(batch_size=16, eval_batch_size=50)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (16, 3, 8, 8) and y.shape == (16,)
    test_labels = torch.cat([batch[1] for batch in data.test_dataloader()])
    assert torch.equal(test_labels, data.load_images()["test"][1])
    assert len(data.congruent["test"]) == len(test_labels)


@pytest.mark.parametrize("key", ["congruent_fraction", "test_congruent_fraction"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_bad_fractions_are_refused(key, value):
    with pytest.raises(UserInputError, match=f"{key}={value}"):
        StroopDigitsDataModule(**{key: value})


@pytest.mark.parametrize(("format", "image_size"), [("image", None), ("image", 16), ("sequence", None)])
def test_example_groups_read_the_congruence_back_from_any_batch(format, image_size):
    data = StroopDigitsDataModule(format=format, image_size=image_size, congruent_fraction=0.5, test_congruent_fraction=0.3)
    data.setup("fit")
    for split in ("train", "val", "test"):
        x, y = data.datasets[split].tensors[:2]
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # any order, any batch
        groups = data.example_groups(x[order], y[order])
        assert torch.equal(groups["congruent"], data.congruent[split][order])
        assert torch.equal(groups["incongruent"], ~data.congruent[split][order])


def test_example_groups_need_setup():
    with pytest.raises(RuntimeError, match="needs setup"):
        StroopDigitsDataModule().example_groups(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64))


def test_mnist_source_colours_the_idx_files(tmp_path):
    from helpers import write_mnist

    train_images, train_labels = write_mnist(tmp_path, "train", 60, hw=(8, 8), seed=1)
    test_images, _ = write_mnist(tmp_path, "test", 20, hw=(8, 8), seed=2)
    data = StroopDigitsDataModule(source="mnist", root=tmp_path, val_size=10, congruent_fraction=0.75)
    splits = data.load_images()
    assert [len(splits[s][1]) for s in ("train", "val", "test")] == [50, 10, 20]
    assert int(data.congruent["train"].sum()) == round(0.75 * 50) and not data.congruent["test"].any()
    grey_test = torch.from_numpy(test_images).float()[:, None] / 255
    assert torch.allclose(splits["test"][0], grey_test * CLASS_COLOURS[data.colour_classes["test"]][:, :, None, None])
    with pytest.raises(UserInputError, match="source='emnist' is not allowed"):
        StroopDigitsDataModule(source="emnist")
