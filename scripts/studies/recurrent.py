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
sequential and permuted MNIST). The BN-LSTM is evaluated both with its running averages and with
exact population statistics (``callbacks.batchnorm.recompute_population_statistics``).

Figures: ``docs/figures/recurrent_copy.png``, ``recurrent_copy_gradients.png``,
``recurrent_digits.png``; the numbers go to stdout and ``--output`` (JSON).

    python scripts/studies/recurrent.py                       # both parts, default scale
    python scripts/studies/recurrent.py --part copy --delay 100 --steps 800
    # the memory RNN in the authors' copy-task setting (H = 128, batches of 10, r = 15, RMSprop,
    # clipping at 1) against the LSTM, figures suffixed _paper:
    python scripts/studies/recurrent.py --part copy --models memory lstm --hidden 128 --batch-size 10 \
        --steps 3000 --eval-every 150 --clip 1 --memory-slots 15 --memory-optimizer rmsprop --tag _paper \
        --output logs/studies/recurrent_copy_paper.json
"""

import argparse
import copy
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

from callbacks.batchnorm import population_statistics_modules, recompute_population_statistics  # noqa: E402
from callbacks.gradient_propagation import hidden_state_gradient_norms, recurrent_matrices, spectrum_summary  # noqa: E402
from framework.data import DigitsDataModule  # noqa: E402
from framework.data.sequences import CopyTaskDataModule, copy_task_baseline  # noqa: E402
from framework.models.rnn_base import PlainLSTM, RecurrentNetwork  # noqa: E402
from framework.models.rnn_batchnorm import BNLSTM  # noqa: E402
from framework.models.rnn_memory import RelevancyMemoryRNN  # noqa: E402
from framework.models.rnn_nonnormal import NNRNN, OrthogonalRNN  # noqa: E402

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
COPY_INPUTS, COPY_CLASSES = 10, 9


COPY_MODELS = {"nnrnn": "nnRNN", "orthogonal": "orthogonal RNN", "memory": "memory RNN", "lstm": "LSTM"}  # CLI key: name
OPTIMIZERS = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}


def copy_models(args: argparse.Namespace) -> dict[str, tuple[Callable[[], RecurrentNetwork], Callable]]:
    """The copy-task models named by ``args.models`` with their optimizers: RMSprop lr 1e-3 for
    nnRNN and the orthogonal RNN (Kerg et al. 2019), Adam lr 1e-3 for the LSTM, and for the
    memory RNN the window, relevant slots, optimizer and lr given by ``args.memory_*`` (the
    authors' copy-task runs: k = 10, r = 15, RMSprop, clipping at 1)."""
    sizes = (COPY_INPUTS, args.hidden, COPY_CLASSES)
    memory_optimizer = partial(OPTIMIZERS[args.memory_optimizer], lr=args.memory_lr)
    models = {
        "nnRNN": (partial(NNRNN, *sizes), partial(torch.optim.RMSprop, lr=1e-3)),
        "orthogonal RNN": (partial(OrthogonalRNN, *sizes), partial(torch.optim.RMSprop, lr=1e-3)),
        "memory RNN": (partial(RelevancyMemoryRNN, *sizes, window=args.memory_window, relevant_slots=args.memory_slots), memory_optimizer),
        "LSTM": (partial(PlainLSTM, *sizes), partial(torch.optim.Adam, lr=1e-3)),
    }
    return {COPY_MODELS[key]: models[COPY_MODELS[key]] for key in args.models}


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
    results["settings"] = {key: getattr(args, key) for key in ("clip", "memory_window", "memory_slots", "memory_optimizer", "memory_lr")}
    for name, (factory, optimizer_factory) in copy_models(args).items():
        torch.manual_seed(0)
        model = factory()
        optimizer = optimizer_factory(model.parameters())
        initial_gradients = hidden_state_gradient_norms(model, *probe).tolist()
        curve, start = [], time.perf_counter()
        for step, (x, y, _) in enumerate(data.train_dataloader()):
            if step % args.eval_every == 0:
                curve.append((step, *evaluate_copy(model, val_x, val_y)))
                print(f"  {name} step {step}: val loss {curve[-1][1]:.4f}, recall acc {curve[-1][2]:.3f}, {time.perf_counter() - start:.0f} s", flush=True)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            regularization = getattr(model, "regularization", None)
            (loss + regularization() if regularization else loss).backward()
            if args.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
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
    figure.savefig(FIGURES / f"recurrent_copy{args.tag}.png", dpi=120)

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
    figure.savefig(FIGURES / f"recurrent_copy_gradients{args.tag}.png", dpi=120)
    plt.close("all")
    return results


def digits_part(args: argparse.Namespace) -> dict:
    """LSTM and BN-LSTM, each from ``args.digits_seeds`` initialisations (the data split stays
    seed 0); the BN-LSTM is evaluated twice per epoch, with its running averages and with exact
    population statistics recomputed over the training set (on a copy, so that the running
    averages of the next epoch are not touched)."""
    results: dict = {"hidden": args.hidden, "epochs": args.epochs, "lr": args.digits_lr, "seeds": args.digits_seeds, "runs": {}}
    for data_format in ("sequence", "permuted"):
        data = DigitsDataModule(format=data_format, batch_size=64, seed=0)
        data.setup()
        for name, factory in (("LSTM", PlainLSTM), ("BN-LSTM", partial(BNLSTM, max_steps=64))):
            for seed in range(args.digits_seeds):
                torch.manual_seed(seed)
                model = factory(1, args.hidden, 10)
                optimizer = torch.optim.Adam(model.parameters(), lr=args.digits_lr)
                curves: dict[str, list[float]] = {}
                start = time.perf_counter()
                for epoch in range(args.epochs):
                    for x, y, _ in data.train_dataloader():
                        optimizer.zero_grad()
                        F.cross_entropy(model(x)[:, -1], y[:, -1]).backward()
                        optimizer.step()
                    for variant, evaluated in digits_variants(model, data).items():
                        curves.setdefault(variant, []).append(digits_accuracy(evaluated, data.val_dataloader()))
                for variant, evaluated in digits_variants(model, data).items():
                    run = {"val_acc": curves[variant], "test_acc": digits_accuracy(evaluated, data.test_dataloader()), "seconds": time.perf_counter() - start}
                    results["runs"].setdefault(f"{name}{variant} {data_format}", []).append(run)
                    print(f"digits {data_format} {name}{variant} seed {seed}: val acc per epoch {[round(a, 3) for a in run['val_acc']]}, test acc {run['test_acc']:.3f}, {run['seconds']:.0f} s", flush=True)
    for label, runs in results["runs"].items():
        tests = torch.tensor([run["test_acc"] for run in runs])
        print(f"digits {label}: test acc mean {tests.mean():.3f}, min {tests.min():.3f}, max {tests.max():.3f} over {len(runs)} seeds")

    labels = [label.rsplit(" ", 1)[0] for label in results["runs"] if label.endswith(" sequence")]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    epochs = range(1, args.epochs + 1)
    for axis, data_format in zip(axes, ("sequence", "permuted")):
        for label in labels:
            runs = results["runs"][f"{label} {data_format}"]
            curves = torch.tensor([run["val_acc"] for run in runs])
            test = sum(run["test_acc"] for run in runs) / len(runs)
            (line,) = axis.plot(epochs, curves.mean(dim=0), label=f"{label} (test {test:.3f})")
            axis.fill_between(epochs, curves.min(dim=0).values, curves.max(dim=0).values, color=line.get_color(), alpha=0.15)
        axis.set(xlabel="epoch", title=f"{'sequential' if data_format == 'sequence' else 'permuted'} 8x8 digits, H = {args.hidden}, lr {args.digits_lr:g}")
        axis.legend(fontsize=8)
    axes[0].set_ylabel(f"validation accuracy (mean, min-max of {args.digits_seeds} seeds)")
    figure.tight_layout()
    figure.savefig(FIGURES / f"recurrent_digits{args.tag}.png", dpi=120)
    plt.close("all")
    return results


def digits_variants(model: RecurrentNetwork, data: DigitsDataModule) -> dict[str, RecurrentNetwork]:
    """The model as trained, and for a model with batch norms also a copy with exact population
    statistics over the training set."""
    if not population_statistics_modules(model):
        return {"": model}
    precise = copy.deepcopy(model)
    recompute_population_statistics(precise, [x for x, _, _ in data.train_dataloader()])
    return {" (running averages)": model, " (precise statistics)": precise}


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
    parser.add_argument("--models", nargs="+", choices=tuple(COPY_MODELS), default=list(COPY_MODELS), help="copy-task models to train")
    parser.add_argument("--clip", type=float, default=None, help="copy task: clip the gradient norm of every model at this value")
    parser.add_argument("--memory-window", type=int, default=10, help="memory RNN short-term window k")
    parser.add_argument("--memory-slots", type=int, default=10, help="memory RNN relevant set size r")
    parser.add_argument("--memory-optimizer", choices=tuple(OPTIMIZERS), default="adam")
    parser.add_argument("--memory-lr", type=float, default=1e-3)
    parser.add_argument("--tag", default="", help="suffix of the figure names and of the 'copy'/'digits' keys in --output")
    parser.add_argument("--epochs", type=int, default=15, help="digits epochs (about 20 steps each)")
    parser.add_argument("--digits-lr", type=float, default=2e-3)
    parser.add_argument("--digits-seeds", type=int, default=3, help="initialisations of each digits model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("logs/studies/recurrent.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    FIGURES.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.part in ("copy", "all"):
        results[f"copy{args.tag}"] = copy_part(args)
    if args.part in ("digits", "all"):
        results[f"digits{args.tag}"] = digits_part(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    args.output.write_text(json.dumps({**previous, **results}, indent=1))
    if f"copy{args.tag}" in results:
        print(f"copy baseline {results[f'copy{args.tag}']['baseline']:.4f} = 10 ln 8 / {args.delay + 20}; math check {10 * math.log(8) / (args.delay + 20):.4f}")


if __name__ == "__main__":
    main()
