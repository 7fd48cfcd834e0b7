"""Does the empirical NTK align with the labels during training, and which layers lead?
(Baratin et al. 2021, at small scale.)

Trains a SmallCNN 16-32 and an MLP 64-256-256-10 on the 8x8 digits (1,258 training images,
batch 64, SGD lr 0.05 momentum 0.9, seed 0, CPU) with the ``NTKAlignment`` callback on a probe
of 256 training examples on the dense log-spaced schedule 5 * floor(1.15^k) (log_base 5, not the
callback's sparser default), logging through a CSVLogger. Writes
``docs/figures/ntk_alignment_digits.png`` (centred kernel-target alignment, total and per layer,
alignment with the initial kernel, and the trace, against the step) and
``docs/figures/ntk_kernel_heatmap.png`` (the CNN's traced kernel on the probe sorted by class,
at initialisation and at the end), and prints a summary table.

    python scripts/studies/ntk_alignment.py              # 15 epochs per model, a few minutes on a quiet CPU
    python scripts/studies/ntk_alignment.py --epochs 5   # quicker
    python scripts/studies/ntk_alignment.py --data mnist --epochs 2   # MNIST IDX files in data/mnist

With ``--data mnist`` the MLP is 784-256-256-10 and the figures are named ``*_mnist.png``.
"""

import argparse
import csv
import functools
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from callbacks.linearization import NTKAlignment  # noqa: E402
from framework.data import DigitsDataModule, MNISTDataModule  # noqa: E402
from framework.models import MLP, SmallCNN  # noqa: E402
from framework.tasks import ClassificationTask  # noqa: E402

FIGURES = ROOT / "docs" / "figures"
LAYER_NAMES = {  # parameter-owning modules of each backbone, input to output
    "cnn": {"backbone.features.0": "conv 1", "backbone.features.3": "conv 2", "backbone.classifier": "linear (head)"},
    "mlp": {"backbone.layers.1": "linear 1", "backbone.layers.3": "linear 2", "backbone.layers.5": "linear 3 (head)"},
}


def train(
    model_name: str, epochs: int, probe_size: int, directory: Path, datamodule: L.LightningDataModule, input_size: int
) -> tuple[list[dict[str, float]], NTKAlignment, torch.Tensor, float]:
    """One run; returns the logged NTK rows (by step), the callback, the final kernel and the
    final validation accuracy."""
    L.seed_everything(0, verbose=False)
    backbone = SmallCNN(1, 10, channels=(16, 32)) if model_name == "cnn" else MLP(input_size, 10, hidden=(256, 256))
    task = ClassificationTask(backbone=backbone, num_classes=10, optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    callback = NTKAlignment(probe_size=probe_size, log_base=5)  # dense early points, as in docs/results.md
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=CSVLogger(directory, name=model_name), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=5, deterministic=True,
    )
    trainer.fit(task, datamodule=datamodule)
    accuracy = trainer.validate(task, datamodule=datamodule, verbose=False)[0]["val/acc"]
    _, final_kernel = callback.measure(trainer, task)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]
    return [row for row in rows if "ntk/alignment" in row], callback, final_kernel, accuracy


def plot_curves(runs: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for row, (model_name, (records, *_)) in zip(axes, runs.items()):
        steps = [r["step"] for r in records]
        x = [max(s, 1) for s in steps]  # step 0 drawn at 1 on the log axis
        row[0].semilogx(x, [r["ntk/alignment"] for r in records], "k-o", markersize=3, label="total")
        for key, label in LAYER_NAMES[model_name].items():
            row[0].semilogx(x, [r[f"ntk/alignment/{key}"] for r in records], "-", marker=".", label=label)
        row[0].set_ylabel("centred kernel-target alignment")
        row[1].semilogx(x, [r["ntk/kernel_alignment_to_init"] for r in records], "-o", markersize=3)
        row[1].set_ylabel("alignment with the kernel at step 0")
        row[2].loglog(x, [r["ntk/trace"] for r in records], "-o", markersize=3, label="trace")
        row[2].loglog(x, [r["ntk/eigenvalue_1"] for r in records], "--", label="largest eigenvalue")
        row[2].set_ylabel("kernel trace / eigenvalue")
        row[0].legend(fontsize=8)
        row[2].legend(fontsize=8)
        title = "SmallCNN 16-32" if model_name == "cnn" else "MLP 64-256-256-10"
        for axis in row:
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("training step (step 0 at 1)")
            axis.grid(True, which="both", alpha=0.3)
    figure.suptitle("Empirical NTK (traced, mean over outputs) on 256 training digits during SGD")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def plot_heatmaps(callback: NTKAlignment, final_kernel: torch.Tensor, path: Path) -> None:
    import matplotlib.pyplot as plt

    targets = callback.probe[1].cpu()
    boundaries = [i for i in range(1, len(targets)) if targets[i] != targets[i - 1]]
    figure, axes = plt.subplots(1, 2, figsize=(11, 5))
    for axis, (title, kernel) in zip(axes, [("at initialisation", callback.initial_kernel), ("after training", final_kernel)]):
        image = axis.imshow(kernel.numpy(), cmap="Blues")
        for boundary in boundaries:
            axis.axhline(boundary - 0.5, color="tab:red", linewidth=0.4)
            axis.axvline(boundary - 0.5, color="tab:red", linewidth=0.4)
        axis.set_title(f"SmallCNN NTK {title}", fontsize=10)
        axis.set_xlabel("probe example (sorted by class)")
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--mnist-root", default=str(ROOT / "data" / "mnist"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    FIGURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        runs = {}
        for name in ("cnn", "mlp"):  # a fresh data module per run: each fit sets it up for its trainer
            data = MNISTDataModule(root=args.mnist_root, batch_size=64) if args.data == "mnist" else DigitsDataModule(batch_size=64)
            runs[name] = train(name, args.epochs, args.probe_size, Path(directory), data, 784 if args.data == "mnist" else 64)
    suffix = "_mnist" if args.data == "mnist" else ""
    curves, heatmaps = FIGURES / f"ntk_alignment_digits{suffix}.png", FIGURES / f"ntk_kernel_heatmap{suffix}.png"
    plot_curves(runs, curves)
    plot_heatmaps(runs["cnn"][1], runs["cnn"][2], heatmaps)
    for model_name, (records, _, _, accuracy) in runs.items():
        print(f"\n## {model_name}: final validation accuracy {accuracy:.3f}\n")
        layers = LAYER_NAMES[model_name]
        print("| step | alignment | " + " | ".join(layers.values()) + " | to init | trace | largest eigenvalue |")
        print("|" + " --- |" * (len(layers) + 5))
        for r in records:
            cells = [f"{r['ntk/alignment']:.3f}", *(f"{r[f'ntk/alignment/{k}']:.3f}" for k in layers)]
            cells += [f"{r['ntk/kernel_alignment_to_init']:.3f}", f"{r['ntk/trace']:.4g}", f"{r['ntk/eigenvalue_1']:.4g}"]
            print(f"| {int(r['step'])} | " + " | ".join(cells) + " |")
    print(f"\nfigures: {curves}, {heatmaps}")


if __name__ == "__main__":
    main()
