"""Relational tasks built from digit images, with held-out digit classes for the
out-of-distribution test (Webb et al. 2021; Kerg et al. 2022), on scikit-learn's bundled 8x8
digits: same/different, relational match-to-sample, distribution-of-3 and identity rules.

The relation in every task is "shows the same digit": two objects of one class are two images
of that digit drawn from its pool, so the models have to judge identity across handwriting.
The multiple-choice tasks lay out each example as context objects followed by candidates, the
layout the relational models of :mod:`framework.models.relational` read with
``num_candidates`` and ``candidate_size``; the label is the index of the correct candidate,
uniform over the candidates."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from framework.data.base import SplitDataModule
from framework.data.images import split_off
from framework.errors import UserInputError, check_choice, check_positive

DIGIT_CLASSES = range(10)


def same_different_pairs(images: torch.Tensor, labels: torch.Tensor, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of two distinct images from ``images`` (M, D): half of the same class (label 1),
    half of two different classes (label 0), classes drawn uniformly. Returns objects
    (num_examples, 2, D) and labels (num_examples,)."""
    classes = labels.unique()
    pools = [torch.nonzero(labels == c).flatten() for c in classes]
    if len(classes) < 2 or min(len(pool) for pool in pools) < 2:
        raise UserInputError("same/different pairs need at least 2 classes with at least 2 images each")
    same = torch.arange(num_examples) % 2 == 0
    first_class = torch.randint(len(classes), (num_examples,), generator=generator)
    # A different class: shift by 1..(classes - 1) positions, uniform over the other classes.
    shift = torch.randint(1, len(classes), (num_examples,), generator=generator)
    second_class = torch.where(same, first_class, (first_class + shift) % len(classes))
    objects = torch.empty(num_examples, 2, images.shape[1])
    for i in range(num_examples):
        pool_a, pool_b = pools[first_class[i]], pools[second_class[i]]
        a = torch.randint(len(pool_a), (), generator=generator)
        # For a same pair, the second image is another one of the class.
        b = (a + torch.randint(1, len(pool_a), (), generator=generator)) % len(pool_a) if same[i] else torch.randint(len(pool_b), (), generator=generator)
        objects[i, 0], objects[i, 1] = images[pool_a[a]], images[pool_b[b]]
    return objects, same.long()

class ClassPools:
    """Draws images of given classes uniformly from the images of each class, vectorised.

    Args:
        images: (M, D).
        labels: (M,) class of each image; ``classes`` lists the distinct ones, sorted.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        order = labels.argsort(stable=True)
        self.images = images[order]
        self.classes, counts = labels.unique(sorted=True, return_counts=True)
        self.counts = counts
        self.offsets = counts.cumsum(0) - counts

    def draw(self, class_index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One image per entry of ``class_index`` (any shape S; indices into ``classes``):
        images of shape (*S, D), drawn independently."""
        position = (torch.rand(class_index.shape, generator=generator) * self.counts[class_index]).long()
        return self.images[self.offsets[class_index] + position]


