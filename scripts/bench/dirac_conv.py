"""Forward + backward of a Dirac-parameterised convolution (``DiracConv2d``: the weight
``diag(a) I + diag(b) W / ||W||`` folded into one kernel, then one ``F.conv2d``) against an
ordinary ``nn.Conv2d`` of the same shape (3x3, stride 1, padding 1, no bias), on CPU, float32.

Both candidates take the same input (requiring grad, as inside a network) and backpropagate
the same upstream gradient to the input and to every parameter. The Dirac side does the
convolution plus the fold (a normalisation of the out x in x 3 x 3 kernel, two scalings and an
add, and their backward), whose cost does not grow with the batch or the image, so the ratio
tends to 1 as N x H x W grows. A third candidate, ``fold only`` (the fold's forward and backward
without the convolution), measures that overhead directly: its ratio to ``nn.Conv2d`` (of the
minima, the least disturbed calls) bounds ``DiracConv2d``'s excess and, unlike the difference of
two noisy medians, stays readable on a loaded machine. Candidates are called in interleaved rounds (plain, Dirac, plain,
...) so that the machine's load hits both alike; the target is a ratio <= 1.10.

    python scripts/bench/dirac_conv.py                  # the shapes of DiracNets on digits and CIFAR
    python scripts/bench/dirac_conv.py --threads 1 --repeats 40
"""

import argparse

import torch
from torch import nn

from framework.benchmarking import busy_warning, compare, environment, torch_threads
from framework.models.dirac import DiracConv2d

# (batch, channels, image side): the three groups of DiracNet-28-1 on 32x32 digits at batch 64,
# and of DiracNet-28-4 on CIFAR at batch 32. The fold weighs most on the last group's shapes.
SHAPES = [(64, 16, 32), (64, 32, 16), (64, 64, 8), (32, 64, 32), (32, 128, 16), (32, 256, 8)]


def forward_backward(conv: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> None:
    conv.zero_grad(set_to_none=True)
    x.grad = None
    conv(x).backward(upstream)


def fold_forward_backward(conv: DiracConv2d, upstream: torch.Tensor) -> None:
    conv.zero_grad(set_to_none=True)
    conv.folded_weight().backward(upstream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per shape")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: leave torch's setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    for warning in filter(None, [busy_warning()]):
        print(warning)
    with torch_threads(args.threads):
        for key, value in environment().items():
            print(f"{key}: {value}")
        summary = []
        for batch, channels, side in SHAPES:
            torch.manual_seed(args.seed)
            plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            dirac = DiracConv2d(channels, channels)
            x = torch.randn(batch, channels, side, side, requires_grad=True)
            upstream = torch.randn(batch, channels, side, side)
            kernel_upstream = torch.randn_like(dirac.weight)
            comparison = compare(
                {
                    "nn.Conv2d": lambda: forward_backward(plain, x, upstream),
                    "DiracConv2d": lambda: forward_backward(dirac, x, upstream),
                    "fold only": lambda: fold_forward_backward(dirac, kernel_upstream),
                },
                baseline="nn.Conv2d", repeats=args.repeats, warmup=args.warmup,
            )
            print(f"\n### N={batch}, C={channels}, {side}x{side}\n")
            print(comparison.table())
            summary.append(
                (f"{batch}x{channels}x{side}x{side}", comparison["nn.Conv2d"].median, comparison["DiracConv2d"].median, comparison.ratio("DiracConv2d"),
                 comparison.paired_ratio("DiracConv2d"), comparison["fold only"].median, comparison["fold only"].min / comparison["nn.Conv2d"].min)
            )
    print("\n### Summary: forward + backward, median ms\n")
    print("| input N x C x H x W | nn.Conv2d | DiracConv2d | ratio of medians | per-round ratio | fold only (median) | fold / conv (minima) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape, base, candidate, ratio, paired, fold, fold_ratio in summary:
        print(f"| {shape} | {base * 1e3:.3g} | {candidate * 1e3:.3g} | {ratio:.3f} | {paired:.3f} | {fold * 1e3:.3g} | {fold_ratio:.4f} |")
    for warning in filter(None, [busy_warning()]):
        print(warning)


if __name__ == "__main__":
    main()
