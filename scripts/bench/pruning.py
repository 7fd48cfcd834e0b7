"""Pruning benchmarks (issue 6), on CPU, every comparison side by side in this one process.

Models (``--models``): ``wrn`` WRN-10-2 (the pruning config's), ``cnn`` SmallCNN 16-32 and
``mlp`` MLP 64-300-100-10 (LeNet-300-100's widths; almost no compute per weight, so the mask's
cost shows most).

1. **Masked training step vs dense step** (goal <= 1.05x): one SGD step (momentum, weight
   decay) on a fixed batch of 64 digits, for a model pruned to 90% per layer by
   ``callbacks.pruning`` (``torch.nn.utils.prune`` masks: ``weight = weight_orig * weight_mask``
   before each forward) and its dense copy, interleaved.
2. **Score computation per criterion**: one :func:`callbacks.pruning.prune` call (scores,
   selection, masks) with ``--score-batches`` batches of 64, for MP, LM, and QM and OBD with
   each Fisher type; ratio against LM (one full-batch gradient pass).
3. **Against Lightning's ModelPruning**: the same ``Trainer.fit`` (``--fit-model``) on digits with the
   same magnitude schedule (global L1, exponential to 90% in 3 steps one epoch apart, fine-tuning
   between and after), by ``lightning.pytorch.callbacks.ModelPruning`` (given the exact
   per-step counts of our schedule) and by ``callbacks.pruning.Pruning`` with ``criterion=MP``,
   with ``evaluate=False`` (the same work as ModelPruning) and with its default per-step loss
   and accuracy measurements; plus a dense fit for reference. Reported per candidate: wall time
   of the whole fit (median over rounds; the ratio against ModelPruning is the overhead
   comparison), the process CPU time of the fit (less sensitive than wall time to other jobs
   taking the cores), median training-step time, final sparsity and test accuracy.

    python scripts/bench/pruning.py                           # all three, about 2 minutes on a quiet 2-core CPU
    python scripts/bench/pruning.py --parts step --threads 1  # only part 1 (step, scores, lightning)
    python scripts/bench/pruning.py --fit-model wrn --score-models wrn   # the config's model everywhere (slower)
"""

import argparse
import copy
import logging
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from callbacks.pruning import Pruning, accuracy, prunable_tensors, prune, target_sparsity
from framework.benchmarking import Comparison, StepTimer, busy_warning, compare, compare_samples, environment, torch_threads
from framework.data import DigitsDataModule
from framework.models import MLP, SmallCNN, WideResNet
from framework.tasks import ClassificationTask

SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("step", "scores", "lightning"), default=["step", "scores", "lightning"])
    parser.add_argument("--step-models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="models of part 1")
    parser.add_argument("--step-repeats", type=int, default=20, help="timed training steps per candidate (part 1)")
    parser.add_argument("--score-models", nargs="+", choices=tuple(MODELS), default=["cnn", "mlp"], help="models of part 2")
    parser.add_argument("--score-batches", type=int, default=4, help="batches of 64 the scores are computed on (part 2)")
    parser.add_argument("--score-repeats", type=int, default=3)
    parser.add_argument("--fit-model", choices=tuple(MODELS), default="mlp", help="model of part 3")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per fit (part 3); pruning at the ends of epochs 0, 1, 2")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of fits (part 3), after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: leave torch's setting")
    return parser.parse_args()


def wrn() -> nn.Module:
    torch.manual_seed(0)
    return WideResNet(depth=10, widen_factor=2, num_classes=10, in_channels=1)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(64, 10, hidden=(300, 100))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(1, 10, channels=(16, 32))


MODELS = {"wrn": ("WRN-10-2", wrn), "cnn": ("SmallCNN 16-32", cnn), "mlp": ("MLP 64-300-100-10", mlp)}


def digits_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    datamodule = DigitsDataModule(batch_size=64, seed=0)
    datamodule.setup("fit")
    batches = []
    for images, labels in datamodule.train_dataloader():
        batches.append((images, labels))
        if len(batches) == count:
            return batches
    return batches


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


def masked_step_part(models: list[str], repeats: int, threads: int | None) -> None:
    print("\n## 1. Masked training step vs dense step (90% sparsity per layer, batch 64)\n")
    (batch,) = digits_batches(1)
    for key in models:
        name, factory = MODELS[key]
        dense = factory().train()
        masked = copy.deepcopy(dense)
        prune(masked, prunable_tensors(masked), [], 0.9, scope="layer")
        optimizers = {"dense": torch.optim.SGD(dense.parameters(), **SGD), "masked": torch.optim.SGD(masked.parameters(), **SGD)}
        models = {"dense": dense, "masked": masked}
        comparison = compare(
            {key: (lambda key=key: training_step(models[key], optimizers[key], batch)) for key in models},
            baseline="dense",
            repeats=repeats,
            warmup=3,
            threads=threads,
        )
        print(f"### {name}\n\n{comparison.table()}\n")


def score_part(models: list[str], batches: int, repeats: int, threads: int | None) -> None:
    for key in models:
        name, factory = MODELS[key]
        print(f"\n## 2. Score computation per criterion ({name}, {batches} batches of 64, one prune call)\n")
        score_model(factory(), digits_batches(batches), repeats, threads)
    print("\n(exact Fisher: one backward pass per class, 10 here; mc and empirical: one.)")


