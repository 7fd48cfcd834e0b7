"""The relational digit tasks (same/different, relational match-to-sample, distribution-of-3,
identity rules): correct and balanced labels, held-out digits only in the test split, disjoint
images; and the relational experiment configs parse and fit their data."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.datasets import load_digits

from framework.cli import main
from framework.data.relational import (
    IDENTITY_RULES,
    DistributionOfThreeDataModule,
    IdentityRulesDataModule,
    MatchToSampleDataModule,
    SameDifferentDataModule,
)
from framework.errors import UserInputError

BACKBONES = {"corelnet": "CoRelNet", "relation_network": "RelationNetwork", "mlp": "ConcatMLP"}
TASKS = {  # data module, choices (classes), objects per example
    "same_different": (SameDifferentDataModule, 2, 2),
    "match_to_sample": (MatchToSampleDataModule, 2, 6),
    "distribution_of_three": (DistributionOfThreeDataModule, 4, 9),
    "identity_rules": (IdentityRulesDataModule, 4, 9),
}
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


def test_every_relational_model_has_an_experiment_for_every_task():
    assert {p.stem for p in EXPERIMENTS} == {f"relational_{task}_{name}" for task in TASKS for name in BACKBONES}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_relational_experiment_resolves(path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["framework", "fit", "--config", str(path), "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    task, model = next((t, m) for t in TASKS for m in BACKBONES if path.stem == f"relational_{t}_{m}")
    module, choices, objects = TASKS[task]
    backbone = printed["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == f"framework.models.relational.{BACKBONES[model]}"
    assert printed["data"]["class_path"] == f"framework.data.relational.{module.__name__}"
    assert printed["model"]["init_args"]["num_classes"] == backbone["init_args"]["num_classes"] == choices
    arguments = backbone["init_args"]
    if arguments.get("num_candidates", 0):  # the context plus every candidate is the example
        assert arguments["num_objects"] + (arguments["num_candidates"] - 1) * arguments["candidate_size"] == objects
        assert arguments["num_candidates"] == choices
    else:
        assert arguments["num_objects"] == objects


@pytest.fixture(scope="module")
def choice_splits():
    """The three multiple-choice tasks, digits 2, 4, 6, 9 held out."""
    built = {}
    for task in ("match_to_sample", "distribution_of_three", "identity_rules"):
        data = TASKS[task][0](held_out_classes=(2, 4, 6, 9), train_size=800, val_size=200, test_size=400, seed=1)
        data.setup()
        built[task] = {split: data.datasets[split].tensors for split in ("train", "val", "test")}
    return built


def digits_of(objects: torch.Tensor, digit_of: dict) -> list[list[int]]:
    return [[digit_of[image.numpy().tobytes()] for image in example] for example in objects]


@pytest.mark.parametrize("task", ["match_to_sample", "distribution_of_three", "identity_rules"])
def test_held_out_digits_appear_only_in_the_test_split_of_every_choice_task(task, choice_splits, digit_of):
    seen = {split: {d for example in digits_of(objects, digit_of) for d in example} for split, (objects, _) in choice_splits[task].items()}
    assert seen["test"] == {2, 4, 6, 9}
    assert seen["train"] == seen["val"] == {0, 1, 3, 5, 7, 8}
    images = {split: {image.numpy().tobytes() for image in objects.flatten(0, 1)} for split, (objects, _) in choice_splits[task].items()}
    assert not images["train"] & images["val"]


@pytest.mark.parametrize("task", ["match_to_sample", "distribution_of_three", "identity_rules"])
def test_answers_are_uniform_over_the_candidates(task, choice_splits):
    _, labels = choice_splits[task]["test"]
    choices = TASKS[task][1]
    counts = torch.bincount(labels, minlength=choices).float()
    assert counts.min() / len(labels) > 1 / choices - 0.08 and counts.max() / len(labels) < 1 / choices + 0.08


def test_match_to_sample_answer_is_the_target_pair_with_the_source_relation(choice_splits, digit_of):
    for objects, labels in choice_splits["match_to_sample"].values():
        sources = []
        for (a, b, c, d, e, f), label in zip(digits_of(objects, digit_of), labels.tolist()):
            relations = [a == b, c == d, e == f]
            assert relations[1] != relations[2]  # one "same" and one "different" target pair
            assert relations[1 + label] == relations[0]
            sources.append(relations[0])
        assert 0.45 < sum(sources) / len(sources) < 0.55


def test_distribution_of_three_answer_is_the_digit_missing_from_the_second_row(choice_splits, digit_of):
    for objects, labels in choice_splits["distribution_of_three"].values():
        for example, label in zip(digits_of(objects, digit_of), labels.tolist()):
            row, second, candidates = example[:3], example[3:5], example[5:]
            assert len(set(row)) == 3 and len(set(second)) == 2 and set(second) < set(row)
            assert len(set(candidates)) == 4
            (missing,) = set(row) - set(second)
            assert candidates[label] == missing


def rule_of(digits: list[int]) -> str:
    """The identity pattern of three digits, e.g. (3, 5, 3) -> ABA."""
    letters: dict[int, str] = {}
    return "".join(letters.setdefault(d, "AB"[len(letters)] if len(letters) < 2 else "C") for d in digits)


def test_identity_rules_answer_completes_the_second_row_by_the_first_rows_rule(choice_splits, digit_of):
    for objects, labels in choice_splits["identity_rules"].values():
        rules = []
        for example, label in zip(digits_of(objects, digit_of), labels.tolist()):
            first, second, candidates = example[:3], example[3:5], example[5:]
            rule = rule_of(first)
            assert rule in IDENTITY_RULES
            assert not set(first) & set(second + [candidates[label]])  # the rows share no digit
            assert len(set(candidates)) == 4
            completions = [rule_of(second + [c]) == rule for c in candidates]
            assert completions == [i == label for i in range(4)]  # only the answer follows the rule
            rules.append(rule)
        assert set(rules) == set(IDENTITY_RULES)


def test_identity_rules_can_be_restricted_to_some_rules(digit_of):
    data = IdentityRulesDataModule(rules=("ABA", "ABB"), train_size=100, val_size=10, test_size=10)
    data.setup()
    objects, _ = data.datasets["train"].tensors
    assert {rule_of(example[:3]) for example in digits_of(objects, digit_of)} == {"ABA", "ABB"}


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: DistributionOfThreeDataModule(held_out_classes=(7, 8, 9)), "must be 4 to 6 distinct digits"),
        (lambda: IdentityRulesDataModule(held_out_classes=(0, 1, 2, 3, 4, 5, 6)), "must be 4 to 6 distinct digits"),
        (lambda: IdentityRulesDataModule(rules=("ABC",)), "rules='ABC'"),
        (lambda: IdentityRulesDataModule(rules=()), "rules must name at least one"),
        (lambda: MatchToSampleDataModule(val_images=0.0), "val_images=0.0"),
    ],
)
def test_bad_choice_task_arguments_are_refused(factory, message):
    with pytest.raises(UserInputError, match=message):
        factory()
