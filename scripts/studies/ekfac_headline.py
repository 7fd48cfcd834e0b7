"""The EKFAC paper's headline at small scale (George, Laurent et al. 2018, figures 4-6): training
loss against wall-clock time for SGD, Adam, KFAC and EKFAC on a deep autoencoder and a
wide-residual classifier, both on the bundled 8x8 digits, on CPU.

Problems:

- ``autoencoder``: a tanh MLP 64-128-64-32-8-32-64-128-64 (8 Linear layers) reconstructing the
  flattened images, loss 1/2 ||f(x) - x||^2 averaged over the batch (the paper's MNIST autoencoder
  is 784-1000-500-250-30-250-500-1000-784 with a Bernoulli loss); KFAC/EKFAC use the regression
  Fisher (unit Gaussian, sampled targets).
- ``wrn``: WRN-10-1 (BatchNorm, 3 groups of 16/32/64 channels) on the 8x8 images, cross-entropy;
  KFAC/EKFAC precondition the convolutions and the classifier, BatchNorm takes SGD steps.

Protocol: every optimiser uses momentum 0.9 (Adam: its defaults), batch 64 and no weight decay.
Each optimiser's learning rate is picked by a small sweep (``--sweep-epochs`` epochs per value,
lowest full-training-set loss wins, diverged runs lose), then the winner trains for ``--epochs``
epochs. KFAC and EKFAC are the same optimiser (``callbacks.curvature.optimizer.EKFAC``) with the
same damping, KL clip and frequencies; KFAC has no scaling re-estimation. The optimisers of one
problem advance epoch by epoch in turn (SGD, Adam, KFAC, EKFAC, SGD, ...), so a change of the
machine's load hits all of them; each one's clock counts only its own training steps, not the
loss evaluation after every epoch. The clock is the process's CPU time on one torch thread
(``time.process_time``), which equals wall-clock time on an otherwise idle core and is not
inflated by other jobs on a shared machine; ``--clock wall`` uses ``time.perf_counter``.

Writes ``docs/figures/ekfac_headline.png`` (loss against seconds, log scale, one panel per
problem), prints a markdown table, and logs the curves and the figure to an offline W&B run
under ``logs/``.

    python scripts/studies/ekfac_headline.py                     # about 10 minutes on a loaded 2-core machine
    python scripts/studies/ekfac_headline.py --epochs 3 --sweep-epochs 1 --problems autoencoder
"""

import argparse
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from callbacks.curvature.optimizer import EKFAC, FisherStatistics
from framework.data import DigitsDataModule
from framework.models import MLP, WideResNet

FIGURE = Path(__file__).resolve().parents[2] / "docs" / "figures" / "ekfac_headline.png"
OPTIMISERS = ("sgd", "adam", "kfac", "ekfac")
LEARNING_RATES = {
    "autoencoder": {"sgd": (0.003, 0.01, 0.03), "adam": (1e-3, 3e-3, 1e-2), "kfac": (0.001, 0.003, 0.01), "ekfac": (0.001, 0.003, 0.01)},
    "wrn": {"sgd": (0.03, 0.1, 0.3), "adam": (1e-3, 3e-3, 1e-2), "kfac": (0.03, 0.1, 0.3), "ekfac": (0.03, 0.1, 0.3)},
}
# Curvature settings per problem. The autoencoder refreshes its statistics every step (cheap
# Linear layers) and needs no KL clip at these learning rates: its per-layer (block-diagonal)
# Gauss-Newton steps add up across its 8 layers, so learning rates above ~0.03 diverge even
# without momentum. The WRN uses the settings of configs/model/wrn_digits_ekfac.yaml.
CURVATURE = {
    "autoencoder": {"momentum": 0.9, "damping": 0.1, "kl_clip": None, "stats_every": 1, "eigen_every": 20, "scale_every": 1},
    "wrn": {"momentum": 0.9, "damping": 0.03, "kl_clip": 0.001, "stats_every": 5, "eigen_every": 25, "scale_every": 5},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=["autoencoder", "wrn"], choices=["autoencoder", "wrn"])
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the final runs")
    parser.add_argument("--sweep-epochs", type=int, default=2, help="epochs per learning rate in the sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-wandb", action="store_true")
    return parser.parse_args()


def autoencoder() -> nn.Module:
    return MLP(64, 64, hidden=(128, 64, 32, 8, 32, 64, 128), activation="tanh")


def wrn() -> nn.Module:
    return WideResNet(depth=10, widen_factor=1, num_classes=10, in_channels=1)


def reconstruction_loss(outputs: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs - inputs.flatten(1)).square().sum(1).mean()


def classification_loss(outputs: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, labels)


PROBLEMS = {"autoencoder": (autoencoder, reconstruction_loss, "regression"), "wrn": (wrn, classification_loss, "classification")}