def score_model(model: nn.Module, data: list, repeats: int, threads: int | None) -> None:
    tensors = prunable_tensors(model)
    candidates = {"MP": {"criterion": "MP"}, "LM": {"criterion": "LM"}}
    for criterion in ("QM", "OBD"):
        for fisher_type in ("exact", "mc", "empirical"):
            candidates[f"{criterion} {fisher_type}"] = {"criterion": criterion, "fisher_type": fisher_type}

    def run(settings: dict) -> None:  # masks only shrink: every call scores and selects afresh at the same target
        prune(model, tensors, data, 0.5, generator=torch.Generator().manual_seed(0), **settings)

    comparison = compare(
        {name: (lambda s=settings: run(s)) for name, settings in candidates.items()}, baseline="LM", repeats=repeats, warmup=1, threads=threads
    )
    print(comparison.table())


def schedule_counts(total: int, steps: int, final: float) -> list[int]:
    """Weights pruned at each step of our exponential schedule, as absolute counts of the remaining
    (ModelPruning's integer ``amount``), so that both callbacks prune exactly as many."""
    cumulative = [0] + [round(target_sparsity("exponential", final, k, steps) * total) for k in range(1, steps + 1)]
    return [b - a for a, b in zip(cumulative, cumulative[1:])]


class EpochAmount:
    """ModelPruning's ``amount`` as a function of the epoch: the count of step k at the end of epoch k."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def __call__(self, epoch: int) -> int:
        return self.counts[epoch] if epoch < len(self.counts) else 0


def fit_once(model: str, callback_factory, epochs: int, results: dict, name: str) -> list[float]:
    """One fit on digits; records fit wall time, step times, sparsity and test accuracy."""
    L.seed_everything(0, verbose=False)
    task = ClassificationTask(MODELS[model][1](), optimizer=lambda params: torch.optim.SGD(params, **SGD))
    datamodule = DigitsDataModule(batch_size=64, seed=0)
    timer = StepTimer()
    callbacks = [timer.lightning_callback()] + ([callback_factory(task)] if callback_factory else [])
    trainer = L.Trainer(
        callbacks=callbacks,
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(task, datamodule=datamodule)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    weights = [m.weight for m in task.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    datamodule.setup("test")
    results.setdefault(name, []).append(
        {
            "step": sorted(timer.intervals(skip=1))[len(timer.intervals(skip=1)) // 2],
            "cpu": cpu,
            "sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
            "test accuracy": accuracy(task, list(datamodule.test_dataloader())),
        }
    )
    return [wall]


def lightning_part(model: str, epochs: int, rounds: int, threads: int | None) -> None:
    steps, final = 3, 0.9
    total = sum(t.leaf().numel() for t in prunable_tensors(MODELS[model][1]()))
    counts = schedule_counts(total, steps, final)
    print(f"\n## 3. Against Lightning's ModelPruning ({MODELS[model][0]}, digits, {epochs} epochs, global L1 to {final:.0%} in {steps} steps)\n")
    print(f"weights pruned per step: {counts} of {total}\n")

    def lightning(task: nn.Module) -> ModelPruning:
        pairs = [(m, "weight") for m in task.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return ModelPruning(
            "l1_unstructured", parameters_to_prune=pairs, amount=EpochAmount(counts), use_lottery_ticket_hypothesis=False, verbose=0
        )

    def ours(evaluate: bool):  # our steps at the start of epochs 1..3 = ModelPruning's at the end of epochs 0..2
        return lambda task: Pruning(amount=final, criterion="MP", schedule="exponential", steps=steps, start_epoch=1, evaluate=evaluate)

    factories = {"lightning ModelPruning": lightning, "ours (evaluate=False)": ours(False), "ours (default)": ours(True), "dense": None}
    results: dict = {}
    comparison: Comparison = compare_samples(
        {name: (lambda n=name, f=factory: fit_once(model, f, epochs, results, n)) for name, factory in factories.items()},
        baseline="lightning ModelPruning",
        rounds=rounds,
        warmup_rounds=1,
        threads=threads,
    )
    last = {name: runs[-1] for name, runs in results.items()}
    extra = {
        "median fit CPU s": {name: f"{sorted(r['cpu'] for r in runs)[len(runs) // 2]:.1f}" for name, runs in results.items()},
        "median step ms": {name: f"{1e3 * sorted(r['step'] for r in runs)[len(runs) // 2]:.1f}" for name, runs in results.items()},
        "sparsity": {name: f"{r['sparsity']:.4f}" for name, r in last.items()},
        "test accuracy": {name: f"{r['test accuracy']:.4f}" for name, r in last.items()},
    }
    print("Samples are whole fits (wall time, s shown as ms).\n")
    print(comparison.table(extra=extra))


def main() -> None:
    args = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    for line in filter(None, [busy_warning()]):
        print(line)
    with torch_threads(args.threads):
        print("\n".join(f"- {key}: {value}" for key, value in environment().items()))
    if "step" in args.parts:
        masked_step_part(args.step_models, args.step_repeats, args.threads)
    if "scores" in args.parts:
        score_part(args.score_models, args.score_batches, args.score_repeats, args.threads)
    if "lightning" in args.parts:
        lightning_part(args.fit_model, args.epochs, args.rounds, args.threads)
    for line in filter(None, [busy_warning()]):
        print(line)


if __name__ == "__main__":
    main()
