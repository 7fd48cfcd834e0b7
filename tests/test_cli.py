"""The command line end to end: the README's main job, exact resume, DDP, errors, config saving."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_framework, write_mnist

from framework.cli import main
from framework.wandb_offline import find_offline_runs, read_config, read_history, read_run_id

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def only_run(cwd: Path) -> Path:
    runs = find_offline_runs(cwd / "logs" / "wandb", finished_within=60)
    assert len(runs) == 1, runs
    return runs[0]


def checkpoint_dir(cwd: Path) -> Path:
    (directory,) = (cwd / "logs" / "framework").glob("*/checkpoints")
    return directory


def values(history: list[dict], key: str) -> list[float]:
    return [row[key] for row in history if key in row]


@pytest.mark.slow
def test_quickstart_reaches_90_percent_and_logs_to_wandb(tmp_path):
    run_framework(tmp_path, "fit", "--config", str(QUICKSTART))
    run = only_run(tmp_path)
    history = read_history(run)
    assert values(history, "train/loss") and values(history, "val/acc")
    assert all("trainer/global_step" in row for row in history if "train/loss" in row)
    (test_accuracy,) = values(history, "test/acc")
    assert test_accuracy >= 0.9
    assert values(history, "lr-SGD"), "LearningRateMonitor logged nothing"
    saved = yaml.safe_load((checkpoint_dir(tmp_path) / "config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone"]["class_path"] == "framework.models.WideResNet"
    assert read_config(run)["config"]["data"]["class_path"] == "framework.data.DigitsDataModule"
    assert checkpoint_dir(tmp_path).parent.name == read_run_id(run)


@pytest.mark.slow
def test_resumed_fit_is_bitwise_equal_and_continues_the_wandb_run(tmp_path):
    short = ("--trainer.max_epochs", "2", "--test_after_fit", "false")
    interrupted, uninterrupted = tmp_path / "interrupted", tmp_path / "uninterrupted"
    interrupted.mkdir(), uninterrupted.mkdir()
    run_framework(interrupted, "fit", "--config", str(QUICKSTART), *short)
    directory = checkpoint_dir(interrupted)
    first_config = (directory / "config.yaml").read_text()
    run_framework(interrupted, "fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "4", "--test_after_fit", "false", "--ckpt_path", str(directory / "last.ckpt"))
    run_framework(uninterrupted, "fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "4", "--test_after_fit", "false")

    resumed = torch.load(checkpoint_dir(interrupted) / "last.ckpt", weights_only=False)
    reference = torch.load(checkpoint_dir(uninterrupted) / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == reference["global_step"] == 4 * 20
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    for state, reference_state in zip(resumed["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values()):
        assert torch.equal(state["momentum_buffer"], reference_state["momentum_buffer"])

    # The resumed run wrote to the same W&B run, and kept the first run's config file.
    runs = find_offline_runs(interrupted / "logs" / "wandb", finished_within=60)
    assert len(runs) == 2 and read_run_id(runs[0]) == read_run_id(runs[1])
    steps = [row["trainer/global_step"] for row in read_history(runs[1]) if "train/loss" in row]
    assert min(steps) > 2 * 20 - 1
    assert (directory / "config.yaml").read_text() == first_config
    assert "ckpt_path" in (directory / "config-1.yaml").read_text()


@pytest.mark.slow
def test_fit_on_two_cpu_processes(tmp_path):
    ddp = REPO / "configs" / "trainer" / "ddp_cpu.yaml"
    run_framework(tmp_path, "fit", "--config", str(QUICKSTART), "--trainer", str(ddp), "--trainer.max_epochs", "1", "--test_after_fit", "false")
    history = read_history(only_run(tmp_path))
    assert values(history, "val/acc")
    # 1257 training images, batch 64 per process on 2 processes: 10 steps in the epoch.
    assert max(row["trainer/global_step"] for row in history if "train/loss" in row) == 9


def cli_error(monkeypatch, capsys, *args: str) -> str:
    """Run the CLI in-process as ``python -m framework ...``; return its one error line."""
    monkeypatch.setattr(sys, "argv", ["framework", *args])
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.max_epoch", "3"], ["trainer.max_epoch: unknown key", "max_epochs"]),
        (["--trainer.max_epochs", "abc"], ["trainer.max_epochs", "Given value: abc"]),
        (["--model.init_args.optimizer.init_args.lrr", "0.1"], ["model.init_args.optimizer.init_args.lrr: unknown key for torch.optim.SGD", "lr, momentum"]),
        (["--data.init_args.format", "images"], ["data.init_args.format", "'image', 'sequence', 'permuted'", "images"]),
        (["--model.init_args.backbone.init_args.depth", "11"], ["depth=11", "6n+4"]),
        (["--model.init_args.backbone.class_path", "framework.models.Nope"], ["model.init_args.backbone", "framework.models.Nope"]),
        (["--data.init_args.batch_size", "0"], ["batch_size=0 must be > 0"]),
        (["--ckpt_path", "missing.ckpt"], ["ckpt_path='missing.ckpt': no such checkpoint file"]),
    ],
)
def test_bad_arguments_fail_with_one_line(monkeypatch, capsys, tmp_path, args, expected):
    monkeypatch.chdir(tmp_path)
    line = cli_error(monkeypatch, capsys, "fit", "--config", str(QUICKSTART), *args)
    for fragment in expected:
        assert fragment in line


def test_unknown_key_in_a_config_file_names_the_key_and_the_allowed_ones(monkeypatch, capsys, tmp_path):
    (tmp_path / "typo.yaml").write_text("data:\n  init_args:\n    batchsize: 32\n")
    line = cli_error(monkeypatch, capsys, "fit", "--config", str(QUICKSTART), "--config", str(tmp_path / "typo.yaml"))
    assert "data.init_args.batchsize: unknown key for framework.data.DigitsDataModule" in line and "batch_size" in line
    (tmp_path / "typo.yaml").write_text("modle:\n  class_path: x\n")
    line = cli_error(monkeypatch, capsys, "fit", "--config", str(QUICKSTART), "--config", str(tmp_path / "typo.yaml"))
    assert "modle" in line and "model" in line and "trainer" in line


def test_missing_and_corrupt_data_files_fail_with_one_line_naming_the_path(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    mnist = ("--data", "framework.data.MNISTDataModule", "--trainer.logger", "false")
    line = cli_error(monkeypatch, capsys, "fit", "--config", str(QUICKSTART), *mnist, "--data.init_args.root", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in line
    write_mnist(tmp_path / "mnist", "train", 20)
    write_mnist(tmp_path / "mnist", "test", 10)
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    line = cli_error(monkeypatch, capsys, "fit", "--config", str(QUICKSTART), *mnist, "--data.init_args.root", str(tmp_path / "mnist"), "--data.init_args.val_size", "5")
    assert "train-images-idx3-ubyte" in line


def test_print_config_shows_the_resolved_config(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["framework", "fit", "--config", str(QUICKSTART), "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["backbone"]["init_args"]["depth"] == 10
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert [c["class_path"].rsplit(".", 1)[1] for c in printed["trainer"]["callbacks"]] == ["ModelCheckpoint", "ModelCheckpoint", "LearningRateMonitor"]
