"""Laurent et al. 2020 ("Revisiting loss modelling for unstructured pruning") at small scale.

Question: does a criterion that preserves the training loss better when pruning (MP, LM, QM,
OBD; one-shot or iterative; with or without the locality penalty lambda) also give a better test
accuracy after fine-tuning?

Per model (an MLP and a small CNN), a dense network is trained, then for every criterion x
number of pruning steps (1 = one-shot, 14, 140; exponential schedule, scores recomputed at
every step from full-batch gradients and Fisher diagonals, no training between steps, as in the
paper) x final sparsity x lambda, a copy is pruned with :func:`callbacks.pruning.prune` and then
fine-tuned for a few epochs with pruned weights held at zero
(:func:`callbacks.pruning.keep_pruned_at_zero`). Recorded: training loss and test accuracy of
the dense model, just after pruning, and after fine-tuning. The locality penalty is given in
units of the dense model's mean Fisher diagonal (lambda = factor x mean F_ii), so lambda = 1
weighs the penalty like OBD's term at an average weight. MP ranks the same for every lambda
(|w| + lambda/2 w^2 is increasing in |w|) and, without training between steps, for every
number of steps, so it runs once (lambda = 0, one-shot) per sparsity.

The functional core is used directly in a plain loop (no Trainer). Data: the bundled 8x8 digits
(1,257 training images, all in one full batch for the scores; 360 test images), or MNIST
(``--data mnist``, files in ``--mnist-root`` via ``framework.data.MNISTDataModule``;
``--mnist-train`` training images are used, the scores are computed on ``--score-examples``
of them). Writes ``docs/figures/pruning_study.json``, ``docs/figures/pruning_accuracy.png``
and ``docs/figures/pruning_loss_vs_accuracy.png`` and prints a markdown table.

    python scripts/studies/pruning_study.py --threads 1        # both models on digits: 46 min at load 20-28 on 2 cores
    python scripts/studies/pruning_study.py --replot           # summary, table and figures again from the JSON
    python scripts/studies/pruning_study.py --models mlp --steps 1 14 --mlp-sparsities 0.9   # a quick look
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from callbacks.pruning import (
    CRITERIA,
    accuracy,
    fisher_diagonals,
    keep_pruned_at_zero,
    mean_loss,
    negative_log_likelihood,
    prunable_tensors,
    prune,
    sparsity,
    target_sparsity,
)
from framework.data import DigitsDataModule, MNISTDataModule
from framework.data.files import DataFileError, check_mnist_root
from framework.models import MLP, SmallCNN

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
LOSS = negative_log_likelihood("classification")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    parser.add_argument("--data", choices=("auto", "digits", "mnist"), default="auto", help="auto: MNIST when its files are in --mnist-root, else digits")
    parser.add_argument("--mnist-root", default="data/mnist")
    parser.add_argument("--mnist-train", type=int, default=5000, help="MNIST training images used (the rest is not read)")
    parser.add_argument("--score-examples", type=int, default=500, help="training examples the scores are computed on (one batch)")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 14, 140], help="pruning steps (1: one-shot)")
    parser.add_argument("--mlp-sparsities", nargs="+", type=float, default=[0.9, 0.97], help="final sparsities of the MLP")
    parser.add_argument("--cnn-sparsities", nargs="+", type=float, default=[0.6, 0.85], help="of the CNN (5,072 weights: 90%% leaves it at chance)")
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.0, 1.0], help="locality penalty, in units of the mean F_ii")
    parser.add_argument("--fisher-type", choices=("exact", "mc", "empirical"), default="mc", help="exact costs one backward per class")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--fine-tune-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--replot", action="store_true", help="recompute the summary, table and figures from --out's pruning_study.json")
    return parser.parse_args()


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels), standardised by the data module."""
    if args.data == "auto":
        try:
            check_mnist_root(args.mnist_root)
            args.data = "mnist"
        except DataFileError:
            args.data = "digits"
    datamodule = MNISTDataModule(root=args.mnist_root, seed=args.seed) if args.data == "mnist" else DigitsDataModule(seed=args.seed)
    datamodule.setup("fit")
    limit = args.mnist_train if args.data == "mnist" else None
    train = datamodule.datasets["train"]
    x_train, y_train = stack([train[i] for i in range(len(train) if limit is None else min(limit, len(train)))])
    return x_train, y_train, *stack(list(datamodule.datasets["test"]))