def distinct_classes(num_examples: int, num_classes: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct class indices in ``range(num_classes)`` per example, uniformly in
    random order, (num_examples, count)."""
    return torch.rand(num_examples, num_classes, generator=generator).argsort(dim=1)[:, :count]


def candidates_with_answer(answer: torch.Tensor, num_classes: int, num_candidates: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each example, ``num_candidates`` distinct classes: the ``answer`` class (N,) at a
    uniformly random position and distractors drawn uniformly from the other classes. Returns
    the candidate classes (N, num_candidates) and the answer's position (N,)."""
    n = len(answer)
    # Distinct offsets 1..num_classes-1 from the answer give distinct classes other than it.
    offsets = distinct_classes(n, num_classes - 1, num_candidates - 1, generator) + 1
    distractors = (answer[:, None] + offsets) % num_classes
    position = torch.randint(num_candidates, (n,), generator=generator)
    candidates = torch.empty(n, num_candidates, dtype=torch.int64)
    is_answer = F.one_hot(position, num_candidates).bool()
    candidates[is_answer] = answer
    candidates[~is_answer] = distractors.flatten()
    return candidates, position


def match_to_sample(pools: ClassPools, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Relational match-to-sample: a source pair, then two target pairs, one "same" (two images
    of one digit) and one "different" (two digits); the answer is the target pair whose relation
    matches the source's. Sources are "same" for half the examples. Returns objects (N, 6, D) in
    the order source, target 0, target 1, and the answer (N,) in {0, 1}."""
    k = len(pools.classes)
    n = num_examples
    source_same = torch.arange(n) % 2 == 0
    answer = torch.randint(2, (n,), generator=generator)
    same_class = torch.randint(k, (n, 3), generator=generator)  # for each of the three pairs
    different = distinct_classes(n * 3, k, 2, generator).view(n, 3, 2)
    # Pair 0 is the source; among the targets, pair 1 + answer has the source's relation.
    pair_same = torch.stack([source_same, source_same == (answer == 0), source_same == (answer == 1)], dim=1)
    classes = torch.where(pair_same[..., None], same_class[..., None].expand(-1, -1, 2), different)
    return pools.draw(classes.flatten(1), generator), answer


def distribution_of_three(pools: ClassPools, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distribution-of-3: a first row of three different digits, a second row showing two of
    them in another order, and four candidates of distinct digits; the answer is the candidate
    showing the third digit of the first row, the one missing from the second. Returns objects
    (N, 9, D): the row (3), the two of the second row, the 4 candidates; and the answer (N,)."""
    k = len(pools.classes)
    row = distinct_classes(num_examples, k, 3, generator)
    order = distinct_classes(num_examples, 3, 3, generator)
    second = row.gather(1, order[:, :2])
    missing = row.gather(1, order[:, 2:]).squeeze(1)
    candidates, answer = candidates_with_answer(missing, k, 4, generator)
    return pools.draw(torch.cat([row, second, candidates], dim=1), generator), answer


IDENTITY_RULES = ("ABA", "ABB", "AAA")
"""The rules whose third element is a digit already shown, so that exactly one of four distinct
candidates completes a row. (AAB is left out: its third element only has to be new, which every
distractor other than the repeated digit also is.)"""


def identity_rules(pools: ClassPools, num_examples: int, generator: torch.Generator, rules: Sequence[str] = IDENTITY_RULES) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity rules: a first row of three digits following a rule (ABA: first and last the
    same, ...; the rule drawn uniformly from ``rules``, a subset of :data:`IDENTITY_RULES`), the first two digits of a second row
    following the same rule with two other digits, and four candidates of distinct digits; the
    answer is the candidate completing the second row. The two rows share no digit. Returns
    objects (N, 9, D): the first row, the two of the second row, the 4 candidates; and the
    answer (N,)."""
    k = len(pools.classes)
    pattern = torch.tensor([[ord(letter) - ord("A") for letter in rule] for rule in rules])  # (R, 3) of 0 (A) or 1 (B)
    rule = pattern[torch.randint(len(rules), (num_examples,), generator=generator)]
    letters = distinct_classes(num_examples, k, 4, generator)  # A, B of the first row; A, B of the second
    first = letters[:, :2].gather(1, rule)
    second = letters[:, 2:].gather(1, rule)
    candidates, answer = candidates_with_answer(second[:, 2], k, 4, generator)
    return pools.draw(torch.cat([first, second[:, :2], candidates], dim=1), generator), answer


class RelationalDigitsDataModule(SplitDataModule):
    """Base of the relational tasks on the bundled 8x8 digits (no download): examples are sets
    of digit images flattened to 64 features, batches ``(x, y)`` with x (N, K, 64).

    The digits in ``held_out_classes`` never appear in training: ``train`` and ``val`` examples
    are built from images of the other digits (disjoint images: ``val`` measures
    in-distribution generalisation), ``test`` examples from the held-out digits only (out of
    distribution). Subclasses define :meth:`make_examples`, ``min_classes`` (digits a task
    needs on each side) and :attr:`num_classes`.

    Args:
        held_out_classes: the digits kept for the test split.
        val_images: fraction of the training digits' images kept for ``val`` examples.
        train_size, val_size, test_size: number of examples of each split.
        (the rest as in :class:`SplitDataModule`)
    """

    min_classes = 2

    def __init__(
        self,
        held_out_classes: Sequence[int] = (6, 7, 8, 9),
        val_images: float = 0.2,
        train_size: int = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        held_out = sorted(set(held_out_classes))
        low, high = self.min_classes, len(DIGIT_CLASSES) - self.min_classes
        if not set(held_out) <= set(DIGIT_CLASSES) or not low <= len(held_out) <= high:
            raise UserInputError(f"held_out_classes={list(held_out_classes)} must be {low} to {high} distinct digits in 0..9 (this task needs {low} digits on each side)")
        if not 0.0 < val_images < 1.0:
            raise UserInputError(f"val_images={val_images} must be a fraction in (0, 1)")
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            check_positive(name, size)
        self.held_out_classes = held_out
        self.val_images = val_images
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def make_examples(self, images: torch.Tensor, labels: torch.Tensor, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_examples`` examples (objects (N, K, D), labels (N,)) from the images (M, D) and
        digit labels (M,) of one split."""
        raise NotImplementedError

    def build_datasets(self) -> dict[str, Dataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        held_out = torch.isin(labels, torch.tensor(self.held_out_classes))
        training_images = torch.nonzero(~held_out).flatten()
        train, val = (training_images[index] for index in split_off(len(training_images), self.val_images, self.seed))
        pools = {"train": train, "val": val, "test": torch.nonzero(held_out).flatten()}
        datasets = {}
        for offset, (split, pool) in enumerate(pools.items()):
            generator = torch.Generator().manual_seed(self.seed * 3 + offset)
            datasets[split] = TensorDataset(*self.make_examples(images[pool], labels[pool], self.sizes[split], generator))
        return datasets

    @property
    def num_classes(self) -> int:
        """The number of answers (candidates, or 2 for same/different)."""
        raise NotImplementedError


class SameDifferentDataModule(RelationalDigitsDataModule):
    """Same/different: each example is two digit images (x of shape (N, 2, 64)), labelled 1
    when they show the same digit (:func:`same_different_pairs`). Half the examples are "same".
    Held-out digits (default 7, 8, 9) appear only in ``test`` (see
    :class:`RelationalDigitsDataModule`)."""

    def __init__(
        self,
        held_out_classes: Sequence[int] = (7, 8, 9),
        val_images: float = 0.2,
        train_size: int = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(held_out_classes, val_images, train_size, val_size, test_size, batch_size, eval_batch_size, num_workers, seed)

    def make_examples(self, images: torch.Tensor, labels: torch.Tensor, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return same_different_pairs(images, labels, num_examples, generator)

    @property
    def num_classes(self) -> int:
        """Two: different (0) and same (1)."""
        return 2


class MatchToSampleDataModule(RelationalDigitsDataModule):
    """Relational match-to-sample (:func:`match_to_sample`): x (N, 6, 64) holds a source pair
    and two target pairs; y in {0, 1} names the target pair with the source's relation. Read by
    the relational models with ``num_objects=4, num_candidates=2, candidate_size=2``. Held-out
    digits (default 6-9) appear only in ``test``."""

    def make_examples(self, images: torch.Tensor, labels: torch.Tensor, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return match_to_sample(ClassPools(images, labels), num_examples, generator)

    @property
    def num_classes(self) -> int:
        """Two target pairs."""
        return 2


class DistributionOfThreeDataModule(RelationalDigitsDataModule):
    """Distribution-of-3 (:func:`distribution_of_three`): x (N, 9, 64) holds a row of three
    digits, two of them again, and four candidates; y in 0..3 names the candidate completing the
    second row. Read by the relational models with ``num_objects=6, num_candidates=4``. Needs 4
    digits on each side; held-out digits (default 6-9) appear only in ``test``."""

    min_classes = 4

    def make_examples(self, images: torch.Tensor, labels: torch.Tensor, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return distribution_of_three(ClassPools(images, labels), num_examples, generator)

    @property
    def num_classes(self) -> int:
        """Four candidates."""
        return 4


class IdentityRulesDataModule(RelationalDigitsDataModule):
    """Identity rules (:func:`identity_rules`): x (N, 9, 64) holds a row of three digits
    following a rule (ABA, ABB or AAA), two digits of a second row and four candidates; y
    in 0..3 names the candidate completing the second row by the same rule. Read by the
    relational models with ``num_objects=6, num_candidates=4``. Needs 4 digits on each side;
    held-out digits (default 6-9) appear only in ``test``.

    Args:
        rules: the rules drawn from (a subset of ``IDENTITY_RULES``).
        (the rest as in :class:`RelationalDigitsDataModule`)
    """

    min_classes = 4

    def __init__(
        self,
        held_out_classes: Sequence[int] = (6, 7, 8, 9),
        rules: Sequence[str] = IDENTITY_RULES,
        val_images: float = 0.2,
        train_size: int = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(held_out_classes, val_images, train_size, val_size, test_size, batch_size, eval_batch_size, num_workers, seed)
        if not rules:
            raise UserInputError(f"rules must name at least one of {list(IDENTITY_RULES)}")
        for rule in rules:
            check_choice("rules", rule, IDENTITY_RULES)
        self.rules = list(rules)

    def make_examples(self, images: torch.Tensor, labels: torch.Tensor, num_examples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return identity_rules(ClassPools(images, labels), num_examples, generator, self.rules)

    @property
    def num_classes(self) -> int:
        """Four candidates."""
        return 4
