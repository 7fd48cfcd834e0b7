"""Cost of an EKFAC / KFAC training step against an SGD step on the same WideResNet and batch, on CPU.

A training step is what a user's loop does per batch: zero the gradients, forward (recorded by
``FisherStatistics`` for EKFAC and KFAC, which draws sampled-target output gradients with one
extra backward to the layer outputs when statistics are due), cross-entropy, backward, and the
optimiser step (factor updates, eigendecompositions, scaling re-estimation and preconditioning
where due, then momentum SGD). All three candidates start from the same weights and train on the
same fixed batch (digits upsampled to ``--image-size``), in float32 and train mode.

One sample is one full cycle of ``--eigen-every`` steps (so it contains exactly one
eigendecomposition) divided by the number of steps: the amortised step time. The candidates run
in interleaved rounds (SGD, KFAC, EKFAC, SGD, ...), each continuing its own training, so a change
of the machine's load hits all of them; the first round is warm-up. The report gives median
amortised step times and the ratios to SGD (goal: EKFAC <= 1.5x SGD), and, with ``--profile``,
where EKFAC's time goes.

    python scripts/bench/ekfac_step.py                          # WRN-16-2, 32x32, batch 32
    python scripts/bench/ekfac_step.py --batch-size 128 --stats-every 20   # WRN's usual batch
    python scripts/bench/ekfac_step.py --stats-every 1          # statistics at every step
    python scripts/bench/ekfac_step.py --threads 1 --clock cpu  # on a machine loaded by other jobs

At batch 32 two costs that do not shrink with the batch (preconditioning every step, the
eigendecompositions) take about half an SGD step of WRN-16-2 on 2 CPU cores, so the goal is
measured at batch 128 too (docs/benchmarks.md, "EKFAC optimiser step").
"""

import argparse
import copy
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from callbacks.curvature.optimizer import EKFAC, FisherStatistics
from framework.benchmarking import busy_warning, compare_samples, environment, torch_threads
from framework.data import DigitsDataModule
from framework.models import WideResNet

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
SGD_SETTINGS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--depth", type=int, default=16, help="WRN depth (6n+4)")
    parser.add_argument("--widen-factor", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32, help="digits are resized from 8x8 to this size")
    parser.add_argument("--eigen-every", type=int, default=20, help="steps per eigendecomposition = steps per sample")
    parser.add_argument("--stats-every", type=int, default=10, help="steps between factor (and EKFAC scaling) updates")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (plus one warm-up round)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: leave torch's setting")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: this process's CPU time (time.process_time), robust to other jobs on a loaded machine; use with --threads 1",
    )
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of one EKFAC cycle")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def fixed_batch(batch_size: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule(batch_size=batch_size, seed=seed)
    data.setup("fit")
    inputs, targets = next(iter(data.train_dataloader()))
    return F.interpolate(inputs, size=image_size, mode="bilinear", align_corners=False), targets


class Trainer:
    """One candidate: a copy of the model, its optimiser and (for EKFAC/KFAC) its statistics."""

    def __init__(self, initial: nn.Module, optimizer: Callable, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.model = copy.deepcopy(initial).train()
        self.optimizer = optimizer(self.model.parameters())
        self.statistics = FisherStatistics(self.model, self.optimizer, fisher_type="mc") if isinstance(self.optimizer, EKFAC) else None
        self.inputs, self.targets = batch

    def step(self) -> None:
        self.optimizer.zero_grad()
        if self.statistics is None:
            logits = self.model(self.inputs)
        else:
            with self.statistics.record(self.targets):
                logits = self.model(self.inputs)
        F.cross_entropy(logits, self.targets).backward()
        self.optimizer.step()

    def cycle(self, steps: int, clock: Callable[[], float] = time.perf_counter) -> list[float]:
        start = clock()
        for _ in range(steps):
            self.step()
        return [(clock() - start) / steps]


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    batch = fixed_batch(args.batch_size, args.image_size, args.seed)
    initial = WideResNet(depth=args.depth, widen_factor=args.widen_factor, num_classes=10, in_channels=1)
    curvature = dict(SGD_SETTINGS, damping=0.03, kl_clip=1e-3, stats_every=args.stats_every, eigen_every=args.eigen_every)
    candidates = {
        "sgd": Trainer(initial, partial(torch.optim.SGD, **SGD_SETTINGS), batch),
        "kfac": Trainer(initial, partial(EKFAC, **curvature, scale_every=None), batch),
        "ekfac": Trainer(initial, partial(EKFAC, **curvature, scale_every=args.stats_every), batch),
    }
    with torch_threads(args.threads):
        for key, value in environment().items():
            print(f"{key}: {value}")
        print(
            f"model: WRN-{args.depth}-{args.widen_factor}, input {args.image_size}x{args.image_size}, batch {args.batch_size}; "
            f"eigen_every={args.eigen_every}, stats_every=scale_every={args.stats_every}; one sample = one cycle of "
            f"{args.eigen_every} steps / {args.eigen_every}; clock: {args.clock}"
        )
        print(busy_warning() or "machine not busy")
        comparison = compare_samples(
            {name: partial(trainer.cycle, args.eigen_every, CLOCKS[args.clock]) for name, trainer in candidates.items()},
            baseline="sgd",
            rounds=args.rounds,
            warmup_rounds=1,
        )
        print(comparison.table())
        print(busy_warning() or "machine not busy")
        ratio = comparison.paired_ratio("ekfac")
        print(f"EKFAC / SGD amortised step: {ratio:.2f}x (goal <= 1.5x): {'met' if ratio <= 1.5 else 'missed'}")
        if args.profile:
            with torch.profiler.profile() as profiler:
                candidates["ekfac"].cycle(args.eigen_every)
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
