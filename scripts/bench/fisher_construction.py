"""Fisher construction time, ours (``callbacks.curvature.fisher``) against NNGeometry 0.4, for the
Diagonal, KFAC, EKFAC and Dense representations of the exact Fisher, on an MLP and a small CNN
on sklearn's digits.

Both sides get the same float32 model (eval mode) and the same DataLoader over the same examples,
and compute the same matrix: NNGeometry's ``FIM(variant="classif_logits")`` is the exact Fisher
(a closed-form Cholesky factor of the softmax covariance), ours ``fisher_type="exact"``. EKFAC is
``PMatEKFAC`` followed by ``update_diag`` (NNGeometry's constructor keeps KFAC's eigenvalues as the
diagonal; the re-estimated diagonal needs that second pass, which ours does in ``fisher``). Before
timing, the script asserts that both give the same matrix (dense form, float32 tolerances). The
candidates alternate within each round (NNGeometry, ours, NNGeometry, ...) so that the machine's
load hits both; the report gives medians and the ratio ours / NNGeometry (goal <= 0.5).

Each (model, representation) case runs in a fresh process: the C library's allocator adapts to
the sizes a process has freed before (glibc raises its mmap and trim thresholds), and in one
process the CNN's KFAC ratio measured 0.55 after the MLP's cases and 0.72-0.86 alone, so a case's
result would otherwise depend on the cases before it.

    python scripts/bench/fisher_construction.py                # all, 5 timed rounds, 512 examples
    python scripts/bench/fisher_construction.py --repeats 9 --threads 1
"""

import argparse
import multiprocessing

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.curvature import fisher
from framework.benchmarking import Comparison, busy_warning, compare, environment, torch_threads
from framework.models import MLP, SmallCNN

REPRESENTATIONS = ("diagonal", "kfac", "ekfac", "dense")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per case")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--examples", type=int, default=512, help="first digits examples used (all: 1797)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--representations", nargs="+", default=list(REPRESENTATIONS), choices=REPRESENTATIONS)
    return parser.parse_args()


class BatchFetched(TensorDataset):
    """A TensorDataset that a DataLoader reads a batch at a time (one indexing per batch instead of
    one per example and a collate), so that data loading, common to both sides, costs ~nothing."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        return tuple(tensor[indices] for tensor in self.tensors)


def keep_batch(batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(batch)


def digits_loader(examples: int, images: bool, batch_size: int) -> DataLoader:
    data = load_digits()
    inputs = torch.tensor(data.data[:examples], dtype=torch.float32) / 16
    targets = torch.tensor(data.target[:examples])
    dataset = BatchFetched(inputs.view(-1, 1, 8, 8) if images else inputs, targets)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=keep_batch)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(32, 32)) if name == "mlp" else SmallCNN(1, 10, channels=(8, 16))
    return model.eval()


def nngeometry_fisher(model: nn.Module, loader: DataLoader, representation: str):
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDense, PMatDiag, PMatEKFAC, PMatKFAC

    kind = {"diagonal": PMatDiag, "kfac": PMatKFAC, "ekfac": PMatEKFAC, "dense": PMatDense}[representation]
    matrix = FIM(model, loader, kind, variant="classif_logits")
    if representation == "ekfac":
        matrix.update_diag(loader)
    return matrix


def ours(model: nn.Module, loader: DataLoader, representation: str):
    return fisher(model, loader, representation, "exact")


def check_equal(model: nn.Module, loader: DataLoader, representation: str) -> float:
    """Both sides' dense matrices agree; returns the largest difference relative to the largest entry."""
    theirs = nngeometry_fisher(model, loader, representation).to_torch()
    mine = ours(model, loader, representation).to_dense()
    scale = mine.abs().max()
    error = ((theirs - mine).abs().max() / scale).item()
    assert error < 1e-4, f"{representation}: NNGeometry and ours differ by {error:.2e} of the largest entry"
    return error


def measure_case(args: argparse.Namespace, model_name: str, representation: str) -> tuple[int, Comparison, float]:
    """One case, checked then timed: (parameters, comparison, largest relative difference)."""
    with torch_threads(args.threads):
        model = make_model(model_name)
        loader = digits_loader(args.examples, model_name == "cnn", args.batch_size)
        error = check_equal(model, loader, representation)
        comparison = compare(
            {
                "nngeometry": lambda: nngeometry_fisher(model, loader, representation),
                "ours": lambda: ours(model, loader, representation),
            },
            baseline="nngeometry",
            repeats=args.repeats,
            warmup=args.warmup,
        )
    return sum(p.numel() for p in model.parameters()), comparison, error


def main() -> None:
    args = parse_args()
    print(busy_warning() or "")
    rows = []
    fresh_processes = multiprocessing.get_context("spawn")
    for model_name in args.models:
        for representation in args.representations:
            with fresh_processes.Pool(1) as pool:
                parameters, comparison, error = pool.apply(measure_case, (args, model_name, representation))
            rows.append((model_name, parameters, representation, comparison, error))
            print(f"{model_name} {representation}: ratio {comparison.ratio('ours'):.2f}", flush=True)
    with torch_threads(args.threads):
        env = environment()
    print()
    print(
        f"digits: {args.examples} examples, batch {args.batch_size}, float32, exact Fisher; {args.repeats} timed rounds, "
        "each case in a fresh process"
    )
    print("| model (P) | representation | NNGeometry median (ms) | ours median (ms) | ours / NNGeometry | paired ratio | max rel. difference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model_name, parameters, representation, comparison, error in rows:
        theirs, mine = comparison["nngeometry"].median, comparison["ours"].median
        print(
            f"| {model_name} ({parameters}) | {representation} | {theirs * 1e3:.1f} | {mine * 1e3:.1f} | "
            f"{comparison.ratio('ours'):.2f} | {comparison.paired_ratio('ours'):.2f} | {error:.1e} |"
        )
    print()
    for key, value in env.items():
        print(f"- {key}: {value}")


if __name__ == "__main__":
    main()
