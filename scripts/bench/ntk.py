"""Empirical NTK: time and peak memory of ours (``EmpiricalNTK``, default options) against the
naive baseline (``vmap(jacrev)`` per-example Jacobians, then one ``einsum``) and NNGeometry's
``GramMatrix``, on digits, for an MLP 64-256-256-10 and a SmallCNN 16-32, full kernel
(N, N, 10, 10) and traced (N, N), for N in --sizes.

Time: per (model, mode, N), the candidates are called in interleaved rounds
(``framework.benchmarking.compare``); warm-up rounds only at the first size of each (model,
mode), fewer repeats at larger N. Peak memory: each (model, mode, N, candidate) runs once more in
a fresh child of a fork server that has imported torch and nothing else; the child builds the
model and inputs, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), computes the
kernel, and reports ``VmHWM`` minus the RSS before the call (so it includes the output kernel).
RSS is what the process really holds, unlike ``tracemalloc`` (blind to torch's allocations), and a
fresh process per measurement avoids allocator caches carried over from earlier calls.

Where a candidate is not run: the naive baseline above --naive-max-n (its Jacobians (N, 10, P)
alone are 3.5 GB for the MLP at N = 1024, and its contraction takes minutes), NNGeometry above
--nngeometry-max-n (minutes at N = 1024). NNGeometry has no traced kernel: its traced time is the
full kernel's plus taking the trace.

Prints one markdown table per (model, mode) and plots the median CPU time against N
(``--plot``, default ``docs/figures/ntk_time.png``).

    python scripts/bench/ntk.py                 # all sizes, both models and modes, with memory
    python scripts/bench/ntk.py --quick         # N in {64, 256}, no memory
    python scripts/bench/ntk.py --large 2000    # the CNN's 2,000 x 2,000 kernel: peak memory (all 1,797 digits + shifted copies)
"""

import argparse
import gc
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from callbacks.linearization import EmpiricalNTK  # noqa: E402
from framework.benchmarking import Comparison, busy_warning, compare_samples, environment, torch_threads  # noqa: E402
from framework.data import DigitsDataModule  # noqa: E402
from framework.models import MLP, SmallCNN  # noqa: E402
from framework.testing.reference import per_example_jacobians  # noqa: E402

MODELS = ("mlp", "cnn")
MODES = ("full", "trace")
CANDIDATES = ("naive", "nngeometry", "ours")
NNGEOMETRY_BATCH = 256


