"""Per-step overhead of training with the framework (ClassificationTask + lightning Trainer)
against a hand-written PyTorch loop doing the same work, on CPU.

Both sides train the same WideResNet (same initial weights, train mode, float32) on the same
DigitsDataModule loader (images upsampled to 32x32, batch 128 by default), with the same SGD
settings. A step time is the interval between the ends of two consecutive training steps, so it
includes data loading and everything else the loop does per step: inside ``Trainer.fit`` it is
measured by a callback at ``on_train_batch_end``, in the plain loop by a timestamp at the end of
each iteration. The first ``--warmup-steps`` intervals of each run are dropped.

The framework does by design a little more per step than the plain loop, and this is kept:
torchmetrics accuracy update (and its compute at epoch end), ``self.log`` of loss and accuracy,
Lightning's hooks, closure-based optimizer step and batch transfer. The plain loop computes the
batch accuracy and reads loss and accuracy with ``.item()``, as a hand-written script printing
them would. The Trainer runs with logger=False, no progress bar, no checkpointing, no model
summary and no validation, so the ratio is the cost of the training loop itself, not of W&B.

The two sides run in interleaved rounds (plain, framework, plain, framework, ...) so that drift
of the machine affects both alike; the report gives the median step time of each and the ratio
framework / plain (the target is <= 1.10 at batch 128).

    python scripts/bench/train_step_overhead.py                    # WRN-16-2, batch 128
    python scripts/bench/train_step_overhead.py --threads 1                        # less sensitive to other jobs
    python scripts/bench/train_step_overhead.py --model linear --steps 60 --threads 1  # fixed overhead per step
"""

import argparse
import copy
import functools
import logging
import os
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F

from framework.benchmarking import Comparison, StepTimer, busy_warning, compare_samples, environment, torch_threads
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
    parser.add_argument("--steps", type=int, default=12, help="training steps per run (one epoch of digits is 10 steps at batch 128)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="step intervals dropped at the start of every run")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (plain run, framework run)")
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


def plain_run(initial: torch.nn.Module, datamodule: DigitsDataModule, steps: int, warmup_steps: int, log: RunLog) -> list[float]:
    """A hand-written training loop; returns its per-step wall times in seconds."""
    start = time.perf_counter()
    model = copy.deepcopy(initial)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), **SGD_SETTINGS)
    loader = datamodule.train_dataloader()
    timer = StepTimer()
    history = []
    step, epoch = 0, 0
    while step < steps:
        loader.sampler.set_epoch(epoch)  # as Lightning does at the start of every epoch
        for images, labels in loader:
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
            history.append((loss.item(), accuracy.item()))
            timer.tick()
            step += 1
            if step == steps:
                break
        epoch += 1
    return log.record(timer, start, warmup_steps)


def framework_run(initial: torch.nn.Module, datamodule: DigitsDataModule, steps: int, warmup_steps: int, log: RunLog) -> list[float]:
    """``Trainer.fit`` of a ClassificationTask; returns its per-step wall times in seconds."""
    start = time.perf_counter()
    task = ClassificationTask(
        backbone=copy.deepcopy(initial), num_classes=datamodule.num_classes, optimizer=functools.partial(torch.optim.SGD, **SGD_SETTINGS)
    )
    timer = StepTimer()
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
        callbacks=[timer.lightning_callback()],
    )
    trainer.fit(task, datamodule=datamodule)
    if trainer.global_step != steps:
        raise RuntimeError(f"the Trainer ran {trainer.global_step} steps, expected {steps}")
    return log.record(timer, start, warmup_steps)


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
            initial = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
            model_name = "Flatten + Linear(1024, 10) (near-free compute: shows the fixed overhead per step)"
        datamodule = DigitsDataModule(image_size=32, batch_size=args.batch_size, seed=args.seed)
        datamodule.setup("fit")
        num_train = len(datamodule.datasets["train"])

        print("## Environment\n")
        for key, value in environment().items():
            print(f"- {key}: {value}")
        if warning := busy_warning():
            print(f"\n{warning}")
        print(
            f"\n## Setup\n\n- model: {model_name}, "
            f"{sum(p.numel() for p in initial.parameters()):,} parameters, float32, train mode\n"
            f"- data: DigitsDataModule(image_size=32), {num_train} training images, batch {args.batch_size} "
            f"({-(-num_train // args.batch_size)} steps per epoch, the last one partial), num_workers=0\n"
            f"- optimizer: SGD {SGD_SETTINGS}\n"
            f"- runs: {args.rounds} rounds x (plain, framework), {args.steps} steps per run, first {args.warmup_steps} "
            "step intervals of every run dropped\n"
            "- framework: Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, "
            "enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0); "
            "ClassificationTask with its torchmetrics accuracy and self.log calls\n",
            flush=True,
        )

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

    print(f"## Step time (wall clock, perf_counter)\n\nload average after the runs: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if warning := busy_warning():
        print(warning)
    print()
    print(
        wall.table(
            extra={
                "mean ms": {name: f"{timing.mean * 1e3:.1f}" for name, timing in wall.timings.items()},
                "run wall s (median)": {name: f"{statistics.median(log.run_walls):.2f}" for name, log in logs.items()},
            }
        )
    )
    print("\n## Step time (CPU time of the process, all threads, process_time)\n")
    print(cpu.table(extra={"mean ms": {name: f"{timing.mean * 1e3:.1f}" for name, timing in cpu.timings.items()}}))
    ratio = wall.ratio("framework")
    print(
        f"\nframework / plain median wall step time: {ratio:.3f}, per-round {wall.paired_ratio('framework'):.3f} "
        f"(target <= 1.10: {'met' if max(ratio, wall.paired_ratio('framework')) <= 1.10 else 'NOT met'}); "
        f"difference of medians {1e3 * (wall['framework'].median - wall['plain'].median):+.1f} ms per step. "
        f"Per-round ratios: {', '.join(f'{r:.3f}' for r in wall.round_ratios('framework'))}."
    )
    print(
        "'run wall s' is one whole run: model copy, Trainer construction and fit, or the plain loop. "
        "The Trainer has logger=False: no W&B or CSV logging is timed."
    )


if __name__ == "__main__":
    main()
