"""Vision architectures and knowledge transfer at small scale on digits, through the framework's
CLI configs (one ``python -m framework fit --config ...`` subprocess per run, W&B offline, read
back with :mod:`framework.wandb_offline`):

1. DiracNet vs the plain net of the same layout at depths 28 and 40 (width 1,
   ``configs/experiment/dirac_digits.yaml`` / ``dirac_plain_digits.yaml``): validation accuracy
   and training loss per step, test accuracy, and the signal across depth at initialisation
   that ``ActivationNorms`` logs at step 0.
2. Knowledge transfer (``configs/experiment/distill_*_digits.yaml``): a WRN-16-2 teacher, then
   a WRN-10-1 student alone, with KD, with AT and with KD+AT; plus the attention-map images the
   Distillation callback logged.
3. Patch matching on digit pairs (``configs/experiment/patch_*_digits.yaml``): FPR95 of 2ch,
   siamese, pseudo-siamese and 2ch-2stream.

Figures go to ``docs/figures/vision_*.png``; a markdown summary is printed. Runs execute two at
a time with one torch thread each (faster than two threads on a shared machine). The default
scale took 43 min of wall clock on 2 cores at a load average of 20-30 from other jobs (not yet
timed on a quiet machine):

    python scripts/studies/vision.py
    python scripts/studies/vision.py --reuse     # re-plot from the runs already in --workdir
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from framework.wandb_offline import metric_series, read_history  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "configs" / "experiment"
FIGURES = REPO / "docs" / "figures"
PATCH_NETWORKS = ("2ch", "siamese", "pseudo_siamese", "2ch2stream")
DISTILLATION = ("student", "kd", "at", "kd_at")


@dataclass
class Run:
    """One CLI run: its W&B run id (also its label), experiment config and overrides."""

    run_id: str
    experiment: str
    epochs: int
    overrides: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "framework", "fit", "--config", str(EXPERIMENTS / f"{self.experiment}.yaml"),
            "--trainer.max_epochs", str(self.epochs), "--model.init_args.lr_scheduler.init_args.T_max", str(self.epochs),
            "--trainer.logger.init_args.id", self.run_id, "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *self.overrides,
        ]


def run_file(workdir: Path, run_id: str) -> Path | None:
    found = sorted((workdir / "logs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    return found[-1] if found else None


def execute(run: Run, workdir: Path, reuse: bool) -> tuple[Path, float]:
    """Run ``run`` in ``workdir`` (unless ``reuse`` and it finished before); its W&B run file
    and wall time in seconds."""
    existing = run_file(workdir, run.run_id)
    if reuse and existing is not None and any("test/acc" in row or "test/fpr95" in row for row in read_history(existing)):
        return existing, float("nan")
    inherited = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    env = {**inherited, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run(run.command(), cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{run.run_id} failed:\n{result.stderr[-3000:]}")
    print(f"  {run.run_id}: {seconds:.0f} s", flush=True)
    path = run_file(workdir, run.run_id)
    if path is None:
        raise RuntimeError(f"{run.run_id}: no W&B run file under {workdir / 'logs' / 'wandb'}")
    return path, seconds


def epoch_series(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(epoch + 1, value)`` of a per-epoch metric."""
    return [(int(row["epoch"]) + 1, float(row[key])) for row in history if key in row and "epoch" in row]


def last(history: list[dict[str, Any]], key: str) -> float:
    values = [value for _, value in metric_series(history, key)]
    return values[-1] if values else float("nan")