def build(model_name: str, n: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (seed 0, eval mode, float32) and the first ``n`` digits training images."""
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(256, 256)) if model_name == "mlp" else SmallCNN(1, 10, channels=(16, 32))
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    datamodule.setup("test")
    images = datamodule.datasets["train"].tensors[0]
    if n > len(images):  # beyond the 1,258 training images: all 1,797, then copies shifted by a pixel
        images = torch.cat([datamodule.datasets[split].tensors[0] for split in ("train", "val", "test")])
        images = torch.cat([images, images.roll(1, dims=-1)])
    return model.eval(), images[:n]


def naive(model: torch.nn.Module, inputs: torch.Tensor, mode: str) -> torch.Tensor:
    """All per-example Jacobians (N, O, P) with vmap(jacrev), then one einsum."""
    jacobians = per_example_jacobians(model, inputs)
    if mode == "full":
        return torch.einsum("iap,jbp->ijab", jacobians, jacobians)
    return torch.einsum("iap,jap->ij", jacobians, jacobians) / jacobians.shape[1]


def nngeometry(model: torch.nn.Module, inputs: torch.Tensor, mode: str) -> torch.Tensor:
    """NNGeometry's Gram matrix (O, N, O, N), in batches of ``NNGEOMETRY_BATCH`` examples."""
    from nngeometry import GramMatrix

    gram = GramMatrix(model, DataLoader(TensorDataset(inputs), batch_size=NNGEOMETRY_BATCH)).to_torch()
    if mode == "full":
        return gram.permute(1, 3, 0, 2)
    return torch.diagonal(gram, dim1=0, dim2=2).mean(-1)


def ours(model: torch.nn.Module, inputs: torch.Tensor, mode: str) -> torch.Tensor:
    return EmpiricalNTK(mode=mode)(model, inputs)


FUNCTIONS: dict[str, Callable[[torch.nn.Module, torch.Tensor, str], torch.Tensor]] = {
    "naive": naive,
    "nngeometry": nngeometry,
    "ours": ours,
}


def timed(
    function: Callable[[torch.nn.Module, torch.Tensor, str], torch.Tensor],
    model: torch.nn.Module,
    inputs: torch.Tensor,
    mode: str,
    cpu_rounds: list[tuple[float, ...]],
) -> Callable[[], list[float]]:
    """A candidate for ``compare_samples``: one call, its wall time returned and its CPU time
    (``process_time``, less sensitive than wall time to other jobs on a shared machine) kept."""

    def run() -> list[float]:
        wall, cpu = time.perf_counter(), time.process_time()
        function(model, inputs, mode)
        cpu_rounds.append((time.process_time() - cpu,))
        return [time.perf_counter() - wall]

    return run


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(model_name: str, n: int, mode: str, candidate: str, threads: int) -> tuple[float, float, float]:
    """Peak RSS above the RSS before the call, in MB, of one kernel computation (run in a
    fresh child process), and its wall and CPU seconds."""
    torch.set_num_threads(threads)
    model, inputs = build(model_name, n)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    kernel = FUNCTIONS[candidate](model, inputs, mode)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del kernel
    return (_status("VmHWM") - before) / 2**20, wall, cpu


def runnable(candidate: str, n: int, args: argparse.Namespace) -> bool:
    limits = {"naive": args.naive_max_n, "nngeometry": args.nngeometry_max_n}
    return n <= limits.get(candidate, n) and (candidate != "nngeometry" or args.nngeometry_available)


def repeats_at(n: int, args: argparse.Namespace) -> int:
    """``--repeats`` at the smallest size, fewer as the kernel grows (at least 1)."""
    return max(1, round(args.repeats * min(args.sizes) / n))


def check_agreement(model_name: str, mode: str, n: int, kernels: dict[str, torch.Tensor]) -> None:
    reference = kernels["ours"]
    for name, kernel in kernels.items():
        error = ((kernel - reference).norm() / reference.norm()).item()
        if error > 1e-4:
            raise RuntimeError(f"{name} disagrees with ours on {model_name} {mode} N={n}: relative error {error:.2e}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=False)
    styles = {"naive": ("tab:red", "s"), "nngeometry": ("tab:green", "^"), "ours": ("tab:blue", "o")}
    for axis, (model_name, mode) in zip(axes, [(m, d) for m in MODELS for d in MODES]):
        for candidate, (colour, marker) in styles.items():
            points = sorted((n, t) for (m, d, n, c), t in results.items() if (m, d, c) == (model_name, mode, candidate))
            if points:
                axis.loglog(*zip(*points), marker=marker, color=colour, label=candidate)
        axis.set_title(f"{'MLP 64-256-256-10' if model_name == 'mlp' else 'SmallCNN 16-32'}, {mode}")
        axis.set_xlabel("N (examples)")
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend()
    axes[0].set_ylabel("median CPU time (s), 1 thread")
    figure.suptitle("Empirical NTK on digits (float32, CPU): time against N")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds at the smallest size (scaled down as N grows)")
    parser.add_argument("--naive-max-n", type=int, default=256)
    parser.add_argument("--nngeometry-max-n", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--quick", action="store_true", help="N in {64, 256}, no memory")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "figures" / "ntk_time.png")
    parser.add_argument("--large", type=int, metavar="N", help="only ours on the CNN at N (full and trace): peak memory and time, once")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.no_memory = [64, 256], True
    args.sizes = sorted(args.sizes)
    try:
        import nngeometry  # noqa: F401

        args.nngeometry_available = True
    except ImportError:
        args.nngeometry_available = False
    return args


def main() -> None:
    args = parse_args()
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload(["torch", "callbacks.linearization", "framework.models", "framework.data"])
    print("## Environment\n")
    with torch_threads(args.threads):
        for key, value in environment().items():
            print(f"- {key}: {value}")
    if not args.nngeometry_available:
        print("- NNGeometry is not installed: its column is empty")
    if warning := busy_warning():
        print(f"\n{warning}")
    print(
        f"\nfloat32, eval mode, {args.threads} torch thread(s). Time: median wall (and CPU) seconds over interleaved rounds "
        f"({args.repeats} at N = {args.sizes[0]}, fewer at larger N; one warm-up round at the first size). "
        f"Memory: peak RSS above the RSS before the call, fresh process per measurement. "
        f"NNGeometry in batches of {NNGEOMETRY_BATCH}.",
        flush=True,
    )
    if args.large:
        print(f"\n## SmallCNN at N = {args.large}, ours (chunk_size {EmpiricalNTK().chunk_size}), one fresh process each\n")
        print("| mode | kernel MB | peak RSS above start MB | wall s | CPU s |\n| --- | --- | --- | --- | --- |")
        for mode in args.modes:
            with server.Pool(1) as child:
                megabytes, wall, cpu = child.apply(peak_memory, ("cnn", args.large, mode, "ours", args.threads))
            kernel_megabytes = args.large**2 * (100 if mode == "full" else 1) * 4 / 2**20
            print(f"| {mode} | {kernel_megabytes:.0f} | {megabytes:.0f} | {wall:.1f} | {cpu:.1f} |", flush=True)
        return
    pool = None if args.no_memory else server.Pool(1, maxtasksperchild=1)  # one fresh process per measurement
    results: dict[tuple[str, str, int, str], float] = {}
    with torch_threads(args.threads):
        for model_name in args.models:
            for mode in args.modes:
                print(f"\n## {model_name}, {mode}\n", flush=True)
                header = "| N | " + " | ".join(f"{c} s (CPU s)" for c in CANDIDATES) + " | " + " | ".join(f"{c} MB" for c in CANDIDATES)
                rows = [header + " | naive / ours (CPU) | NNGeometry / ours (CPU) |", "|" + " --- |" * (2 * len(CANDIDATES) + 3)]
                for n in args.sizes:
                    model, inputs = build(model_name, n)
                    names = [c for c in CANDIDATES if runnable(c, n, args)]
                    kernels = {name: FUNCTIONS[name](model, inputs, mode) for name in names} if n == args.sizes[0] else {}
                    if kernels:
                        check_agreement(model_name, mode, n, kernels)
                    del kernels
                    cpu_rounds: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
                    warmup = 1 if n == args.sizes[0] else 0
                    comparison = compare_samples(
                        {name: timed(FUNCTIONS[name], model, inputs, mode, cpu_rounds[name]) for name in names},
                        baseline="ours",
                        rounds=repeats_at(n, args),
                        warmup_rounds=warmup,
                    )
                    cpu = Comparison({name: samples[warmup:] for name, samples in cpu_rounds.items()}, baseline="ours")
                    memory = {}
                    if pool is not None:
                        for name in names:
                            memory[name] = pool.apply(peak_memory, (model_name, n, mode, name, args.threads))[0]
                    for name in names:
                        results[(model_name, mode, n, name)] = cpu[name].median
                    times = [f"{comparison[c].median:.3f} ({cpu[c].median:.3f})" if c in names else "not run" for c in CANDIDATES]
                    sizes = [f"{memory[c]:.0f}" if c in memory else "-" for c in CANDIDATES]
                    ratios = [
                        f"{comparison.paired_ratio(c):.1f}x ({cpu.paired_ratio(c):.1f}x)" if c in names else "-"
                        for c in ("naive", "nngeometry")
                    ]
                    rows.append(f"| {n} | " + " | ".join(times + sizes + ratios) + " |")
                    print(rows[-1] if len(rows) > 3 else "\n".join(rows), flush=True)
    if pool is not None:
        pool.close()
    if warning := busy_warning():
        print(f"\n{warning}")
    print(f"\nload average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    plot(results, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
