"""Tests for framework.benchmarking: statistics of known samples, interleaving order, ratios of
candidates whose cost is known (sleeps, or self-reported samples), thread restoring, the table.
No tight wall-time bounds: sleeps only ever overshoot, so only generous ratio bands are checked."""

import time

import pytest

from framework.benchmarking import (
    Comparison,
    StepTimer,
    Timing,
    busy_warning,
    compare,
    compare_samples,
    environment,
    environment_report,
    format_ms,
    time_function,
    torch_threads,
)


def test_timing_statistics_of_known_samples():
    timing = Timing.from_samples([3.0, 1.0, 10.0, 2.0], name="known")
    assert timing.n == 4
    assert timing.median == 2.5
    assert timing.min == 1.0 and timing.max == 10.0
    assert timing.mean == 4.0
    # Linear interpolation on the sorted samples [1, 2, 3, 10] (numpy's default): positions 0.75 and 2.25.
    assert timing.quartiles == pytest.approx((1.75, 4.75))
    assert timing.iqr == pytest.approx(3.0)
    assert Timing.from_samples([5.0]).quartiles == (5.0, 5.0)
    with pytest.raises(ValueError):
        Timing.from_samples([])


def test_timestamps_become_intervals_without_warmup():
    timing = Timing.from_timestamps([10.0, 11.0, 13.0, 16.0, 20.0], skip=1)
    assert timing.samples == (2.0, 3.0, 4.0)


def test_step_timer_ticks_from_lightning_hook():
    timer = StepTimer()
    callback = timer.lightning_callback()
    for batch_idx in range(4):
        callback.on_train_batch_end(None, None, None, None, batch_idx)
    assert len(timer.stamps) == 4
    assert timer.stamps == sorted(timer.stamps)
    assert len(timer.intervals(skip=1)) == 2
    assert len(timer.intervals(skip=1, cpu=True)) == 2
    assert all(interval >= 0 for interval in timer.intervals(cpu=True))


def test_time_function_counts_calls_and_samples():
    calls = []
    timing = time_function(lambda: calls.append(1), warmup=2, repeats=5, name="noop")
    assert len(calls) == 7
    assert timing.n == 5 and timing.name == "noop"
    assert all(sample >= 0 for sample in timing.samples)
    with pytest.raises(ValueError):
        time_function(lambda: None, repeats=0)


def test_compare_interleaves_calls():
    log = []
    comparison = compare({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, baseline="a", repeats=3, warmup=1)
    assert log == ["a", "b"] * 4
    assert comparison.order == log
    assert comparison["a"].n == 3 and comparison["b"].n == 3


def test_compare_sleeps_ratio_is_about_two():
    # 2 ms vs 4 ms: sleeps overshoot by a roughly constant amount, so the ratio lies a bit
    # below 2; the band is wide so a loaded machine does not fail the test.
    comparison = compare(
        {"short": lambda: time.sleep(0.002), "long": lambda: time.sleep(0.004)}, baseline="short", repeats=15, warmup=1
    )
    assert comparison.ratio("short") == 1.0
    assert 1.3 < comparison.ratio("long") < 2.7
    assert comparison["short"].median >= 0.002


def test_compare_samples_pools_self_reported_samples_after_warmup_rounds():
    log = []
    rounds = iter(range(100))

    def baseline():
        log.append("plain")
        return [0.010, 0.010, 0.010]

    def candidate():
        log.append("framework")
        # The first (warm-up) round is very slow and must be discarded.
        return [1.0] * 3 if next(rounds) == 0 else [0.011, 0.012, 0.013]

    comparison = compare_samples({"plain": baseline, "framework": candidate}, baseline="plain", rounds=2, warmup_rounds=1)
    assert log == ["plain", "framework"] * 3
    assert comparison["framework"].samples == (0.011, 0.012, 0.013) * 2
    assert comparison.rounds["framework"] == [(0.011, 0.012, 0.013)] * 2
    assert comparison.ratio("framework") == pytest.approx(1.2)
    assert comparison.paired_ratio("framework") == pytest.approx(1.2)


def test_per_round_ratio_resists_drift_that_pooled_medians_do_not():
    # The machine got 10x slower after the first round (another job started): pooled medians
    # compare mostly-fast baseline samples with mostly-slow candidate samples.
    comparison = Comparison({"plain": [(1.0,), (1.0,), (10.0,)], "framework": [(2.0,), (20.0,), (20.0,)]}, "plain")
    assert comparison.ratio("framework") == pytest.approx(20.0)
    assert comparison.round_ratios("framework") == pytest.approx([2.0, 20.0, 2.0])
    assert comparison.paired_ratio("framework") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same number of rounds"):
        Comparison({"plain": [(1.0,)], "framework": []}, "plain")


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline"):
        compare({"a": lambda: None}, baseline="b", repeats=1)
    with pytest.raises(ValueError, match="baseline"):
        Comparison.from_samples({"a": [1.0]}, baseline="b")


def test_table_has_ratios_and_extra_columns():
    comparison = Comparison.from_samples({"plain": [0.2, 0.2], "framework": [0.3, 0.3]}, "plain")
    lines = comparison.table(extra={"peak MB": {"framework": 12.5}}).splitlines()
    assert lines[0] == "| name | median ms | IQR ms | min ms | n | ratio vs plain | per-round ratio | peak MB |"
    assert lines[1] == "| --- | --- | --- | --- | --- | --- | --- | --- |"
    assert lines[2] == "| plain | 200.0 | 200.0-200.0 | 200.0 | 2 | 1.000 | 1.000 |  |"
    assert lines[3] == "| framework | 300.0 | 300.0-300.0 | 300.0 | 2 | 1.500 | 1.500 | 12.5 |"
    assert format_ms(0.0000123) == "0.0123"


def test_threads_are_set_and_restored():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    seen = []
    time_function(lambda: seen.append(torch.get_num_threads()), warmup=0, repeats=1, threads=1)
    assert seen == [1]
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert environment()["torch threads"] == str(before)


def test_busy_warning_follows_the_load_average(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.3, 0.3, 0.3))
    assert busy_warning() is None
    monkeypatch.setattr("os.getloadavg", lambda: (5.0, 4.0, 3.0))
    assert "load average 5.00 on 2 cores" in busy_warning()


def test_environment_report_lists_the_environment_and_warns_when_busy(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.3, 0.3, 0.3))
    quiet = environment_report()
    assert quiet.startswith("## Environment\n\n- python: ") and "WARNING" not in quiet
    monkeypatch.setattr("os.getloadavg", lambda: (5.0, 4.0, 3.0))
    assert environment_report().endswith(busy_warning())
