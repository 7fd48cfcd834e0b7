"""A Conv2d layer's KFAC/EKFAC statistics from its patches against the same statistics from its
input kept once (``callbacks.curvature.layers.ConvInputs``), on the 3x3 convolutions of WRN-16-2
at 32x32 (and of the digits CNN), float32, CPU.

Each shape is a batch of random inputs to a 3x3 convolution (stride 1, padding 1, no bias, as in
a WRN) with random output gradients (one draw, as the optimiser's sampled-target statistics), and
three statistics are timed both ways, in interleaved rounds (patches, buffer, patches, ...):

- ``A``: KFAC's input factor, P^T P of the patch matrix against the shifted products of the
  buffer (``ConvInputs.factor_by_shifts``);
- ``dW``: per-example weight gradients sum_t g_t a_t^T, from the patches against one batched
  product per kernel offset with a shifted slice (``ConvInputs.weight_gradients_by_shifts``);
- ``a Q_A``: patches times an orthogonal basis (EKFAC's scaling for T <= out) against a
  convolution with the basis's columns as filters (``ConvInputs.projected``).

Every call starts from the layer's input, as the capture gets it: both sides build the buffer
(``ConvInputs``), the patch side then forms the patches. The report gives medians and the ratio
buffer / patches (< 1: the buffer is faster), and which way ``ConvInputs`` takes at that size.

    python scripts/bench/conv_statistics.py
    python scripts/bench/conv_statistics.py --repeats 20 --threads 1
"""

import argparse

import torch
from torch import nn

from callbacks.curvature import layers
from callbacks.curvature.layers import ConvInputs, gram
from framework.benchmarking import busy_warning, compare, environment, torch_threads

# (batch, channels, image side): WRN-16-2's three groups at 32x32 inputs, batches 32 and 128,
# then the digits CNN's second convolution (8 channels at 4x4, batch 256) and a small layer
SHAPES = [(32, 32, 32), (32, 64, 16), (32, 128, 8), (128, 32, 32), (128, 64, 16), (128, 128, 8), (256, 8, 4), (64, 16, 8)]


def statistics(x: torch.Tensor, conv: nn.Conv2d, gradients: torch.Tensor, basis: torch.Tensor) -> dict[str, dict[str, object]]:
    """For each statistic, the patch-based and the buffer-based computation, each from the layer's
    input as the capture gets it (the buffer built, and on the patch side the patches formed)."""

    def patches() -> torch.Tensor:
        return ConvInputs(x, conv, append_one=False).patches()

    def kept() -> ConvInputs:
        return ConvInputs(x, conv, append_one=False)

    return {
        "A": {"patches": lambda: gram(patches().flatten(0, 1)), "buffer": lambda: kept().factor_by_shifts()},
        "dW": {
            "patches": lambda: torch.einsum("dnto,nti->dnoi", gradients, patches()),
            "buffer": lambda: kept().weight_gradients_by_shifts(gradients),
        },
        "a Q_A": {"patches": lambda: patches() @ basis, "buffer": lambda: kept().projected(basis)},
    }


def taken(inputs: ConvInputs, statistic: str) -> str:
    """Which way ``ConvInputs`` computes ``statistic`` at this size (no patches formed before)."""
    if statistic == "A":
        return "buffer" if inputs.shifted_factor_pays() else "patches"
    if statistic == "dW":
        return "buffer" if inputs.shifted_weight_gradients_pay() else "patches"
    return "buffer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per shape and statistic")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per shape and statistic")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: leave torch's setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(busy_warning() or "machine not busy")
    rows = []
    with torch_threads(args.threads):
        for key, value in environment().items():
            print(f"- {key}: {value}")
        for batch, channels, side in SHAPES:
            torch.manual_seed(args.seed)
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            x = torch.randn(batch, channels, side, side)
            inputs = ConvInputs(x, conv, append_one=False)
            gradients = torch.randn(1, batch, channels, side * side).transpose(2, 3)
            basis = torch.linalg.qr(torch.randn(inputs.features, inputs.features))[0]
            for statistic, candidates in statistics(x, conv, gradients, basis).items():
                comparison = compare(candidates, baseline="patches", repeats=args.repeats, warmup=args.warmup)
                rows.append(((batch, channels, side), statistic, comparison, taken(inputs, statistic)))
                print(f"{(batch, channels, side)} {statistic}: buffer / patches {comparison.ratio('buffer'):.2f}", flush=True)
    print()
    print(f"3x3 convolution, stride 1, padding 1, float32; {args.repeats} timed rounds; PATCHES_KEPT = {layers.PATCHES_KEPT}")
    print("| batch, channels, side | statistic | patches median (ms) | buffer median (ms) | buffer / patches | paired | taken |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape, statistic, comparison, way in rows:
        print(
            f"| {shape} | {statistic} | {comparison['patches'].median * 1e3:.2f} | {comparison['buffer'].median * 1e3:.2f} | "
            f"{comparison.ratio('buffer'):.2f} | {comparison.paired_ratio('buffer'):.2f} | {way} |"
        )
    print(busy_warning() or "machine not busy")


if __name__ == "__main__":
    main()
