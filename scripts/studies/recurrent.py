"""Small-scale study of the recurrent architectures on CPU (a few minutes per part).

``copy``: the copy task with delay T (default 50): nnRNN, the orthogonal RNN, the memory RNN with
relevancy screening and an LSTM, all with H hidden units, trained for the same number of steps.
Validation loss against the memoryless baseline ``10 ln 8 / (T + 20)`` (Kerg et al. 2019, 2020
report the first three well below it and the LSTM stalling near it). Then ``||dL/dh_t||``
against t for each model at initialisation and after training
(``callbacks.gradient_propagation.hidden_state_gradient_norms``), and the spectrum of each
trained recurrent matrix.

``digits``: BN-LSTM against LSTM (same H) on the bundled 8x8 digits read pixel by pixel, in
row-major (sequential) and permuted order: validation accuracy per epoch (convergence speed) and
test accuracy (Cooijmans et al. 2016 report faster convergence and better accuracy for BN-LSTM on
sequential and permuted MNIST).

Figures: ``docs/figures/recurrent_copy.png``, ``recurrent_copy_gradients.png``,
``recurrent_digits.png``; the numbers go to stdout and ``--output`` (JSON).

    python scripts/studies/recurrent.py                       # both parts, default scale
    python scripts/studies/recurrent.py --part copy --delay 100 --steps 800
"""

import argparse
import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from callbacks.gradient_propagation import hidden_state_gradient_norms, recurrent_matrices, spectrum_summary  # noqa: E402
from framework.data import DigitsDataModule  # noqa: E402
from framework.data.sequences import CopyTaskDataModule, copy_task_baseline  # noqa: E402
from framework.models.rnn_base import PlainLSTM, RecurrentNetwork  # noqa: E402
from framework.models.rnn_batchnorm import BNLSTM  # noqa: E402
from framework.models.rnn_memory import RelevancyMemoryRNN  # noqa: E402
from framework.models.rnn_nonnormal import NNRNN, OrthogonalRNN  # noqa: E402

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
COPY_INPUTS, COPY_CLASSES = 10, 9


def copy_models(hidden: int) -> dict[str, tuple[Callable[[], RecurrentNetwork], Callable]]:
    """Each copy-task model with its optimizer (the papers' choices: RMSprop for nnRNN and the
    orthogonal RNN, Adam for the memory RNN and the LSTM)."""
    sizes = (COPY_INPUTS, hidden, COPY_CLASSES)
    return {
        "nnRNN": (partial(NNRNN, *sizes), partial(torch.optim.RMSprop, lr=1e-3)),
        "orthogonal RNN": (partial(OrthogonalRNN, *sizes), partial(torch.optim.RMSprop, lr=1e-3)),
        "memory RNN": (partial(RelevancyMemoryRNN, *sizes, window=10, relevant_slots=10), partial(torch.optim.Adam, lr=1e-3)),
        "LSTM": (partial(PlainLSTM, *sizes), partial(torch.optim.Adam, lr=1e-3)),
    }


