"""Lazy vs real training at small scale (George et al. 2022, "Lazy vs hasty"): does the real
model learn easy examples before hard ones while its lazy twins do not?

Three in-process fits of a 64-128-128-10 MLP (SGD lr 0.05, momentum 0.9, batch 64) on the
bundled 8x8 digits (1,257 training images), every training example tracked every 5 steps by
:class:`~callbacks.linearization.LazyVsReal`, twins alpha = 1, 10, 100 (lr / alpha^2) and the
linearised model:

1. reference: the real model alone from another initialisation (seed 1), saving the learning
   speed (cumulative training accuracy) of every example; an independent difficulty score, as
   C-scores are, so the groups do not come from the run they are compared on;
2. deciles: the twins and the model (seed 0), examples in 10 groups by the reference's learning
   speed (:class:`~callbacks.linearization.FileScores`);
3. label noise: the same with 20% of the training labels flipped (clean vs noisy groups).

Comparing regimes at equal training progress (as George et al. do): for each model, the
accuracy of each group where that model's accuracy on all tracked examples reaches a threshold
(interpolated between evaluations). Writes ``docs/figures/lazy_vs_real_deciles.png`` and
``docs/figures/lazy_vs_real_label_noise.png`` and prints a markdown summary. With
``--data mnist`` uses the MNIST IDX files in ``data/mnist`` (tracking ``--num-examples``
examples) instead. About 4 minutes on 2 busy cores at the default scale:

    python scripts/studies/lazy_vs_real.py
    python scripts/studies/lazy_vs_real.py --epochs 6 --every-k 10   # quicker
"""

import argparse
import logging
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from callbacks.linearization import DifficultyScore, FileScores, LabelNoise, LazyVsReal, LearningSpeed  # noqa: E402
from framework.data import DigitsDataModule, MNISTDataModule  # noqa: E402
from framework.models import MLP  # noqa: E402
from framework.tasks import ClassificationTask  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "docs" / "figures"
ALPHAS = (1.0, 10.0, 100.0)
DECILE_THRESHOLDS = (0.6, 0.8, 0.9, 0.95)
NOISE_THRESHOLDS = (0.5, 0.65, 0.75)


def fit(args: argparse.Namespace, seed: int, difficulty: DifficultyScore, twins: bool, save_scores: str | None = None) -> LazyVsReal:
    """One fit with the LazyVsReal callback; returns the callback (its history)."""
    L.seed_everything(seed, verbose=False)
    if args.data == "mnist":
        data = MNISTDataModule(root=args.mnist_root, batch_size=args.batch_size, seed=0)
        in_features = 28 * 28
    else:
        data = DigitsDataModule(batch_size=args.batch_size, seed=0)
        in_features = 64
    task = ClassificationTask(MLP(in_features, 10, hidden=(args.width, args.width)), optimizer=partial(torch.optim.SGD, lr=args.lr, momentum=0.9))
    callback = LazyVsReal(
        alphas=ALPHAS if twins else (),
        linearized=twins,
        difficulty=difficulty,
        every_k=args.every_k,
        num_examples=args.num_examples,
        save_scores=save_scores,
    )
    trainer = L.Trainer(
        callbacks=[callback], max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, deterministic=True,
    )
    trainer.fit(task, datamodule=data)
    return callback


def at_progress(callback: LazyVsReal, threshold: float) -> dict[str, tuple[int, np.ndarray] | None]:
    """For each model: (first evaluation step with accuracy on all tracked examples >= threshold,
    accuracy of each group interpolated linearly between that evaluation and the previous one to
    where the overall accuracy equals the threshold), or None if the model never got there."""
    curves = callback.group_curves()
    overall = torch.stack(callback.correct).double().mean(dim=-1)  # (T, models)
    found: dict[str, tuple[int, np.ndarray] | None] = {}
    for m, name in enumerate(callback.names):
        reached = torch.nonzero(overall[:, m] >= threshold)
        if len(reached) == 0:
            found[name] = None
            continue
        t = int(reached[0, 0])
        accuracy = curves["accuracy"][t, m]
        if t > 0:
            weight = (threshold - overall[t - 1, m]) / (overall[t, m] - overall[t - 1, m])
            accuracy = curves["accuracy"][t - 1, m] + weight * (accuracy - curves["accuracy"][t - 1, m])
        found[name] = (int(curves["steps"][t]), accuracy.numpy())
    return found