def plot_dirac(histories: dict[str, list[dict[str, Any]]], depths: list[int]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for depth in depths:
        for kind, style in (("dirac", "-"), ("plain", "--")):
            history = histories[f"{kind}{depth}"]
            label = f"{'DiracNet' if kind == 'dirac' else 'plain'}-{depth}-1"
            axes[0].plot(*zip(*epoch_series(history, "val/acc")), style, marker="o", label=label)
            steps, losses = zip(*metric_series(history, "train/loss"))
            axes[1].plot(steps, losses, style, label=label)
            grads = [history_value(history, f"activations/grad_norm/groups.{g}") for g in range(3)]
            axes[2].plot([1, 2, 3], np.array(grads) / grads[-1], style, marker="o", label=label)
    axes[0].set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    axes[1].set(xlabel="step", ylabel="training loss", title="training loss (logged every 10 steps)", yscale="log")
    axes[2].set(xlabel="group", ylabel="RMS gradient / last group's", title="backward signal at initialisation (step 0)", yscale="log", xticks=[1, 2, 3])
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(FIGURES / "vision_dirac_vs_plain.png", dpi=110)
    plt.close(fig)


def history_value(history: list[dict[str, Any]], key: str) -> float:
    return next(float(row[key]) for row in history if key in row)


def plot_distillation(histories: dict[str, list[dict[str, Any]]]) -> None:
    labels = {"teacher": "teacher\nWRN-16-2", "student": "student\nalone", "kd": "KD", "at": "AT", "kd_at": "KD + AT"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in labels.items():
        history = histories[name]
        axes[0].plot(*zip(*epoch_series(history, "val/acc")), marker="o", label=label.replace("\n", " "), linestyle=":" if name == "teacher" else "-")
    axes[0].set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy (WRN-10-1 students)")
    names = list(labels)
    accuracy = [last(histories[name], "test/acc") for name in names]
    axes[1].bar(range(len(names)), accuracy, color=["grey", "C0", "C1", "C2", "C3"])
    for i, value in enumerate(accuracy):
        axes[1].text(i, value, f"{value:.3f}", ha="center", va="bottom", fontsize=9)
    low = min(accuracy)
    axes[1].set(xticks=range(len(names)), xticklabels=[labels[n] for n in names], ylabel="test accuracy", ylim=(max(0.0, low - 0.05), 1.0), title="test accuracy")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(FIGURES / "vision_distillation.png", dpi=110)
    plt.close(fig)


def plot_attention_maps(run_path: Path, history: list[dict[str, Any]]) -> None:
    """The attention-map images the Distillation callback logged last (one per layer), side by
    side, read from the W&B run's history and media files."""
    images = {}
    for row in history:
        for key, value in row.items():
            if key.startswith("distill/attention/") and key.endswith("/filenames"):
                images[key.split("/")[2]] = (int(row["trainer/global_step"]), run_path.parent / "files" / value[0])
    if not images:
        return
    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 4.5))
    for ax, (layer, (step, path)) in zip(np.atleast_1d(axes), sorted(images.items())):
        ax.imshow(plt.imread(path), cmap="gray", vmin=0, vmax=1)
        ax.set(title=f"{layer}, step {step}\ninput | teacher | student", xticks=[], yticks=[])
    fig.suptitle("distill/attention/<layer> as logged to W&B (KD + AT run)")
    fig.tight_layout()
    fig.savefig(FIGURES / "vision_attention_maps.png", dpi=110)
    plt.close(fig)