def evaluate_copy(model: RecurrentNetwork, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss per step and accuracy on the 10 recalled symbols."""
    model.eval()
    with torch.no_grad():
        outputs = model(x)
    model.train()
    loss = F.cross_entropy(outputs.flatten(0, 1), y.flatten()).item()
    recalled = (outputs[:, -10:].argmax(dim=-1) == y[:, -10:]).float().mean().item()
    return loss, recalled


def copy_part(args: argparse.Namespace) -> dict:
    data = CopyTaskDataModule(delay=args.delay, train_size=args.steps * args.batch_size, val_size=512, test_size=1, batch_size=args.batch_size, seed=0)
    data.setup()
    val_x, val_y, val_mask = next(iter(data.val_dataloader()))
    probe = tuple(t[:128] for t in (val_x, val_y, val_mask))
    baseline = copy_task_baseline(args.delay)
    results: dict = {"baseline": baseline, "delay": args.delay, "hidden": args.hidden, "steps": args.steps, "batch_size": args.batch_size, "models": {}}
    for name, (factory, optimizer_factory) in copy_models(args.hidden).items():
        torch.manual_seed(0)
        model = factory()
        optimizer = optimizer_factory(model.parameters())
        initial_gradients = hidden_state_gradient_norms(model, *probe).tolist()
        curve, start = [], time.perf_counter()
        for step, (x, y, _) in enumerate(data.train_dataloader()):
            if step % args.eval_every == 0:
                curve.append((step, *evaluate_copy(model, val_x, val_y)))
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            regularization = getattr(model, "regularization", None)
            (loss + regularization() if regularization else loss).backward()
            optimizer.step()
        curve.append((args.steps, *evaluate_copy(model, val_x, val_y)))
        spectra = {block: spectrum_summary(matrix)[0] for block, matrix in recurrent_matrices(model).items()}
        results["models"][name] = {
            "curve": curve,
            "seconds": time.perf_counter() - start,
            "gradients_init": initial_gradients,
            "gradients_trained": hidden_state_gradient_norms(model, *probe).tolist(),
            "spectrum": spectra,
        }
        print(f"copy T={args.delay} {name}: val loss {curve[-1][1]:.4f} (baseline {baseline:.4f}), recall acc {curve[-1][2]:.3f}, {time.perf_counter() - start:.0f} s", flush=True)

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, result in results["models"].items():
        steps, losses, _ = zip(*result["curve"])
        axis.plot(steps, losses, label=name)
    axis.axhline(baseline, color="black", linestyle="--", label=f"memoryless baseline {baseline:.3f}")
    axis.set(xlabel="training step", ylabel="validation cross-entropy per step", yscale="log", title=f"Copy task, T = {args.delay}, H = {args.hidden}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(FIGURES / "recurrent_copy.png", dpi=120)

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, key, title in zip(axes, ("gradients_init", "gradients_trained"), ("at initialisation", f"after {args.steps} steps")):
        for name, result in results["models"].items():
            axis.plot(range(1, len(result[key]) + 1), result[key], label=name)
        axis.set(xlabel="time step t", yscale="log", title=f"||dL/dh_t||, copy T = {args.delay}, {title}")
        axis.axvline(10, color="grey", linewidth=0.5)
        axis.axvline(args.delay + 10, color="grey", linewidth=0.5)
    axes[0].set_ylabel("||dL/dh_t|| (validation batch of 128)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(FIGURES / "recurrent_copy_gradients.png", dpi=120)
    plt.close("all")
    return results


def digits_part(args: argparse.Namespace) -> dict:
    results: dict = {"hidden": args.hidden, "epochs": args.epochs, "runs": {}}
    for data_format in ("sequence", "permuted"):
        data = DigitsDataModule(format=data_format, batch_size=64, seed=0)
        data.setup()
        for name, factory in (("LSTM", PlainLSTM), ("BN-LSTM", partial(BNLSTM, max_steps=64))):
            torch.manual_seed(0)
            model = factory(1, args.hidden, 10)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.digits_lr)
            curve, start = [], time.perf_counter()
            for epoch in range(args.epochs):
                for x, y, _ in data.train_dataloader():
                    optimizer.zero_grad()
                    F.cross_entropy(model(x)[:, -1], y[:, -1]).backward()
                    optimizer.step()
                curve.append(digits_accuracy(model, data.val_dataloader()))
            test = digits_accuracy(model, data.test_dataloader())
            results["runs"][f"{name} {data_format}"] = {"val_acc": curve, "test_acc": test, "seconds": time.perf_counter() - start}
            print(f"digits {data_format} {name}: val acc per epoch {[round(a, 3) for a in curve]}, test acc {test:.3f}, {time.perf_counter() - start:.0f} s", flush=True)

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, data_format in zip(axes, ("sequence", "permuted")):
        for name in ("LSTM", "BN-LSTM"):
            run = results["runs"][f"{name} {data_format}"]
            axis.plot(range(1, args.epochs + 1), run["val_acc"], label=f"{name} (test {run['test_acc']:.3f})")
        axis.set(xlabel="epoch", title=f"{'sequential' if data_format == 'sequence' else 'permuted'} 8x8 digits, H = {args.hidden}")
        axis.legend()
    axes[0].set_ylabel("validation accuracy")
    figure.tight_layout()
    figure.savefig(FIGURES / "recurrent_digits.png", dpi=120)
    plt.close("all")
    return results


def digits_accuracy(model: RecurrentNetwork, loader) -> float:
    model.eval()
    with torch.no_grad():
        correct = [(model(x)[:, -1].argmax(dim=-1) == y[:, -1]).float() for x, y, _ in loader]
    model.train()
    return torch.cat(correct).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--part", choices=("copy", "digits", "all"), default="all")
    parser.add_argument("--delay", type=int, default=50, help="copy-task delay T")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units H of every model")
    parser.add_argument("--steps", type=int, default=600, help="copy-task training steps (fresh data at every step)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=15, help="digits epochs (about 20 steps each)")
    parser.add_argument("--digits-lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("logs/studies/recurrent.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    FIGURES.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.part in ("copy", "all"):
        results["copy"] = copy_part(args)
    if args.part in ("digits", "all"):
        results["digits"] = digits_part(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    args.output.write_text(json.dumps({**previous, **results}, indent=1))
    if "copy" in results:
        print(f"copy baseline {results['copy']['baseline']:.4f} = 10 ln 8 / {args.delay + 20}; math check {10 * math.log(8) / (args.delay + 20):.4f}")


if __name__ == "__main__":
    main()