def plot(callback: LazyVsReal, path: Path, title: str, labels: list[str]) -> None:
    """Per model: group accuracy against the step (top) and against the model's accuracy on all
    tracked examples (bottom, equal training progress)."""
    curves = callback.group_curves()
    overall = torch.stack(callback.correct).double().mean(dim=-1).numpy()
    steps = curves["steps"].numpy()
    groups = curves["accuracy"].shape[-1]
    colours = plt.cm.viridis(np.linspace(0.0, 0.9, groups))
    figure, axes = plt.subplots(2, len(callback.names), figsize=(3.2 * len(callback.names), 6.4), sharey=True)
    for m, name in enumerate(callback.names):
        for g in range(groups):
            accuracy = curves["accuracy"][:, m, g].numpy()
            axes[0, m].plot(steps, accuracy, color=colours[g], label=labels[g])
            axes[1, m].plot(overall[:, m], accuracy, color=colours[g])
        axes[1, m].plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        axes[0, m].set_title(name)
        axes[0, m].set_xlabel("step")
        axes[1, m].set_xlabel("accuracy on all tracked examples")
    axes[0, 0].set_ylabel("group accuracy")
    axes[1, 0].set_ylabel("group accuracy")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary(callback: LazyVsReal, thresholds: tuple[float, ...], columns: list[tuple[str, list[int]]]) -> str:
    """A markdown table: per threshold of overall accuracy and model, the step it is reached and
    the accuracy of the named (sets of) groups there."""
    header = "| overall acc | model | step | " + " | ".join(name for name, _ in columns) + " |"
    lines = [header, "|" + "---|" * (3 + len(columns))]
    for threshold in thresholds:
        for name, found in at_progress(callback, threshold).items():
            if found is None:
                lines.append(f"| {threshold} | {name} | not reached | " + " | ".join("" for _ in columns) + " |")
                continue
            step, accuracy = found
            cells = [f"{accuracy[groups].mean():.3f}" for _, groups in columns]
            lines.append(f"| {threshold} | {name} | {step} | " + " | ".join(cells) + " |")
    curves = callback.group_curves()
    overall = torch.stack(callback.correct).double().mean(dim=-1)[-1]
    for m, name in enumerate(callback.names):
        cells = [f"{curves['accuracy'][-1, m, groups].mean().item():.3f}" for _, groups in columns]
        lines.append(f"| end: {overall[m].item():.3f} | {name} | {callback.steps[-1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--mnist-root", default=str(REPO / "data" / "mnist"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--every-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--num-examples", type=int, default=None, help="tracked examples (default all; use ~2000 for MNIST)")
    parser.add_argument("--noise", type=float, default=0.2, help="fraction of flipped labels in the label-noise run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figure-prefix", default="lazy_vs_real", help="figures go to docs/figures/<prefix>_{deciles,label_noise}.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    FIGURES.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        scores = str(Path(directory) / "learning_speed.npy")
        fit(args, seed=1, difficulty=LearningSpeed(), twins=False, save_scores=scores)
        deciles = fit(args, seed=0, difficulty=FileScores(scores), twins=True)
    noisy = fit(args, seed=0, difficulty=LabelNoise(args.noise, seed=0), twins=True)
    scale = f"{args.data}, MLP {args.width}-{args.width}, SGD lr {args.lr}, {args.epochs} epochs"
    plot(deciles, FIGURES / f"{args.figure_prefix}_deciles.png", f"Accuracy by learning-speed decile (0 easiest), {scale}", [f"decile {g}" for g in range(10)])
    plot(noisy, FIGURES / f"{args.figure_prefix}_label_noise.png", f"{args.noise:.0%} flipped labels, {scale}", ["clean", "noisy"])
    print(f"## deciles of learning speed (independent run), {scale}\n")
    print(summary(deciles, DECILE_THRESHOLDS, [("easiest 3 deciles", [0, 1, 2]), ("middle 4", [3, 4, 5, 6]), ("hardest 3 deciles", [7, 8, 9]), ("hardest decile", [9])]))
    print(f"\n## {args.noise:.0%} label noise, {scale}\n")
    print(summary(noisy, NOISE_THRESHOLDS, [("clean", [0]), ("noisy (memorised)", [1])]))
    print(f"\nstudy time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
