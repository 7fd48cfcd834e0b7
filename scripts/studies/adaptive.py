"""Adaptive computation on Stroop digits: what the cost of effort does to accuracy and compute.

For each adaptive model (PonderNet, ACT, the early-exit CNN, the habitual/controlled network)
and each lambda of the cost-of-effort penalty (``lambda * expected steps`` added to the
task loss, :mod:`callbacks.effort`), trains on Stroop digits (80% congruent) and measures, with
the adaptive inference (each input run only up to its halting / exit / gate decision):

1. the accuracy-compute Pareto curve over lambda (test accuracy against inference FLOPs);
2. the compute spent on congruent vs incongruent validation items;
3. the accuracy on the all-incongruent test set with and without the penalty;
4. distilling the habitual path from the controlled one (``distill_weight``) and what it does
   to compute.

Training is a plain PyTorch loop over the callback's functional core (``LambdaSchedule``,
``effort_penalty``, ``summarize``), the same computation as ``Effort`` in a Trainer, without the
Trainer's per-step overhead. Writes ``docs/figures/adaptive_*.png`` and prints the tables of
``docs/results.md``. Default scale: 8x8 Stroop digits, 8 epochs, batch 64, one seed, lambda in
{0, 0.01, 0.03, 0.1, 0.3}: about 5-10 minutes on 2 loaded cores.

    python scripts/studies/adaptive.py [--epochs 8] [--lambdas 0 0.01 0.03 0.1 0.3]
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from callbacks.effort import ComputeRecord, LambdaSchedule, effort_penalty, summarize
from framework.data.stroop import StroopDigitsDataModule
from framework.models.adaptive import AdaptiveComputation, AdaptiveComputationTime, EarlyExitCNN, HabitualControlledNet, PonderNet

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"
MODELS: dict[str, Callable[..., AdaptiveComputation]] = {
    "PonderNet": lambda: PonderNet(192, 10, hidden=32, max_steps=6, prior_halt=0.3),
    "ACT": lambda: AdaptiveComputationTime(192, 10, hidden=32, max_steps=6, eps=0.01),
    "EarlyExitCNN": lambda: EarlyExitCNN(3, 10, channels=(16, 32, 64)),
    "HabitualControlled": lambda distill_weight=0.0: HabitualControlledNet(3, 8, 10, habitual_hidden=32, controlled_channels=(16, 32, 64), distill_weight=distill_weight),
}


def train(model: AdaptiveComputation, data: StroopDigitsDataModule, weight: float, epochs: int, seed: int) -> AdaptiveComputation:
    """Adam on cross-entropy of the model's output + the model's own regularization (e.g. the
    distillation term) + lambda * mean expected steps, lambda warmed up linearly over the first
    epoch."""
    torch.manual_seed(seed)
    x, y = data.datasets["train"].tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches_per_epoch = -(-len(y) // data.batch_size)
    schedule = LambdaSchedule(weight, "linear", warmup_steps=batches_per_epoch)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), data.batch_size):
            index = order[start : start + data.batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            regularization = getattr(model, "regularization", None)
            if regularization is not None:
                loss = loss + regularization()
            loss = loss + schedule(step) * effort_penalty(model, "steps")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


@torch.no_grad()
def evaluate(model: AdaptiveComputation, data: StroopDigitsDataModule, split: str) -> dict[str, dict[str, float]]:
    """Per group (all, classes, congruent, incongruent): expected and inference compute and the
    adaptive inference's accuracy on ``split``."""
    x, y = data.datasets[split].tensors
    model(x)
    expected_steps, expected_flops = model.expected_compute("steps"), model.expected_compute("flops")
    logits, steps = model.forward_adaptive(x)
    record = ComputeRecord(expected_steps, expected_flops, steps, model.compute_of_steps(steps, "flops", x.shape[1:]), logits.argmax(dim=1) == y, y, data.example_groups(x, y))
    return summarize(record)


def run(epochs: int, lambdas: list[float], seed: int) -> dict:
    data = StroopDigitsDataModule(batch_size=64, seed=0)
    data.setup()
    results: dict = {"lambda": {}, "distillation": {}}
    for name, factory in MODELS.items():
        for weight in lambdas:
            started = time.perf_counter()
            model = train(factory(), data, weight, epochs, seed)
            full_flops = model.cumulative_flops((3, 8, 8))[-1].item()
            row = {"val": evaluate(model, data, "val"), "test": evaluate(model, data, "test"), "full_flops": full_flops}
            results["lambda"].setdefault(name, {})[str(weight)] = row
            print(
                f"{name:18s} lambda={weight:<5g} test acc {row['test']['all']['accuracy']:.3f} "
                f"inference FLOPs {row['test']['all']['inference_flops'] / full_flops:.2f} of full, "
                f"steps val congruent {row['val']['congruent']['inference_steps']:.2f} / incongruent {row['val']['incongruent']['inference_steps']:.2f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    distill_lambda = lambdas[len(lambdas) // 2]
    for distill_weight in (0.0, 1.0):
        model = train(MODELS["HabitualControlled"](distill_weight), data, distill_lambda, epochs, seed)
        row = {"val": evaluate(model, data, "val"), "test": evaluate(model, data, "test"), "lambda": distill_lambda}
        results["distillation"][str(distill_weight)] = row
        print(f"distill_weight={distill_weight}: test acc {row['test']['all']['accuracy']:.3f}, controlled fraction (test) {row['test']['all']['inference_steps'] - 1:.2f}", flush=True)
    return results


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for name, rows in results["lambda"].items():
        points = sorted((row["test"]["all"]["inference_flops"] / row["full_flops"], row["test"]["all"]["accuracy"], float(weight)) for weight, row in rows.items())
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
        for relative, accuracy, weight in points:
            axis.annotate(f"{weight:g}", (relative, accuracy), fontsize=7, textcoords="offset points", xytext=(3, 3))
    axis.set(xlabel="inference FLOPs / full model", ylabel="test accuracy (all incongruent)", title="Accuracy-compute over lambda (labels: lambda)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(FIGURES / "adaptive_pareto.png", dpi=120)

    names = list(results["lambda"])
    weights = list(next(iter(results["lambda"].values())))
    figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharey=False)
    for axis, name in zip(axes, names):
        rows = results["lambda"][name]
        for group, style in (("congruent", "o-"), ("incongruent", "s--")):
            axis.plot(range(len(weights)), [rows[w]["val"][group]["inference_steps"] for w in weights], style, label=group)
        axis.set_xticks(range(len(weights)), weights)
        axis.set(title=name, xlabel="lambda", ylabel="mean steps at inference (val)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(FIGURES / "adaptive_congruence.png", dpi=120)

    figure, axes = plt.subplots(1, 2, figsize=(7.5, 3.6))
    labels = list(results["distillation"])
    rows = [results["distillation"][label] for label in labels]
    axes[0].bar(labels, [row["test"]["all"]["accuracy"] for row in rows])
    axes[0].set(xlabel="distill_weight", ylabel="test accuracy")
    axes[1].bar(labels, [row["test"]["all"]["inference_steps"] - 1 for row in rows])
    axes[1].set(xlabel="distill_weight", ylabel="share to controlled path (test)")
    figure.suptitle(f"Distilling the habitual path from the controlled one (lambda={rows[0]['lambda']:g})")
    figure.tight_layout()
    figure.savefig(FIGURES / "adaptive_distillation.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = run(args.epochs, args.lambdas, args.seed)
    plot(results)
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=1))
    print(f"total {time.perf_counter() - started:.0f} s; figures in {FIGURES}")


if __name__ == "__main__":
    main()