def plot_patches(histories: dict[str, list[dict[str, Any]]]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in PATCH_NETWORKS:
        axes[0].plot(*zip(*epoch_series(histories[name], "val/fpr95")), marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="FPR at 95% recall", title="validation FPR95 (lower is better)")
    values = [last(histories[name], "test/fpr95") for name in PATCH_NETWORKS]
    axes[1].bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    for i, value in enumerate(values):
        axes[1].text(i, value, f"{value:.3f}", ha="center", va="bottom", fontsize=9)
    axes[1].set(xticks=range(len(values)), xticklabels=PATCH_NETWORKS, ylabel="FPR95", title="test FPR95, digit pairs")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(FIGURES / "vision_patch_matching.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "logs" / "studies" / "vision", help="working directory of the runs (logs/, logs/teachers/)")
    parser.add_argument("--depths", type=int, nargs="+", default=[28, 40])
    parser.add_argument("--dirac-epochs", type=int, default=5)
    parser.add_argument("--dirac-image-size", type=int, default=8, help="digits resized to this size for DiracNet/plain (the configs use 32)")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=8)
    parser.add_argument("--patch-epochs", type=int, default=2)
    parser.add_argument("--patch-batches", type=int, default=15, help="training batches per epoch of the patch-matching runs")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time")
    parser.add_argument("--reuse", action="store_true", help="skip runs that already finished in --workdir")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(parents=True, exist_ok=True)

    size = ["--data.init_args.image_size", str(args.dirac_image_size)]
    dirac_runs = [
        Run(f"{kind}{depth}", experiment, args.dirac_epochs, [*size, "--model.init_args.backbone.init_args.depth", str(depth)])
        for depth in args.depths
        for kind, experiment in (("dirac", "dirac_digits"), ("plain", "dirac_plain_digits"))
    ]
    patch_runs = [Run(name, f"patch_{name}_digits", args.patch_epochs, ["--trainer.limit_train_batches", str(args.patch_batches)]) for name in PATCH_NETWORKS]
    teacher = Run("teacher", "distill_teacher_digits", args.teacher_epochs)
    students = {name: Run(name, f"distill_{name}_digits", args.student_epochs) for name in DISTILLATION}

    start = time.perf_counter()
    futures: dict[str, Future] = {}
    with ThreadPoolExecutor(args.workers) as pool:
        for run in (teacher, students["student"], *dirac_runs, *patch_runs):
            futures[run.run_id] = pool.submit(execute, run, args.workdir, args.reuse)
        futures["teacher"].result()  # the students below load its checkpoint
        for name in DISTILLATION[1:]:
            futures[name] = pool.submit(execute, students[name], args.workdir, args.reuse)
        results = {name: future.result() for name, future in futures.items()}
    total = time.perf_counter() - start
    histories = {name: read_history(path) for name, (path, _) in results.items()}

    plot_dirac(histories, args.depths)
    plot_distillation(histories)
    plot_attention_maps(results["kd_at"][0], histories["kd_at"])
    plot_patches(histories)

    summary: dict[str, Any] = {"total_seconds": total, "seconds": {name: seconds for name, (_, seconds) in results.items()}}
    print(f"\nwall time {total:.0f} s; scale: dirac/plain {args.dirac_epochs} epochs at {args.dirac_image_size}x{args.dirac_image_size}, "
          f"teacher {args.teacher_epochs} epochs, students {args.student_epochs}, patch nets {args.patch_epochs} x {args.patch_batches} batches\n")
    print("| run | test acc | best val acc | grad RMS group 1 / group 3 at init |\n| --- | --- | --- | --- |")
    for run in dirac_runs:
        history = histories[run.run_id]
        ratio = history_value(history, "activations/grad_norm/groups.0") / history_value(history, "activations/grad_norm/groups.2")
        best = max(value for _, value in epoch_series(history, "val/acc"))
        summary[run.run_id] = {"test_acc": last(history, "test/acc"), "best_val_acc": best, "grad_ratio": ratio}
        print(f"| {run.run_id} | {last(history, 'test/acc'):.4f} | {best:.4f} | {ratio:.2f} |")
    print("\n| run | test acc | best val acc | final kd_loss | final AT loss (sum over layers) |\n| --- | --- | --- | --- | --- |")
    for name in ("teacher", *DISTILLATION):
        history = histories[name]
        best = max(value for _, value in epoch_series(history, "val/acc"))
        at = sum(last(history, f"distill/at_loss/groups.{g}") for g in range(3))
        summary[name] = {"test_acc": last(history, "test/acc"), "best_val_acc": best, "kd_loss": last(history, "distill/kd_loss"), "at_loss": at}
        print(f"| {name} | {last(history, 'test/acc'):.4f} | {best:.4f} | {last(history, 'distill/kd_loss'):.4f} | {at:.5f} |")
    print("\n| network | test FPR95 | best val FPR95 | test acc |\n| --- | --- | --- | --- |")
    for name in PATCH_NETWORKS:
        history = histories[name]
        best = min(value for _, value in epoch_series(history, "val/fpr95"))
        summary[name] = {"test_fpr95": last(history, "test/fpr95"), "best_val_fpr95": best, "test_acc": last(history, "test/acc")}
        print(f"| {name} | {last(history, 'test/fpr95'):.4f} | {best:.4f} | {last(history, 'test/acc'):.4f} |")
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
