"""Per-step overhead of training with the framework (ClassificationTask + lightning Trainer)
against a hand-written PyTorch loop doing the same work, on CPU.

Both sides train the same WideResNet (same initial weights, train mode, float32) on the same
DigitsDataModule loader (images upsampled to 32x32 and batch 128 by default), with the same SGD
settings (those of the quickstart config). A step time is the interval between the ends of two consecutive training steps, so it
includes data loading and everything else the loop does per step: inside ``Trainer.fit`` it is
measured by a callback at ``on_train_batch_end``, in the plain loop by a timestamp at the end of
each iteration. The first ``--warmup-steps`` intervals of each run are dropped.

The framework does by design a little more per step than the plain loop, and this is kept:
torchmetrics accuracy update (and its compute at epoch end), ``self.log`` of loss and accuracy,
Lightning's hooks, closure-based optimizer step and batch transfer. The plain loop computes the
batch accuracy and reads loss and accuracy with ``.item()``, as a hand-written script printing
them would. The Trainer runs with logger=False, no progress bar, no checkpointing, no model
summary and no validation, so the ratio is the cost of the training loop itself, not of W&B.

The two sides are interleaved so that changes of the machine's load (other jobs) affect both
alike. ``--interleave steps`` (default): each round is one fit, and a callback runs one step of
the plain loop after every framework step; the two are timed apart (a framework step is the time
from the end of the previous plain step to ``on_train_batch_end``, a plain step one iteration of
the plain loop), so the two steps of a pair run within a second of each other. ``--interleave
runs``: whole plain runs and fits alternate (plain, framework, plain, ...), each step timed at
its end; simpler, but a load change during one run biases that round. The report gives the
median step time of each and the ratio framework / plain (the target is <= 1.10 at batch 128).

    python scripts/bench/train_step_overhead.py                        # WRN-16-2, batch 128
    python scripts/bench/train_step_overhead.py --threads 1            # less sensitive to other jobs
    python scripts/bench/train_step_overhead.py --model linear --steps 60 --threads 1  # fixed overhead per step
"""

import argparse
import copy
import functools
import itertools
import logging
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from framework.benchmarking import Comparison, StepTimer, Timing, busy_warning, compare_samples, environment_report, torch_threads
from framework.data import DigitsDataModule
from framework.models import WideResNet
from framework.tasks import ClassificationTask

# The optimizer of configs/model/wrn_digits.yaml, the framework's quickstart model.
SGD_SETTINGS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--model",
        choices=("wrn", "linear"),
        default="wrn",
        help="'linear' (Flatten + Linear) makes compute nearly free, so the step times show the fixed per-step overhead of each loop",
    )
    parser.add_argument("--depth", type=int, default=16, help="WRN depth (6n+4); 16 with k=2 takes ~0.8 s per step on 2 CPU threads")
    parser.add_argument("--widen-factor", type=int, default=2, help="WRN width multiplier k")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="digits are resized from 8x8 to this size (8: native, as in the quickstart)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per run (one epoch of digits is 10 steps at batch 128)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="step intervals dropped at the start of every run")
    parser.add_argument(
        "--interleave",
        choices=("runs", "steps"),
        default="steps",
        help="'runs': alternate whole runs (plain run, framework fit, ...); 'steps': one fit per round that runs one plain "
        "step after each framework step, timed apart (pairs the two within a second: robust on a machine shared with other jobs)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (plain run, framework run), or fits in --interleave steps")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: leave torch's setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < args.warmup_steps + 2:
        parser.error("--steps must exceed --warmup-steps by at least 2")
    return args


class RunLog:
    """What a run records beside its per-step wall times: per-step process CPU times and the
    wall time of the whole run (setup included)."""

    def __init__(self) -> None:
        self.cpu_rounds: list[tuple[float, ...]] = []
        self.run_walls: list[float] = []

    def record(self, timer: StepTimer, start: float, warmup_steps: int) -> list[float]:
        self.run_walls.append(time.perf_counter() - start)
        self.cpu_rounds.append(tuple(timer.intervals(skip=warmup_steps, cpu=True)))
        return timer.intervals(skip=warmup_steps)


