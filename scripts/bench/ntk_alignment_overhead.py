"""Training-time overhead of the ``NTKAlignment`` callback at its default options (probe,
log-spaced schedule), against the same fit without it.

The run is the digits experiment (``configs/experiment/ntk_alignment_digits.yaml``): SmallCNN
16-32 on 8x8 digits, batch 64, SGD lr 0.05 momentum 0.9, ``--epochs`` epochs without validation.
Both arms start from the same initial weights and see the same batches; they alternate (without,
with, without, ...) so that the machine's load hits both. The measured time of a fit is the sum
of its training-step intervals (``StepTimer`` ticked at every ``on_train_batch_end``; the callback
works in ``on_train_batch_start``, inside an interval), so Trainer and logger start-up are not
counted; both wall and CPU time (``process_time``, less sensitive to other jobs) are reported.
The ratio with / without is the cost of tracking the alignment over that whole run: the
schedule is log-spaced, so the ratio falls as runs get longer (``--epochs``). On a loaded machine
fits vary by tens of percent from one to the next, so the script also measures, within each fit
with the callback, the time spent in the callback's hook: total / (total - hook) is the same
ratio, free of that drift (but blind to indirect costs, e.g. caches the evaluation evicts).

    python scripts/bench/ntk_alignment_overhead.py                 # 6 epochs (about 120 steps), logger=False
    python scripts/bench/ntk_alignment_overhead.py --epochs 30     # a longer run
    python scripts/bench/ntk_alignment_overhead.py --wandb         # with an offline WandbLogger in both arms (heatmaps)
"""

import argparse
import copy
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from callbacks.linearization import NTKAlignment, scheduled_steps  # noqa: E402
from framework.benchmarking import Comparison, StepTimer, busy_warning, compare_samples, environment_report, torch_threads  # noqa: E402
from framework.data import DigitsDataModule  # noqa: E402
from framework.models import SmallCNN  # noqa: E402
from framework.tasks import ClassificationTask  # noqa: E402


class TimedNTKAlignment(NTKAlignment):
    """``NTKAlignment`` with its default options, adding up the wall and CPU time spent in its
    hook (evaluations, logging, heatmaps) within the fit."""

    def __init__(self) -> None:
        super().__init__()
        self.wall = self.cpu = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        super().on_train_batch_start(*args)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu


def fit(
    initial: torch.nn.Module, epochs: int, with_callback: bool, use_wandb: bool, cpu_totals: list[float], in_fit: list[tuple[float, ...]]
) -> list[float]:
    """One fit; returns its total training-step wall time, appends its CPU time and, with the
    callback, the ratios total / (total - time in the callback's hook), wall and CPU, and the
    CPU time in the hook."""
    L.seed_everything(0, verbose=False)
    task = ClassificationTask(
        backbone=copy.deepcopy(initial), num_classes=10, optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    )
    timer = StepTimer()
    callback = TimedNTKAlignment()
    callbacks = [timer.lightning_callback(), *([callback] if with_callback else [])]
    with tempfile.TemporaryDirectory() as directory:
        logger = L.pytorch.loggers.WandbLogger(save_dir=directory, offline=True, project="bench") if use_wandb else False
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=epochs, logger=logger, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        )
        timer.tick()  # the first interval then includes step 0, where the callback evaluates
        trainer.fit(task, datamodule=DigitsDataModule(batch_size=64))
        if use_wandb:
            logger.experiment.finish()
    wall, cpu = sum(timer.intervals()), sum(timer.intervals(cpu=True))
    cpu_totals.append(cpu)
    if with_callback:
        in_fit.append((wall / (wall - callback.wall), cpu / (cpu - callback.cpu), callback.cpu))
    return [wall]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wandb", action="store_true", help="an offline WandbLogger in both arms (the callback then logs heatmaps)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    os.environ.setdefault("WANDB_SILENT", "true")

    torch.manual_seed(0)
    initial = SmallCNN(1, 10, channels=(16, 32))
    defaults = NTKAlignment()
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    steps = args.epochs * -(-len(datamodule.datasets["train"]) // 64)
    evaluations = scheduled_steps(defaults.schedule, steps - 1, defaults.every_k, defaults.log_base, defaults.log_growth)
    with torch_threads(args.threads):
        print(environment_report())
        print(
            f"\nSmallCNN 16-32 on digits, batch 64, {args.epochs} epochs = {steps} steps, no validation, "
            f"logger={'WandbLogger(offline)' if args.wandb else 'False'}; NTKAlignment defaults: probe_size={defaults.probe_size}, "
            f"schedule={defaults.schedule} (log_base={defaults.log_base}, log_growth={defaults.log_growth}), "
            f"per_layer={defaults.per_layer}: {len(evaluations)} evaluations at steps {evaluations}. {args.rounds} rounds.\n",
            flush=True,
        )
        cpu: dict[str, list[float]] = {"without": [], "with NTKAlignment": []}
        in_fit: list[tuple[float, ...]] = []
        wall = compare_samples(
            {
                "without": lambda: fit(initial, args.epochs, False, args.wandb, cpu["without"], in_fit),
                "with NTKAlignment": lambda: fit(initial, args.epochs, True, args.wandb, cpu["with NTKAlignment"], in_fit),
            },
            baseline="without",
            rounds=args.rounds,
            warmup_rounds=1,
        )
    cpu_comparison = Comparison({name: [(sample,) for sample in samples[1:]] for name, samples in cpu.items()}, baseline="without")
    print("### Total training-step time per fit (wall)\n")
    print(wall.table())
    print("\n### Total training-step time per fit (CPU of the process)\n")
    print(cpu_comparison.table())
    ratio = cpu_comparison.paired_ratio("with NTKAlignment")
    measured = in_fit[1:]  # the warm-up round's fit dropped
    in_fit_ratio = statistics.median(cpu_ratio for _, cpu_ratio, _ in measured)
    evaluation_cost = statistics.median(cost for _, _, cost in measured) / len(evaluations)
    step_cost = cpu_comparison["without"].median / steps
    print(
        f"\nwith / without over {steps} steps: wall {wall.paired_ratio('with NTKAlignment'):.3f}, CPU {ratio:.3f} (target <= 1.2: "
        f"{'met' if ratio <= 1.2 else 'NOT met'}).\n\nWithin each fit with the callback, total training-step time over the same "
        "minus the time spent in the callback's hook (not affected by load that changes between fits; misses indirect costs "
        f"such as evicted caches): CPU {in_fit_ratio:.3f} (rounds {', '.join(f'{r[1]:.3f}' for r in measured)}; target <= 1.2: "
        f"{'met' if in_fit_ratio <= 1.2 else 'NOT met'}), wall {statistics.median(r[0] for r in measured):.3f}. CPU per training "
        f"step {step_cost * 1e3:.1f} ms, per evaluation (in the hook) {evaluation_cost * 1e3:.0f} ms.\n\n"
        "Projected CPU ratio for longer runs of the same model (1 + evaluations x per-evaluation cost / (steps x per-step cost), "
        "the log-spaced schedule evaluating ever more rarely):\n"
    )
    print("| steps | evaluations | projected ratio |\n| --- | --- | --- |")
    for length in (steps, 500, 1000, 2000, 5000, 10000):
        count = len(scheduled_steps(defaults.schedule, length - 1, defaults.every_k, defaults.log_base, defaults.log_growth))
        print(f"| {length} | {count} | {1 + count * evaluation_cost / (length * step_cost):.2f} |")
    if warning := busy_warning():
        print(warning)


if __name__ == "__main__":
    main()
