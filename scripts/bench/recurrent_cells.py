"""Step time of each recurrent model of ``framework.models`` against ``torch.nn.LSTM`` of the same
hidden size, on CPU.

A step is one forward and backward pass over a whole sequence (inputs (N, L, D), a linear readout
at every step, the mean of the squared outputs as loss, gradients of every parameter), the unit of
a training step without the optimizer. The baseline is ``torch.nn.LSTM`` (one layer, the fused
ATen kernel) followed by the same readout. The candidates are the framework's written-out cells:
PlainRNN, PlainLSTM, BNRNN, BNLSTM, NNRNN, OrthogonalRNN and RelevancyMemoryRNN (RNN cell). All
candidates run in interleaved rounds (baseline, RNN, LSTM, ..., baseline, RNN, ...), so a change of
the machine's load hits all alike; the report gives the median step time, the ratio of medians and
the median of per-round ratios against ``torch.nn.LSTM``. The issue's goal is nnRNN <= 2x.

The nnRNN builds ``W = P (Lambda + T) P^T`` (a matrix exponential and two products) once per
sequence, not per step (``RecurrentNetwork.recurrent_weight`` is called once per forward).

    python scripts/bench/recurrent_cells.py                      # N=64, L=100, D=10, H=128
    python scripts/bench/recurrent_cells.py --threads 1 --hidden 256 --length 200
"""

import argparse
from collections.abc import Callable

import torch
from torch import nn

from framework.benchmarking import busy_warning, compare, environment_report
from framework.models.rnn_base import PlainLSTM, PlainRNN
from framework.models.rnn_batchnorm import BNLSTM, BNRNN
from framework.models.rnn_memory import RelevancyMemoryRNN
from framework.models.rnn_nonnormal import NNRNN, OrthogonalRNN


class TorchLSTM(nn.Module):
    """The baseline: ``torch.nn.LSTM`` (batch first) and a Linear readout at every step."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.readout = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.lstm(x)[0])


def models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """The baseline first, then every framework cell, all with the same sizes."""
    sizes = (args.input_size, args.hidden, args.outputs)
    return {
        "torch.nn.LSTM": TorchLSTM(*sizes),
        "PlainRNN": PlainRNN(*sizes),
        "PlainLSTM": PlainLSTM(*sizes),
        "BNRNN": BNRNN(*sizes),
        "BNLSTM": BNLSTM(*sizes, max_steps=args.length),
        "NNRNN": NNRNN(*sizes),
        "OrthogonalRNN": OrthogonalRNN(*sizes),
        "RelevancyMemoryRNN": RelevancyMemoryRNN(*sizes, window=args.window, relevant_slots=args.relevant_slots),
    }


def training_pass(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward and backward pass of ``model`` over the batch ``x``."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=100, help="sequence length L")
    parser.add_argument("--input-size", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size H of every model")
    parser.add_argument("--outputs", type=int, default=9)
    parser.add_argument("--window", type=int, default=10, help="memory RNN short-term window k")
    parser.add_argument("--relevant-slots", type=int, default=10, help="memory RNN relevant set r")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", nargs="*", default=None, help="candidates to time besides the baseline")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.length, args.input_size)
    candidates = {name: training_pass(model.train(), x) for name, model in models(args).items() if args.only is None or name in args.only or name == "torch.nn.LSTM"}
    print(environment_report())
    comparison = compare(candidates, baseline="torch.nn.LSTM", repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    print(busy_warning() or "machine not busy")
    print(f"\nforward + backward over N={args.batch_size}, L={args.length}, D={args.input_size}, H={args.hidden}\n")
    print(comparison.table())


if __name__ == "__main__":
    main()
