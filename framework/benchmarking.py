"""Shared timing helpers for the benchmarks in ``scripts/bench``.

Every benchmark answers the same question, "how long does X take, and how does it compare with
Y?", so they all time the same way:

* wall time with :func:`time.perf_counter`, kept as raw samples in a :class:`Timing` and
  summarised by robust statistics (median and interquartile range, not the mean, which one slow
  outlier such as a garbage collection or a page fault drags);
* candidates compared in the same process, called in interleaved rounds (A, B, A, B, ...) so that
  slow drift of the machine (thermal throttling, other jobs, allocator growth) hits all of them
  alike instead of biasing whichever ran last; a :class:`Comparison` gives ratios against a
  named baseline, both of pooled medians and as the median of per-round ratios (robust to a
  machine whose load changes between rounds), and prints them as a markdown table;
* a loop that cannot be split into single calls from outside (``Trainer.fit``) times itself with
  a :class:`StepTimer` ticked at every iteration (:meth:`StepTimer.lightning_callback` ticks at
  every ``on_train_batch_end``), and its per-iteration intervals are the samples.

``torch`` and ``lightning`` are imported only where needed, so this module imports instantly.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L

__all__ = [
    "Comparison",
    "StepTimer",
    "Timing",
    "busy_warning",
    "compare",
    "compare_samples",
    "environment",
    "environment_report",
    "time_function",
    "torch_threads",
]


@dataclass(frozen=True)
class Timing:
    """The time samples (seconds) of one candidate and their summary statistics."""

    samples: tuple[float, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"Timing {self.name!r} has no samples")

    @classmethod
    def from_samples(cls, samples: Sequence[float], name: str = "") -> Timing:
        return cls(tuple(float(s) for s in samples), name)

    @classmethod
    def from_timestamps(cls, stamps: Sequence[float], *, skip: int = 0, name: str = "") -> Timing:
        """Samples = differences between consecutive timestamps, the first ``skip`` of them
        (warm-up iterations) dropped."""
        return cls.from_samples(intervals(stamps, skip=skip), name)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        """First and third quartiles (linear interpolation between samples, like numpy's default)."""
        if self.n == 1:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def iqr(self) -> float:
        q1, q3 = self.quartiles
        return q3 - q1

    def __str__(self) -> str:
        q1, q3 = self.quartiles
        return f"{self.name or 'timing'}: median {format_ms(self.median)} ms (IQR {format_ms(q1)}-{format_ms(q3)}, n={self.n})"


def intervals(stamps: Sequence[float], *, skip: int = 0) -> list[float]:
    """Differences between consecutive timestamps, without the first ``skip``."""
    if skip < 0:
        raise ValueError(f"skip={skip} must be >= 0")
    diffs = [b - a for a, b in zip(stamps, stamps[1:])]
    return diffs[skip:]


class StepTimer:
    """Records the time at every :meth:`tick`, for loops timed from inside.

    The interval between two ticks is one iteration including everything that happens between
    them (data loading, hooks, logging), which is what a user waits for per step. Each tick
    reads wall time (:func:`time.perf_counter`) and the CPU time of the whole process
    (:func:`time.process_time`, all threads): on a machine shared with other jobs, wall time
    includes time spent waiting for a core while CPU time mostly does not, so comparing both
    tells contention from real cost (with several torch threads, CPU time also counts threads
    spinning while they wait for each other).
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())

    def intervals(self, *, skip: int = 0, cpu: bool = False) -> list[float]:
        """Per-iteration wall (or, with ``cpu``, process CPU) times in seconds, the first
        ``skip`` (warm-up) dropped."""
        return intervals(self.cpu_stamps if cpu else self.stamps, skip=skip)

    def timing(self, *, skip: int = 0, cpu: bool = False, name: str = "") -> Timing:
        return Timing.from_samples(self.intervals(skip=skip, cpu=cpu), name)

    def lightning_callback(self) -> L.Callback:
        """A Lightning ``Callback`` that ticks this timer at every ``on_train_batch_end``: the
        intervals are then whole training steps inside ``Trainer.fit``, comparable with the
        per-iteration time of a plain loop that ticks at the end of each iteration."""
        import lightning as L

        timer = self

        class TickAtTrainBatchEnd(L.Callback):
            def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
                timer.tick()

        return TickAtTrainBatchEnd()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` and restore the previous count
    after; ``None`` leaves torch's setting alone."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_counts(**counts: int) -> None:
    for key, value in counts.items():
        minimum = 0 if key.startswith("warmup") else 1
        if value < minimum:
            raise ValueError(f"{key}={value} must be >= {minimum}")


def time_function(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 10, threads: int | None = None, name: str = "") -> Timing:
    """Call ``fn()`` ``warmup`` times untimed (caches, lazy initialisation, allocator), then
    ``repeats`` times, each call one sample."""
    _check_counts(warmup=warmup, repeats=repeats)
    samples = []
    with torch_threads(threads):
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return Timing.from_samples(samples, name)


@dataclass(frozen=True)
class Comparison:
    """Samples of several candidates measured side by side in rounds, and their ratios to
    ``baseline``.

    ``rounds[name][r]`` holds the samples of candidate ``name`` in measured round ``r``;
    ``timings[name]`` pools them. Two ratios are given: :meth:`ratio`, of the pooled medians,
    and :meth:`paired_ratio`, the median over rounds of the ratio within each round, which
    cancels slow drift (the candidates of one round ran minutes apart at most) and one
    disturbed round.
    """

    rounds: dict[str, list[tuple[float, ...]]]
    baseline: str
    order: list[str] = field(default_factory=list)
    """The sequence of candidate calls as they were made (warm-up included), for the record."""
    timings: dict[str, Timing] = field(init=False)

    def __post_init__(self) -> None:
        if self.baseline not in self.rounds:
            raise ValueError(f"baseline {self.baseline!r} is not one of the candidates {list(self.rounds)}")
        counts = {name: len(per_round) for name, per_round in self.rounds.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"every candidate needs the same number of rounds, got {counts}")
        pooled = {name: Timing.from_samples([s for samples in per_round for s in samples], name) for name, per_round in self.rounds.items()}
        object.__setattr__(self, "timings", pooled)

    @classmethod
    def from_samples(cls, samples: Mapping[str, Sequence[float]], baseline: str) -> Comparison:
        """A comparison of one round: ``samples`` maps each candidate to its samples."""
        return cls({name: [tuple(s)] for name, s in samples.items()}, baseline)

    def __getitem__(self, name: str) -> Timing:
        return self.timings[name]

    def ratio(self, name: str) -> float:
        """Pooled median of ``name`` over pooled median of the baseline (> 1: slower)."""
        return self.timings[name].median / self.timings[self.baseline].median

    def round_ratios(self, name: str) -> list[float]:
        """Per measured round, median of ``name`` over median of the baseline in that round."""
        return [
            statistics.median(mine) / statistics.median(base)
            for mine, base in zip(self.rounds[name], self.rounds[self.baseline], strict=True)
        ]

    def paired_ratio(self, name: str) -> float:
        """Median over rounds of :meth:`round_ratios`."""
        return statistics.median(self.round_ratios(name))

    def table(self, extra: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        """A markdown table: name, median ms, IQR (q1-q3) ms, min ms, number of samples, ratio
        of medians to the baseline, median of per-round ratios, then one column per key of
        ``extra`` (column -> {candidate: value}; a missing value prints as an empty cell)."""
        extra = dict(extra or {})
        header = ["name", "median ms", "IQR ms", "min ms", "n", f"ratio vs {self.baseline}", "per-round ratio", *extra]
        rows = [header, ["---"] * len(header)]
        for name, timing in self.timings.items():
            q1, q3 = timing.quartiles
            row = [name, format_ms(timing.median), f"{format_ms(q1)}-{format_ms(q3)}", format_ms(timing.min), str(timing.n)]
            row += [f"{self.ratio(name):.3f}", f"{self.paired_ratio(name):.3f}"]
            row += [_cell(column.get(name, "")) for column in extra.values()]
            rows.append(row)
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds with about three significant digits (0.0123, 4.56, 812.3)."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if abs(ms) >= 100 else f"{ms:.3g}"


def compare_samples(
    candidates: Mapping[str, Callable[[], Sequence[float]]],
    *,
    baseline: str,
    rounds: int,
    warmup_rounds: int = 0,
    threads: int | None = None,
) -> Comparison:
    """Compare candidates that time themselves: each call of a candidate runs a loop and returns
    its per-iteration samples in seconds (e.g. :meth:`StepTimer.intervals`). The candidates are
    called in interleaved rounds, in the given order (A, B, A, B, ...); the first
    ``warmup_rounds`` rounds are discarded, the samples of the others kept per round."""
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not one of the candidates {list(candidates)}")
    _check_counts(rounds=rounds, warmup_rounds=warmup_rounds)
    measured: dict[str, list[tuple[float, ...]]] = {name: [] for name in candidates}
    order: list[str] = []
    with torch_threads(threads):
        for round_index in range(warmup_rounds + rounds):
            for name, run in candidates.items():
                order.append(name)
                samples = tuple(run())
                if round_index >= warmup_rounds:
                    if not samples:
                        raise ValueError(f"candidate {name!r} returned no samples")
                    measured[name].append(samples)
    return Comparison(measured, baseline, order)


def compare(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    baseline: str,
    repeats: int = 10,
    warmup: int = 1,
    threads: int | None = None,
) -> Comparison:
    """Time each call of each candidate from outside, in interleaved rounds (A, B, A, B, ...):
    ``warmup`` untimed rounds, then ``repeats`` timed ones; each call is one sample."""

    def timed(fn: Callable[[], Any]) -> Callable[[], list[float]]:
        def run() -> list[float]:
            start = time.perf_counter()
            fn()
            return [time.perf_counter() - start]

        return run

    _check_counts(repeats=repeats, warmup=warmup)
    return compare_samples(
        {name: timed(fn) for name, fn in candidates.items()}, baseline=baseline, rounds=repeats, warmup_rounds=warmup, threads=threads
    )


def environment() -> dict[str, str]:
    """What a timing depends on, to print beside every result: versions, CPU, torch's thread
    count now (call it inside :func:`torch_threads` when a benchmark sets one) and the load
    average (other processes on a shared machine slow everything down)."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load average (1, 5, 15 min)"] = ", ".join(f"{load:.2f}" for load in os.getloadavg())
    if "lightning" in sys.modules:
        info["lightning"] = sys.modules["lightning"].__version__
    if torch.cuda.is_available():
        info["cuda device"] = torch.cuda.get_device_name()
    return info


def busy_warning(threshold: float = 0.5) -> str | None:
    """A warning when the 1-minute load average exceeds ``threshold`` x the number of cores
    (other jobs compete for the CPU, so wall times measure them too), else None. Call it
    before and after a benchmark and print what it returns."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= threshold * cores:
        return None
    return f"WARNING: load average {load:.2f} on {cores} cores: other processes compete for the CPU; wall times are unreliable"


def environment_report() -> str:
    """``## Environment`` and :func:`environment` as a Markdown list, followed by
    :func:`busy_warning` when the machine is busy: the header every benchmark prints."""
    lines = ["## Environment", "", *(f"- {key}: {value}" for key, value in environment().items())]
    if warning := busy_warning():
        lines += ["", warning]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
