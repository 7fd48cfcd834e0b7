"""Per-example difficulty for comparing lazy and real training (George et al. 2022): scores, the
label-noise dataset wrapper, reading precomputed scores from a file, and grouping by score.

Convention everywhere: a higher score is a harder example, and group 0 holds the easiest
examples. Scores are indexed by position in the training dataset (``trainer.train_dataloader.dataset``).

The pluggable scores (:class:`DifficultyScore` subclasses, one YAML node each):

- :class:`LearningSpeed`: one minus the cumulative accuracy of a model on the example over
  training (Jiang et al. 2021's learning-speed proxy of the C-score). Dynamic: it grows with the
  evaluations seen so far.
- :class:`ForgettingEvents`: how often the example went from correct to incorrect between
  consecutive evaluations (Toneva et al. 2019, who count at each minibatch presentation; here at
  the callback's scheduled evaluations of the tracked examples, in eval mode); never-learned
  examples count as infinitely often forgotten, as in Toneva et al. Dynamic.
- :class:`LabelNoise`: flips the labels of a fraction of the training set (:class:`NoisyLabels`);
  score 1 for a flipped example, 0 otherwise, grouped into clean (0) and noisy (1).
- :class:`FileScores`: precomputed scores (e.g. C-scores) from a ``.npy``, ``.pt`` or ``.csv`` file.
"""

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from framework.errors import DataFileError, UserInputError, check_positive

FILE_LAYOUT = (
    "a 1-D array of one finite score per training example, entry i for dataset index i "
    "(.npy: numpy array; .pt: torch tensor; .csv: one score per line, or 'index,score' lines, "
    "with an optional header)"
)


def learning_speed(correct: torch.Tensor) -> torch.Tensor:
    """Cumulative accuracy of each example over the evaluations so far: ``correct`` is
    (evaluations, examples) boolean, the result (examples,) in [0, 1] (0 with no evaluation)."""
    if correct.shape[0] == 0:
        return torch.zeros(correct.shape[1], dtype=torch.float64)
    return correct.double().mean(dim=0)


def forgetting_events(correct: torch.Tensor) -> torch.Tensor:
    """The number of correct-to-incorrect transitions of each example between consecutive
    evaluations: ``correct`` is (evaluations, examples) boolean, the result (examples,) int64."""
    return (correct[:-1] & ~correct[1:]).sum(dim=0)


def quantile_groups(scores: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Split examples into ``num_groups`` groups of (nearly) equal size by rank of score: group 0
    the lowest (easiest) scores. Ties are broken by position, so the split is deterministic."""
    check_positive("num_groups", num_groups)
    if num_groups > len(scores):
        raise UserInputError(f"num_groups={num_groups} exceeds the {len(scores)} tracked examples")
    order = torch.sort(scores.double(), stable=True).indices
    groups = torch.empty(len(scores), dtype=torch.int64)
    groups[order] = torch.arange(len(scores)) * num_groups // len(scores)
    return groups


def group_means(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The mean of ``values`` (..., examples) over the examples of each group: (..., num_groups);
    NaN for an empty group."""
    one_hot = torch.nn.functional.one_hot(groups, num_groups).to(torch.float64)
    sums = values.to(torch.float64) @ one_hot
    counts = one_hot.sum(dim=0)
    return sums / counts


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(fraction * N)`` labels, chosen with ``seed``, each to a different class
    drawn uniformly from the other ``num_classes - 1``. Returns the new labels and the boolean
    mask of flipped examples."""
    if not 0.0 <= fraction <= 1.0:
        raise UserInputError(f"fraction={fraction!r} must be in [0, 1] (the fraction of labels flipped)")
    if num_classes < 2:
        raise UserInputError(f"num_classes={num_classes} must be >= 2 to flip labels")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))]
    shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The class label (second element) of every example of a dataset, int64; read from the
    tensor directly for a ``TensorDataset``."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        labels = tensors[1]
    else:
        labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    if labels.ndim != 1:
        raise UserInputError(f"label noise needs one class index per example; the training labels have shape {tuple(labels.shape)}")
    return labels.to(torch.int64)


class NoisyLabels(Dataset):
    """``dataset`` with the labels of a fraction of its examples flipped (:func:`flip_labels`),
    deterministically from ``seed``; ``flipped`` records which. Items are ``(input, label, *rest)``."""

    def __init__(self, dataset: Dataset, fraction: float, seed: int = 0, num_classes: int | None = None) -> None:
        self.dataset = dataset
        self.fraction = fraction
        self.seed = seed
        clean = dataset_labels(dataset)
        self.num_classes = int(clean.max()) + 1 if num_classes is None else num_classes
        self.labels, self.flipped = flip_labels(clean, fraction, self.num_classes, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        return (item[0], self.labels[index], *item[2:])


def read_scores(path: str | Path, num_examples: int) -> torch.Tensor:
    """Per-example scores (float64, length ``num_examples``) from a ``.npy``, ``.pt`` or ``.csv``
    file laid out as :data:`FILE_LAYOUT`; a missing or malformed file raises
    :class:`DataFileError` naming the path and the expected layout. NaN entries are allowed here
    (examples not scored); the caller checks the examples it uses."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"score file {path} does not exist; expected {FILE_LAYOUT}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            scores = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float64))
        elif suffix == ".pt":
            loaded = torch.load(path, weights_only=True, map_location="cpu")
            if not isinstance(loaded, torch.Tensor):
                raise ValueError(f"holds a {type(loaded).__name__}, not a tensor")
            scores = loaded.to(torch.float64)
        elif suffix == ".csv":
            scores = _read_csv_scores(path)
        else:
            raise ValueError(f"unknown suffix {suffix!r}")
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        raise DataFileError(f"score file {path} could not be read ({error}); expected {FILE_LAYOUT}") from None
    if scores.ndim != 1 or len(scores) != num_examples:
        raise DataFileError(f"score file {path} has shape {tuple(scores.shape)}, not ({num_examples},); expected {FILE_LAYOUT}")
    if torch.isinf(scores).any():
        raise DataFileError(f"score file {path} holds infinite scores; expected {FILE_LAYOUT}")
    return scores


