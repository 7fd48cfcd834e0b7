"""Inference that really spends less: adaptive inference (each input run only up to its own
halting / exit / gate decision, the inputs still running grouped at each step) against the full
model (every step on every input, as in training), for PonderNet, ACT, the early-exit CNN and the
habitual/controlled network on a batch of Stroop digits.

Each model is freshly initialised, and its halting (exit, gate) units are redrawn with weights
N(0, 1) and bias ``--halt-bias`` (default 0), so that the decisions vary across inputs (at a
fresh initialisation they hardly depend on the input: all inputs halt at once or none does).
The saving depends on the resulting mix of exits, which is printed (mean steps taken). Wall time: median of
interleaved repeats (full, adaptive, full, ...) of one call on the whole batch, under
``torch.no_grad`` in eval mode; FLOPs: counted by ``FlopCounterMode`` on the same calls (and
checked against the model's own accounting, ``compute_of_steps``).

    python scripts/bench/adaptive_inference.py [--batch-size 1024] [--repeats 15] [--threads 1]
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from framework.benchmarking import busy_warning, compare, environment, torch_threads
from framework.data.stroop import StroopDigitsDataModule
from framework.models.adaptive import AdaptiveComputationTime, EarlyExitCNN, HabitualControlledNet, PonderNet

MODELS = {
    "PonderNet (10 steps)": (lambda: PonderNet(192, 10, hidden=64, max_steps=10), lambda m: [m.halting]),
    "ACT (10 steps)": (lambda: AdaptiveComputationTime(192, 10, hidden=64, max_steps=10), lambda m: [m.halting]),
    "EarlyExitCNN (3 stages)": (lambda: EarlyExitCNN(3, 10, channels=(16, 32, 64)), lambda m: list(m.exit_decisions)),
    "HabitualControlled": (lambda: HabitualControlledNet(3, 8, 10, habitual_hidden=32, controlled_channels=(16, 32, 64)), lambda m: [m.gate]),
}


def flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024, help="inputs per call (Stroop digits images, repeated)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--halt-bias", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for line in filter(None, [busy_warning()]):
        print(line)
    data = StroopDigitsDataModule(seed=0)
    data.setup()
    images = data.datasets["train"].tensors[0]
    x = images[torch.arange(args.batch_size) % len(images)]
    rows = []
    with torch_threads(args.threads), torch.no_grad():
        for name, (factory, halting_units) in MODELS.items():
            torch.manual_seed(0)
            model = factory().eval()
            for unit in halting_units(model):
                unit.weight.normal_(0.0, 1.0)
                unit.bias.fill_(args.halt_bias)
            _, steps_taken = model.forward_adaptive(x)
            adaptive_flops, full_flops = flops(lambda: model.forward_adaptive(x)), flops(lambda: model.forward_steps(x))
            assert adaptive_flops == model.compute_of_steps(steps_taken, "flops", x.shape[1:]).sum().item()
            comparison = compare({"full": lambda: model.forward_steps(x), "adaptive": lambda: model.forward_adaptive(x)}, baseline="full", repeats=args.repeats, warmup=2)
            rows.append((name, steps_taken.double().mean().item(), model.compute_bounds("steps", x.shape[1:])[1], comparison["full"].median, comparison["adaptive"].median, comparison.paired_ratio("adaptive"), adaptive_flops / full_flops))
            print(f"\n### {name}\n{comparison.table()}", flush=True)
        print("\n| model | mean steps taken / max | full ms | adaptive ms | time ratio (per-round median) | FLOPs ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, steps, max_steps, full, adaptive, ratio, flops_ratio in rows:
            print(f"| {name} | {steps:.2f} / {max_steps:g} | {full * 1e3:.2f} | {adaptive * 1e3:.2f} | {ratio:.2f} | {flops_ratio:.2f} |")
        print("\n" + "\n".join(f"- {key}: {value}" for key, value in environment().items()))
    for line in filter(None, [busy_warning()]):
        print(line)


if __name__ == "__main__":
    main()
