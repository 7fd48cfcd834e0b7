"""framework.wandb_offline against real offline runs written by the installed wandb (and Lightning's
WandbLogger), so a change in wandb's file format fails here rather than in an analysis script."""

import math
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import wandb
from lightning.pytorch.loggers import WandbLogger
from wandb.proto.wandb_internal_pb2 import ConfigItem, ConfigRecord

from framework.errors import DataFileError
from framework.wandb_offline import (
    find_offline_runs,
    metric_series,
    read_config,
    read_history,
    read_records,
    read_run_id,
)

_VARYING = ("_runtime", "_timestamp")  # wall-clock values W&B adds to every row


def _offline(mp: pytest.MonkeyPatch) -> None:
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def basic_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small offline run shared by the read-only tests (each wandb.init costs ~0.5 s)."""
    root = tmp_path_factory.mktemp("basic")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        start = time.time()
        run = wandb.init(dir=root, project="t", config={"lr": 0.1, "model": {"depth": 4, "width": 16}, "dropped": 1})
        run.log({"train/loss": 2.5, "trainer/global_step": 0})
        run.log({"train/loss": 1.25, "trainer/global_step": 10, "val": {"acc": 0.5}})
        run.log({"note": "text", "inf": float("inf")})
        run.config.update({"lr": 0.05}, allow_val_change=True)
        run.config.update({"epochs": 3})
        # The SDK never emits config removals or nested config keys itself; publish one config
        # record with both through the run's own interface so wandb-core writes it for real.
        run._interface._publish_config(
            ConfigRecord(
                update=[ConfigItem(nested_key=["model", "width"], value_json="32")],
                remove=[ConfigItem(key="dropped")],
            )
        )
        run_id = run.id
        run.finish()
        end = time.time()
    (path,) = find_offline_runs(root, finished_within=60)
    return {"path": path, "id": run_id, "start": start, "end": end}


def test_reads_history_config_and_id_of_an_offline_run(basic_run: dict) -> None:
    path = basic_run["path"]
    assert path.name == f"run-{basic_run['id']}.wandb"
    assert read_run_id(path) == basic_run["id"]

    history = read_history(path)
    assert [{k: v for k, v in row.items() if k not in _VARYING} for row in history] == [
        {"_step": 0, "train/loss": 2.5, "trainer/global_step": 0},
        {"_step": 1, "train/loss": 1.25, "trainer/global_step": 10, "val/acc": 0.5},
        {"_step": 2, "note": "text", "inf": math.inf},
    ]
    for row in history:
        assert basic_run["start"] - 1 <= row["_timestamp"] <= basic_run["end"] + 1
        assert 0 <= row["_runtime"] <= basic_run["end"] - basic_run["start"] + 1
    assert metric_series(history, "train/loss") == [(0, 2.5), (10, 1.25)]
    assert metric_series(history, "inf") == [(2, math.inf)]  # no trainer/global_step: falls back to _step

    assert read_config(path) == {"_wandb": {}, "lr": 0.05, "model": {"depth": 4, "width": 32}, "epochs": 3}


def test_find_offline_runs_orders_by_modification_time(basic_run: dict, tmp_path: Path) -> None:
    newer, older = tmp_path / "a" / "run-new.wandb", tmp_path / "b" / "c" / "run-old.wandb"
    for path, mtime in ((newer, 2_000_000_000), (older, 1_000_000_000)):
        path.parent.mkdir(parents=True)
        shutil.copy(basic_run["path"], path)
        os.utime(path, (mtime, mtime))
    (tmp_path / "a" / "other.wandb").write_bytes(b"")
    assert find_offline_runs(tmp_path) == [older, newer]
    with pytest.raises(DataFileError, match="not a directory"):
        find_offline_runs(tmp_path / "missing")


def test_lightning_wandb_logger_rows_carry_global_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="t")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"train/loss": 0.5}, step=3)
    logger.log_metrics({"train/loss": 0.25, "val/acc": 0.75}, step=7)
    run_id = logger.version
    logger.experiment.finish()

    (path,) = find_offline_runs(tmp_path, finished_within=60)
    assert read_run_id(path) == run_id
    history = read_history(path)
    assert [{k: v for k, v in row.items() if k not in _VARYING} for row in history] == [
        {"_step": 0, "train/loss": 0.5, "trainer/global_step": 3},
        {"_step": 1, "train/loss": 0.25, "val/acc": 0.75, "trainer/global_step": 7},
    ]
    assert metric_series(history, "train/loss") == [(3, 0.5), (7, 0.25)]
    assert metric_series(history, "val/acc") == [(7, 0.75)]
    assert read_config(path) == {"_wandb": {}, "lr": 0.1}


def test_records_spanning_blocks_all_come_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    run = wandb.init(dir=tmp_path, project="t")
    blob = "".join(chr(ord("a") + i % 26) for i in range(70_000))  # > 2 blocks: first, middle and last chunks
    run.log({"blob": blob})
    for i in range(500):
        run.log({"train/loss": i / 7, "trainer/global_step": i})
    run.finish()

    (path,) = find_offline_runs(tmp_path, finished_within=60)
    assert path.stat().st_size > 64 * 1024
    history = read_history(path)
    assert history[0]["blob"] == blob
    assert [row["_step"] for row in history] == list(range(501))
    assert metric_series(history, "train/loss") == [(i, i / 7) for i in range(500)]


@pytest.mark.parametrize(
    "content",
    [b"", b":W&B", b"step,loss\n0,1.0\n" * 100, b":W&B\xe1\xbe\x01" + bytes(100)],
    ids=["empty", "short", "csv", "format-version-1"],
)
def test_a_file_that_is_not_a_wandb_run_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "run-garbage.wandb"
    path.write_bytes(content)
    for read in (read_records, read_history, read_config, read_run_id):
        with pytest.raises(DataFileError, match="expected a W&B run file") as info:
            read(path)
        assert str(path) in str(info.value)


def test_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="does not exist"):
        read_records(tmp_path / "run-none.wandb")


def test_a_corrupted_chunk_fails_its_checksum(basic_run: dict, tmp_path: Path) -> None:
    data = bytearray(basic_run["path"].read_bytes())
    data[20] ^= 0xFF  # inside the payload of the first chunk (header 0-6, chunk header 7-13)
    path = tmp_path / "run-corrupt.wandb"
    path.write_bytes(data)
    with pytest.raises(DataFileError, match="CRC-32") as info:
        read_history(path)
    assert str(path) in str(info.value)


def test_a_record_cut_off_by_the_end_of_the_file_is_left_out(basic_run: dict, tmp_path: Path) -> None:
    data = basic_run["path"].read_bytes()
    path = tmp_path / "run-cut.wandb"
    path.write_bytes(data[:-1])
    whole = list(read_records(basic_run["path"]))
    assert list(read_records(path)) == whole[:-1]
    assert read_history(path) == read_history(basic_run["path"])  # the last record is not history


def test_finished_within_waits_for_the_exit_record_and_refuses_an_unfinished_run(basic_run: dict, tmp_path: Path) -> None:
    data = basic_run["path"].read_bytes()
    path = tmp_path / "run-writing.wandb"
    path.write_bytes(data[:-1])  # the exit record, written last, is cut off
    with pytest.raises(DataFileError, match="run-writing.wandb has no exit record after 0.5 s"):
        find_offline_runs(tmp_path, finished_within=0.5)
    finisher = threading.Timer(0.5, path.write_bytes, args=(data,))
    finisher.start()
    assert find_offline_runs(tmp_path, finished_within=30) == [path]
    finisher.join()
    assert path.read_bytes() == data