def plain_steps(initial: torch.nn.Module, datamodule: DigitsDataModule) -> Iterator[None]:
    """The hand-written training loop, endless over epochs, as a generator that yields after
    every step, so it can run alone (:func:`plain_run`) or one step at a time (lockstep)."""
    model = copy.deepcopy(initial)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), **SGD_SETTINGS)
    loader = datamodule.train_dataloader()
    history = []
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)  # as Lightning does at the start of every epoch
        for images, labels in loader:
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
            history.append((loss.item(), accuracy.item()))
            yield
        epoch += 1


def plain_run(initial: torch.nn.Module, datamodule: DigitsDataModule, steps: int, warmup_steps: int, log: RunLog) -> list[float]:
    """``steps`` steps of the plain loop; returns its per-step wall times in seconds."""
    start = time.perf_counter()
    timer = StepTimer()
    for _ in itertools.islice(plain_steps(initial, datamodule), steps):
        timer.tick()
    return log.record(timer, start, warmup_steps)


def fit(initial: torch.nn.Module, datamodule: DigitsDataModule, steps: int, callback: L.Callback) -> None:
    """``Trainer.fit`` of a ClassificationTask for ``steps`` steps, the configuration a user runs
    without logging, with ``callback`` as the only callback."""
    task = ClassificationTask(
        backbone=copy.deepcopy(initial), num_classes=datamodule.num_classes, optimizer=functools.partial(torch.optim.SGD, **SGD_SETTINGS)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(task, datamodule=datamodule)
    if trainer.global_step != steps:
        raise RuntimeError(f"the Trainer ran {trainer.global_step} steps, expected {steps}")


def framework_run(initial: torch.nn.Module, datamodule: DigitsDataModule, steps: int, warmup_steps: int, log: RunLog) -> list[float]:
    """``steps`` steps of ``Trainer.fit``; returns its per-step wall times in seconds."""
    start = time.perf_counter()
    timer = StepTimer()
    fit(initial, datamodule, steps, timer.lightning_callback())
    return log.record(timer, start, warmup_steps)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class Lockstep(L.Callback):
    """Runs one step of the plain loop at the end of every framework step, and times the two
    apart: a framework step is the time from the end of the previous plain step to this
    ``on_train_batch_end``, a plain step the time of one ``next()`` of :func:`plain_steps`.
    Samples are (wall, CPU) pairs in seconds; ``plain[i]`` and ``framework[i]`` are step i+1."""

    def __init__(self, plain: Iterator[None]) -> None:
        self.plain_loop = plain
        self.resumed: tuple[float, float] | None = None
        self.framework: list[tuple[float, float]] = []
        self.plain: list[tuple[float, float]] = []

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        end = clocks()
        if self.resumed is not None:
            self.framework.append((end[0] - self.resumed[0], end[1] - self.resumed[1]))
        before = clocks()
        next(self.plain_loop)
        after = clocks()
        if self.resumed is not None:  # keep step i of both loops paired
            self.plain.append((after[0] - before[0], after[1] - before[1]))
        self.resumed = clocks()


def lockstep_run(initial: torch.nn.Module, datamodule: DigitsDataModule, steps: int, warmup_steps: int) -> Lockstep:
    """One fit with the plain loop stepping in lockstep; warm-up steps dropped."""
    lockstep = Lockstep(plain_steps(initial, datamodule))
    fit(initial, datamodule, steps, lockstep)
    del lockstep.framework[:warmup_steps], lockstep.plain[:warmup_steps]
    return lockstep


def main() -> None:
    args = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: False" banners per fit
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")  # a deprecation inside lightning

    with torch_threads(args.threads):
        torch.manual_seed(args.seed)
        if args.model == "wrn":
            initial = WideResNet(depth=args.depth, widen_factor=args.widen_factor, num_classes=10, in_channels=1)
            model_name = f"WRN-{args.depth}-{args.widen_factor}, 1 input channel, 10 classes"
        else:
            initial = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(args.image_size**2, 10))
            model_name = f"Flatten + Linear({args.image_size**2}, 10) (near-free compute: shows the fixed overhead per step)"
        datamodule = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size, seed=args.seed)
        datamodule.setup("fit")
        num_train = len(datamodule.datasets["train"])

        print(environment_report())
        print(
            f"\n## Setup\n\n- model: {model_name}, "
            f"{sum(p.numel() for p in initial.parameters()):,} parameters, float32, train mode\n"
            f"- data: DigitsDataModule(image_size={args.image_size}), {num_train} training images, batch {args.batch_size} "
            f"({-(-num_train // args.batch_size)} steps per epoch, the last one partial), num_workers=0\n"
            f"- optimizer: SGD {SGD_SETTINGS}\n"
            + (
                f"- runs: {args.rounds} rounds x (plain run, framework fit), {args.steps} steps per run, "
                if args.interleave == "runs"
                else f"- runs: {args.rounds} fits of {args.steps} steps, one plain-loop step run (and timed apart) after each framework step, "
            )
            + f"first {args.warmup_steps} steps of every run dropped\n"
            "- framework: Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, "
            "enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0); "
            "ClassificationTask with its torchmetrics accuracy and self.log calls\n",
            flush=True,
        )

        if args.interleave == "runs":
            logs = {"plain": RunLog(), "framework": RunLog()}
            wall = compare_samples(
                {
                    "plain": lambda: plain_run(initial, datamodule, args.steps, args.warmup_steps, logs["plain"]),
                    "framework": lambda: framework_run(initial, datamodule, args.steps, args.warmup_steps, logs["framework"]),
                },
                baseline="plain",
                rounds=args.rounds,
            )
            cpu = Comparison({name: log.cpu_rounds for name, log in logs.items()}, baseline="plain")
            run_walls = {name: f"{statistics.median(log.run_walls):.2f}" for name, log in logs.items()}
        else:
            pairs: dict[str, list[tuple[float, float]]] = {"plain": [], "framework": []}
            for _ in range(args.rounds):
                lockstep = lockstep_run(initial, datamodule, args.steps, args.warmup_steps)
                pairs["plain"] += lockstep.plain
                pairs["framework"] += lockstep.framework
            # Every step pair is a "round": the per-round ratio is the median of per-step ratios.
            wall = Comparison({name: [(w,) for w, _ in samples] for name, samples in pairs.items()}, baseline="plain")
            cpu = Comparison({name: [(c,) for _, c in samples] for name, samples in pairs.items()}, baseline="plain")
            run_walls = {}

    print(f"## Step time (wall clock, perf_counter)\n\nload average after the runs: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if warning := busy_warning():
        print(warning)
    print()
    extra = {"mean ms": {name: f"{timing.mean * 1e3:.1f}" for name, timing in wall.timings.items()}}
    if run_walls:
        extra["run wall s (median)"] = run_walls
    print(wall.table(extra=extra))
    print("\n## Step time (CPU time of the process, all threads, process_time)\n")
    print(cpu.table(extra={"mean ms": {name: f"{timing.mean * 1e3:.1f}" for name, timing in cpu.timings.items()}}))
    ratio, paired = wall.ratio("framework"), wall.paired_ratio("framework")
    per_round = Timing.from_samples(wall.round_ratios("framework"))
    q1, q3 = per_round.quartiles
    unit = "round" if args.interleave == "runs" else "step pair"
    print(
        f"\nframework / plain wall step time: ratio of medians {ratio:.3f}, median per-{unit} ratio {paired:.3f} "
        f"(target <= 1.10: {'met' if max(ratio, paired) <= 1.10 else 'NOT met'}); difference of medians "
        f"{1e3 * (wall['framework'].median - wall['plain'].median):+.1f} ms per step. Per-{unit} ratios: "
        + (
            ", ".join(f"{r:.3f}" for r in per_round.samples)
            if args.interleave == "runs"
            else f"quartiles {q1:.3f}-{q3:.3f}, min {per_round.min:.3f}, max {per_round.max:.3f} over {per_round.n} pairs"
        )
        + "."
    )
    if run_walls:
        print("'run wall s' is one whole run: model copy, Trainer construction and fit, or the plain loop.")
    print("The Trainer has logger=False: no W&B or CSV logging is timed.")


if __name__ == "__main__":
    main()
