"""The Stroop data config and the adaptive model configs build what they say, each model
trains and tests under ClassificationTask unchanged on Stroop digits, and an adaptive experiment
with the cost-of-effort callback runs from the CLI."""

from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from framework.data.stroop import StroopDigitsDataModule
from helpers import run_framework

from framework.models.adaptive import AdaptiveComputationTime, EarlyExitCNN, HabitualControlledNet, PonderNet
from framework.tasks import ClassificationTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL_CONFIGS = {
    "ponder_stroop.yaml": PonderNet,
    "adaptive_act_stroop.yaml": AdaptiveComputationTime,
    "early_exit_stroop.yaml": EarlyExitCNN,
    "habitual_controlled_stroop.yaml": HabitualControlledNet,
}
EXPERIMENTS = sorted((CONFIGS / "experiment").glob("adaptive_*_stroop.yaml"))


def build(path: Path, base: type) -> object:
    """Instantiate the ``class_path``/``init_args`` node of a config file as the CLI would."""
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_subclass_arguments(base, "node")
    return parser.instantiate_classes(parser.parse_args(["--node", str(path)])).node


def test_stroop_data_config():
    data = build(CONFIGS / "data" / "stroop_digits.yaml", L.LightningDataModule)
    assert isinstance(data, StroopDigitsDataModule)
    assert data.congruent_fractions == {"train": 0.8, "val": 0.8, "test": 0.0}


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_trains_on_stroop_digits(name, tmp_path):
    L.seed_everything(0, verbose=False)
    task = build(CONFIGS / "model" / name, ClassificationTask)
    assert isinstance(task.backbone, MODEL_CONFIGS[name])
    data = StroopDigitsDataModule(batch_size=32)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    before = [p.detach().clone() for p in task.parameters()]
    trainer.fit(task, datamodule=data)
    (results,) = trainer.test(task, datamodule=data, verbose=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters()))
    assert 0.0 <= results["test/acc"] <= 1.0 and torch.isfinite(torch.tensor(results["test/loss"]))


def test_every_model_has_an_effort_experiment():
    assert {path.name.removeprefix("adaptive_").removesuffix("_stroop.yaml") for path in EXPERIMENTS} == {
        "ponder", "act", "early_exit", "habitual_controlled",
    }  # fmt: skip


@pytest.mark.slow
def test_effort_experiment_runs_from_the_cli(tmp_path):
    config = CONFIGS / "experiment" / "adaptive_habitual_controlled_stroop.yaml"
    result = run_framework(
        tmp_path, "fit", "--config", str(config), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2", "--trainer.log_every_n_steps", "1",
    )  # fmt: skip
    from framework.wandb_offline import read_history

    (run,) = (tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    keys = {key for row in read_history(run) for key in row}
    assert {"effort/lambda", "effort/mean_steps", "effort/flops", "effort/val/inference_steps/incongruent", "effort/test/accuracy"} <= keys, result.stderr[-2000:]