def _read_csv_scores(path: Path) -> torch.Tensor:
    """One score per line, or ``index,score`` lines with each index 0..N-1 exactly once; an
    optional non-numeric header line."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and not _numeric(rows[0]):
        rows = rows[1:]
    widths = {len(row) for row in rows}
    if not rows or len(widths) != 1 or widths.pop() not in (1, 2):
        raise ValueError("rows must all have one column (score) or two (index, score)")
    values = np.array(rows, dtype=np.float64)
    if values.shape[1] == 1:
        return torch.from_numpy(values[:, 0])
    indices = values[:, 0]
    if not np.array_equal(np.sort(indices), np.arange(len(indices))):
        raise ValueError("the index column must hold each index 0..N-1 exactly once")
    scores = np.empty(len(indices))
    scores[indices.astype(np.int64)] = values[:, 1]
    return torch.from_numpy(scores)


def _numeric(row: list[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return False
    return True


def write_scores(path: str | Path, scores: torch.Tensor) -> None:
    """Write per-example scores (NaN for unscored examples) as ``.npy``, ``.pt`` or ``.csv``,
    readable by :func:`read_scores`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = scores.detach().double().cpu()
    if path.suffix == ".npy":
        np.save(path, values.numpy())
    elif path.suffix == ".pt":
        torch.save(values, path)
    elif path.suffix == ".csv":
        path.write_text("index,score\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(values.tolist())))
    else:
        raise UserInputError(f"score file {path}: suffix must be one of ['.npy', '.pt', '.csv']")


class DifficultyScore:
    """A per-example difficulty score (higher is harder) of the tracked training examples.

    ``dynamic`` scores depend on the training so far, through the per-evaluation correctness of
    the model named ``reference`` (``real`` or a twin's name); static ones are fixed at start-up.
    ``num_groups`` is the default number of groups (deciles)."""

    dynamic = False
    num_groups = 10
    reference = "real"

    def prepare(self, trainer: L.Trainer) -> None:
        """Called in the callback's ``setup``, before the data loaders exist (e.g. to change the
        training data)."""

    def setup(self, dataset: Dataset) -> None:
        """Called once the training dataset is known, before the first score (e.g. to read a file)."""

    def scores(self, indices: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """Scores (float64) of the tracked examples: ``indices`` their positions in the training
        dataset, ``correct`` (evaluations so far, examples) the reference model's correctness."""
        raise NotImplementedError

    def check_num_groups(self, num_groups: int) -> None:
        """Refuse a number of groups this score cannot make (checked at start-up)."""
        check_positive("num_groups", num_groups)

    def groups(self, scores: torch.Tensor, num_groups: int) -> torch.Tensor:
        """The group (0 easiest) of each tracked example."""
        return quantile_groups(scores, num_groups)


class LearningSpeed(DifficultyScore):
    """One minus the cumulative accuracy of the ``reference`` model on each example over the
    evaluations so far (the slower learned, the harder).

    Args:
        reference: ``real`` or the name of a twin (e.g. ``alpha_10``, ``linearized``).
    """

    dynamic = True

    def __init__(self, reference: str = "real") -> None:
        self.reference = reference

    def scores(self, indices: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        return 1.0 - learning_speed(correct)


class ForgettingEvents(DifficultyScore):
    """The number of forgetting events (correct then incorrect at the next evaluation) of the
    ``reference`` model; examples never correct so far score infinity (hardest), as in Toneva et al.

    Args:
        reference: ``real`` or the name of a twin.
    """

    dynamic = True

    def __init__(self, reference: str = "real") -> None:
        self.reference = reference

    def scores(self, indices: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        events = forgetting_events(correct).double()
        return torch.where(correct.any(dim=0), events, torch.inf)


class LabelNoise(DifficultyScore):
    """Injected label noise: the labels of ``fraction`` of the training set are flipped (to
    another class, chosen with ``seed``) before training; flipped examples score 1, the others 0,
    in two groups: clean (0) and noisy (1). Needs a framework data module (``datasets["train"]``).

    Args:
        fraction: fraction of training labels flipped, in (0, 1).
        seed: chooses the examples and their new labels.
        num_classes: number of classes; default the largest training label plus one.
    """

    num_groups = 2

    def __init__(self, fraction: float = 0.2, seed: int = 0, num_classes: int | None = None) -> None:
        if not 0.0 < fraction < 1.0:
            raise UserInputError(f"fraction={fraction!r} must be in (0, 1) (the fraction of training labels flipped)")
        if num_classes is not None and num_classes < 2:
            raise UserInputError(f"num_classes={num_classes} must be >= 2 to flip labels")
        self.fraction = fraction
        self.seed = seed
        self.num_classes = num_classes
        self.flipped: torch.Tensor | None = None

    def prepare(self, trainer: L.Trainer) -> None:
        datasets = getattr(trainer.datamodule, "datasets", None)
        if not isinstance(datasets, dict) or "train" not in datasets:
            raise UserInputError("LabelNoise needs a framework data module (a SplitDataModule with datasets['train'])")
        train = datasets["train"]
        if not isinstance(train, NoisyLabels):
            train = datasets["train"] = NoisyLabels(train, self.fraction, self.seed, self.num_classes)
        self.flipped = train.flipped

    def scores(self, indices: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        if self.flipped is None:
            raise RuntimeError("LabelNoise.prepare was not called before scores")
        return self.flipped[indices].double()

    def check_num_groups(self, num_groups: int) -> None:
        if num_groups != 2:
            raise UserInputError(f"num_groups={num_groups}: LabelNoise has exactly 2 groups (clean, noisy)")

    def groups(self, scores: torch.Tensor, num_groups: int) -> torch.Tensor:
        self.check_num_groups(num_groups)
        return scores.long()


class FileScores(DifficultyScore):
    """Precomputed per-example scores read from ``path`` (e.g. C-scores), laid out as
    :data:`FILE_LAYOUT` and indexed by position in the training dataset.

    Args:
        path: ``.npy``, ``.pt`` or ``.csv`` file.
        higher_is_harder: true if a higher score means a harder example; false for scores such as
            C-scores, where a higher score means an easier (more consistently learned) example.
    """

    def __init__(self, path: str, higher_is_harder: bool = True) -> None:
        if Path(path).suffix.lower() not in (".npy", ".pt", ".csv"):
            raise UserInputError(f"path={path!r}: the score file must end in .npy, .pt or .csv")
        self.path = path
        self.higher_is_harder = higher_is_harder
        self.values: torch.Tensor | None = None

    def setup(self, dataset: Dataset) -> None:
        self.values = read_scores(self.path, len(dataset))

    def scores(self, indices: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            raise RuntimeError("FileScores.setup was not called before scores")
        chosen = self.values[indices]
        if torch.isnan(chosen).any():
            missing = indices[torch.isnan(chosen)][:5].tolist()
            raise DataFileError(f"score file {self.path} has no score (NaN) for tracked examples {missing}; expected {FILE_LAYOUT}")
        return chosen if self.higher_is_harder else -chosen