def stack(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def build(kind: str, image_shape: torch.Size, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP(image_shape.numel(), 10, hidden=(100, 100))
    return SmallCNN(image_shape[0], 10, channels=(16, 32))


def batches(inputs: torch.Tensor, targets: torch.Tensor, size: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(targets), generator=generator)
    return [(inputs[order[i : i + size]], targets[order[i : i + size]]) for i in range(0, len(targets), size)]


def train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, epochs: int, lr: float, seed: int, tensors=None) -> None:
    """Adam on mini-batches of 64; with ``tensors``, pruned weights are held at exactly zero."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if tensors is not None:
        keep_pruned_at_zero(optimizer, tensors)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for x, y in batches(inputs, targets, 64, generator):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def measure(model: nn.Module, train_data: list, test_data: list) -> dict[str, float]:
    return {"train_loss": mean_loss(model, train_data, LOSS), "test_loss": mean_loss(model, test_data, LOSS), "test_acc": accuracy(model, test_data)}


def run_model(kind: str, args: argparse.Namespace, data: tuple) -> list[dict]:
    x_train, y_train, x_test, y_test = data
    train_data = [(x_train, y_train)]  # full batch: losses, and the scores' gradients and Fishers
    score_data = [(x_train[: args.score_examples], y_train[: args.score_examples])]
    test_data = [(x_test, y_test)]
    dense = build(kind, x_train.shape[1:], args.seed)
    started = time.perf_counter()
    train(dense, x_train, y_train, args.pretrain_epochs, 3e-3, args.seed)
    dense_metrics = measure(dense, train_data, test_data)
    tensors = prunable_tensors(dense)
    mean_fisher = float(torch.cat([f.reshape(-1) for f in fisher_diagonals(dense, score_data, tensors, args.fisher_type)]).mean())
    size = sum(t.leaf().numel() for t in tensors)
    print(f"{kind}: {size} prunable weights, dense train loss {dense_metrics['train_loss']:.4f}, test acc {dense_metrics['test_acc']:.4f}, "
          f"mean F_ii {mean_fisher:.3g} ({time.perf_counter() - started:.1f} s)", flush=True)
    rows = []
    for target in getattr(args, f"{kind}_sparsities"):
        for criterion in args.criteria:
            for factor in [0.0] if criterion == "MP" else args.lambdas:
                for steps in [1] if criterion == "MP" else args.steps:
                    started = time.perf_counter()
                    model = copy.deepcopy(dense)
                    pruned = prunable_tensors(model)
                    predicted = 0.0
                    for k in range(1, steps + 1):
                        change = prune(
                            model,
                            pruned,
                            score_data,
                            target_sparsity("exponential", target, k, steps),
                            criterion=criterion,
                            locality_penalty=factor * mean_fisher,
                            fisher_type=args.fisher_type,
                            generator=torch.Generator().manual_seed(args.seed + k),
                            allow_layer_collapse=True,
                        )
                        predicted += change or 0.0
                    after_pruning = measure(model, train_data, test_data)
                    train(model, x_train, y_train, args.fine_tune_epochs, 3e-3, args.seed + 1, tensors=pruned)
                    after_fine_tuning = measure(model, train_data, test_data)
                    row = {
                        "model": kind,
                        "sparsity": target,
                        "reached": sparsity(pruned)[0],
                        "criterion": criterion,
                        "lambda_factor": factor,
                        "steps": steps,
                        "dense": dense_metrics,
                        "pruned": after_pruning,
                        "fine_tuned": after_fine_tuning,
                        "predicted_loss_change": None if criterion == "MP" else predicted,
                        "layer_collapsed": any(bool((t.mask() == 0).all()) for t in pruned),
                        "seconds": time.perf_counter() - started,
                    }
                    rows.append(row)
                    print(
                        f"  {kind} s={target} {criterion:3s} lambda={factor:g} steps={steps:3d}: loss {after_pruning['train_loss']:.4f} "
                        f"acc {after_pruning['test_acc']:.4f} -> fine-tuned loss {after_fine_tuning['train_loss']:.4f} "
                        f"acc {after_fine_tuning['test_acc']:.4f} ({row['seconds']:.1f} s)",
                        flush=True,
                    )
    return rows


def correlations(rows: list[dict]) -> list[dict]:
    """Per (model, sparsity): Spearman rank correlation, over all configurations, of the training
    loss just after pruning with the test accuracy after fine-tuning (and with the fine-tuned
    training loss), the same over the iterative configurations only (more than one step: the
    one-shot ones, far worse, dominate the first), and the test accuracy after fine-tuning of
    the configuration that preserved the loss best against the best one."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for target in dict.fromkeys(r["sparsity"] for r in rows if r["model"] == model):
            group = [r for r in rows if r["model"] == model and r["sparsity"] == target]
            loss = [r["pruned"]["train_loss"] for r in group]
            acc = [r["fine_tuned"]["test_acc"] for r in group]
            best_loss = min(group, key=lambda r: r["pruned"]["train_loss"])
            out.append(
                {
                    "model": model,
                    "sparsity": target,
                    "configurations": len(group),
                    "spearman_loss_vs_acc": float(spearmanr(loss, acc).statistic),
                    "spearman_loss_vs_finetuned_loss": float(spearmanr(loss, [r["fine_tuned"]["train_loss"] for r in group]).statistic),
                    "spearman_loss_vs_acc_iterative": float(
                        spearmanr(*zip(*[(r["pruned"]["train_loss"], r["fine_tuned"]["test_acc"]) for r in group if r["steps"] > 1])).statistic
                    ),
                    "best_loss_config": f"{best_loss['criterion']} lambda={best_loss['lambda_factor']:g} steps={best_loss['steps']}",
                    "its_acc": best_loss["fine_tuned"]["test_acc"],
                    "best_acc": max(acc),
                    "spread_acc": max(acc) - min(acc),
                }
            )
    return out


def table(rows: list[dict]) -> str:
    header = "| model | sparsity | criterion | lambda | steps | train loss pruned | test acc pruned | train loss fine-tuned | test acc fine-tuned |"
    lines = [header, "|" + " --- |" * 9]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sparsity']:g} | {r['criterion']} | {r['lambda_factor']:g} | {r['steps']} | {r['pruned']['train_loss']:.3f} | "
            f"{r['pruned']['test_acc']:.3f} | {r['fine_tuned']['train_loss']:.4f} | {r['fine_tuned']['test_acc']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {"MP": "black", "LM": "tab:orange", "QM": "tab:blue", "OBD": "tab:green"}
    styles = {steps: style for steps, style in zip(sorted({r["steps"] for r in rows}), ["-", "--", ":", "-."])}

    figure, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models):
        for ax, stage, label in zip(row_axes, ("pruned", "fine_tuned"), ("just after pruning", "after fine-tuning")):
            for criterion in colours:
                for steps, style in styles.items():
                    points = sorted(
                        (r["sparsity"], r[stage]["test_acc"])
                        for r in rows
                        if r["model"] == model and r["criterion"] == criterion and r["steps"] == steps and r["lambda_factor"] == 0
                    )
                    if points:
                        ax.plot(*zip(*points), style, marker="o", color=colours[criterion], label=f"{criterion}, {steps} steps")
            ax.set(title=f"{model}: test accuracy {label} (lambda = 0)", xlabel="sparsity", ylabel="test accuracy")
            ax.grid(alpha=0.3)
        row_axes[1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "pruning_accuracy.png", dpi=110)
    plt.close(figure)

    sparsities = {model: sorted({r["sparsity"] for r in rows if r["model"] == model}) for model in models}
    columns = max(len(targets) for targets in sparsities.values())
    markers = {steps: marker for steps, marker in zip(sorted(styles), ["o", "s", "^", "D"])}
    figure, axes = plt.subplots(len(models), columns, figsize=(4.2 * columns, 3.8 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models):
        for ax, target in zip(row_axes, sparsities[model]):
            for r in rows:
                if r["model"] == model and r["sparsity"] == target:
                    ax.scatter(
                        r["pruned"]["train_loss"],
                        r["fine_tuned"]["test_acc"],
                        color=colours[r["criterion"]],
                        marker=markers[r["steps"]],
                        facecolors="none" if r["lambda_factor"] > 0 else colours[r["criterion"]],
                    )
            ax.set(xscale="log", title=f"{model}, sparsity {target:g}", xlabel="training loss just after pruning", ylabel="test acc. after fine-tuning")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=k) for k, c in colours.items()]
    handles += [plt.Line2D([], [], color="grey", marker=m, linestyle="", label=f"{s} steps") for s, m in markers.items()]
    handles += [plt.Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="", label="lambda > 0")]
    axes[0][-1].legend(handles=handles, fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "pruning_loss_vs_accuracy.png", dpi=110)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = args.out / "pruning_study.json"
    if args.replot:
        saved = json.loads(results.read_text())
        rows, minutes = saved["rows"], saved["minutes"]
        settings = saved["settings"]
    else:
        data = load_data(args)
        print(f"data: {args.data}, {len(data[1])} training and {len(data[3])} test images of shape {tuple(data[0].shape[1:])}", flush=True)
        rows = [row for kind in args.models for row in run_model(kind, args, data)]
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        minutes = (time.perf_counter() - started) / 60
    summary = correlations(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"settings": settings, "minutes": minutes, "rows": rows, "summary": summary}, indent=1))
    plot(rows, args.out)
    print("\n" + table(rows) + "\n")
    for s in summary:
        print(
            f"{s['model']} sparsity {s['sparsity']:g} ({s['configurations']} configurations): Spearman(loss after pruning, acc after "
            f"fine-tuning) = {s['spearman_loss_vs_acc']:+.2f}; Spearman(loss after pruning, loss after fine-tuning) = "
            f"{s['spearman_loss_vs_finetuned_loss']:+.2f}; iterative only: Spearman(loss, acc) = {s['spearman_loss_vs_acc_iterative']:+.2f}; best-loss config {s['best_loss_config']} reaches {s['its_acc']:.3f} "
            f"(best {s['best_acc']:.3f}, spread {s['spread_acc']:.3f})"
        )
    print(f"\ntotal {minutes:.1f} min")


if __name__ == "__main__":
    main()