@dataclass
class Run:
    """One optimiser training one model; advances an epoch at a time, timing only its steps."""

    problem: str
    name: str
    lr: float
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    seconds: float = 0.0
    curve: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _, self.loss_fn, task = PROBLEMS[self.problem]
        if self.name == "sgd":
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)
        elif self.name == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        else:
            settings = dict(CURVATURE[self.problem])
            if self.name == "kfac":
                settings["scale_every"] = None
            self.optimizer = EKFAC(self.model.parameters(), lr=self.lr, **settings)
        self.statistics = FisherStatistics(self.model, self.optimizer, "mc", task) if isinstance(self.optimizer, EKFAC) else None
        self.curve.append((0.0, self.training_loss()))

    def epoch(self, generator: torch.Generator, clock: Callable[[], float]) -> None:
        if not math.isfinite(self.curve[-1][1]):
            return
        self.model.train()
        start = clock()
        for index in torch.randperm(len(self.batches), generator=generator).tolist():
            inputs, labels = self.batches[index]
            self.optimizer.zero_grad()
            if self.statistics is None:
                outputs = self.model(inputs)
            else:
                with self.statistics.record(labels):
                    outputs = self.model(inputs)
            loss = self.loss_fn(outputs, inputs, labels)
            if not torch.isfinite(loss):
                break
            loss.backward()
            self.optimizer.step()
        self.seconds += clock() - start
        self.curve.append((self.seconds, self.training_loss()))

    @torch.no_grad()
    def training_loss(self) -> float:
        """Mean loss over the whole training set, BatchNorm in eval mode (inf if diverged)."""
        self.model.eval()
        total = sum(self.loss_fn(self.model(x), x, y).item() * len(y) for x, y in self.batches)
        loss = total / sum(len(y) for _, y in self.batches)
        return loss if math.isfinite(loss) else math.inf


def train(runs: dict[str, Run], epochs: int, args: argparse.Namespace) -> None:
    """Advance the runs epoch by epoch, in turn; the same shuffling for every optimiser."""
    generators = {name: torch.Generator().manual_seed(args.seed) for name in runs}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for _ in range(epochs):
        for name, run in runs.items():
            run.epoch(generators[name], clock)


def study(problem: str, args: argparse.Namespace, batches: list) -> tuple[dict[str, Run], dict[str, dict[float, float]]]:
    build = PROBLEMS[problem][0]
    torch.manual_seed(args.seed)
    initial = build()

    def make(name: str, lr: float) -> Run:
        return Run(problem, name, lr, copy.deepcopy(initial), batches)

    sweep: dict[str, dict[float, float]] = {name: {} for name in OPTIMISERS}
    for lr_index in range(3):
        runs = {name: make(name, LEARNING_RATES[problem][name][lr_index]) for name in OPTIMISERS}
        train(runs, args.sweep_epochs, args)
        for name, run in runs.items():
            sweep[name][run.lr] = run.curve[-1][1]
            print(f"{problem} sweep {name} lr={run.lr:g}: loss {run.curve[-1][1]:.4g} after {args.sweep_epochs} epochs, {run.seconds:.1f} s")
    best = {name: min(losses, key=losses.get) for name, losses in sweep.items()}
    finals = {name: make(name, best[name]) for name in OPTIMISERS}
    train(finals, args.epochs, args)
    return finals, sweep


def report(results: dict[str, dict[str, Run]], sweeps: dict[str, dict], args: argparse.Namespace) -> str:
    lines = ["| problem | optimiser | lr (sweep: final loss) | final loss | seconds | s/epoch | time to SGD's final loss |", "|" + " --- |" * 7]
    for problem, runs in results.items():
        target = runs["sgd"].curve[-1][1]
        for name, run in runs.items():
            swept = ", ".join(f"{lr:g}: {loss:.3g}" for lr, loss in sweeps[problem][name].items())
            reached = next((f"{seconds:.1f} s" for seconds, loss in run.curve if loss <= target), "not reached")
            lines.append(
                f"| {problem} | {name} | {run.lr:g} ({swept}) | {run.curve[-1][1]:.4g} | {run.seconds:.1f} | "
                f"{run.seconds / args.epochs:.2f} | {reached} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    titles = {"autoencoder": "Autoencoder 64-128-64-32-8-...-64 (tanh), digits", "wrn": "WRN-10-1 classifier, digits 8x8"}
    for axis, (problem, runs) in zip(axes[0], results.items()):
        for name, run in runs.items():
            seconds, losses = zip(*run.curve)
            axis.plot(seconds, losses, marker=".", label=f"{name.upper() if 'fac' in name else name.capitalize()} (lr {run.lr:g})")
        axis.set(title=titles[problem], xlabel="seconds of training (CPU time, 1 thread)", ylabel="training loss", yscale="log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def log_to_wandb(results: dict[str, dict[str, Run]], figure: Path) -> None:
    import wandb

    run = wandb.init(project="ekfac_headline", dir="logs", mode="offline", config={"problems": list(results)})
    table = wandb.Table(columns=["problem", "optimiser", "lr", "epoch", "seconds", "train_loss"])
    for problem, runs in results.items():
        for name, optimiser_run in runs.items():
            for epoch, (seconds, loss) in enumerate(optimiser_run.curve):
                table.add_data(problem, name, optimiser_run.lr, epoch, seconds, loss)
    run.log({"ekfac_headline/curves": table, "ekfac_headline/figure": wandb.Image(str(figure))})
    run.finish()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = DigitsDataModule(batch_size=64, seed=args.seed)
    data.setup("fit")
    batches = list(data.train_dataloader())
    print(f"{sum(len(y) for _, y in batches)} training images, {len(batches)} batches of 64")
    results, sweeps = {}, {}
    started = time.perf_counter()
    for problem in args.problems:
        results[problem], sweeps[problem] = study(problem, args, batches)
    print(f"total {time.perf_counter() - started:.0f} s")
    print(report(results, sweeps, args))
    plot(results, args.figure)
    if not args.no_wandb:
        log_to_wandb(results, args.figure)


if __name__ == "__main__":
    main()
