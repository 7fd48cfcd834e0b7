"""The recurrent model and copy-task experiment configs build the intended models for their
data, and a copy-task experiment trains from the command line."""

from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from helpers import run_framework

from framework.tasks import SequenceTask
from framework.wandb_offline import find_offline_runs, read_history

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL_CONFIGS = sorted(p for p in (CONFIGS / "model").glob("*.yaml") if "rnn" in p.stem or "lstm" in p.stem)
DATA_FOR_SUFFIX = {"copy": "copy50.yaml", "digits": "sequential_digits.yaml", "adding": "adding100.yaml"}
OUTPUTS_FOR_SUFFIX = {"copy": 9, "digits": 10, "adding": 1}  # classes, or 1 regression output


def build(path: Path, base: type) -> object:
    """Instantiate the ``class_path``/``init_args`` node of a config file as the CLI would."""
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_subclass_arguments(base, "node")
    return parser.instantiate_classes(parser.parse_args(["--node", str(path)])).node


def test_model_configs_cover_every_recurrent_model():
    assert {p.stem for p in MODEL_CONFIGS} >= {
        "rnn_copy", "lstm_copy", "nnrnn_copy", "orthogonal_rnn_copy", "memory_rnn_copy",
        "lstm_digits", "bnlstm_digits", "bnrnn_digits", "nnrnn_adding", "lstm_adding",
    }  # fmt: skip


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # the loss, outside a Trainer
def test_model_config_fits_its_data(path):
    suffix = path.stem.rsplit("_", 1)[1]
    task = build(path, SequenceTask)
    data = build(CONFIGS / "data" / DATA_FOR_SUFFIX[suffix], L.LightningDataModule)
    data.setup()
    x, y, mask = next(iter(data.train_dataloader()))
    with torch.no_grad():
        outputs = task(x[:4])
    assert outputs.shape == (4, x.shape[1], OUTPUTS_FOR_SUFFIX[suffix])
    if task.loss == "cross_entropy":
        assert int(y.max()) < OUTPUTS_FOR_SUFFIX[suffix]
    else:
        assert OUTPUTS_FOR_SUFFIX[suffix] == 1
    assert torch.isfinite(task.training_step((x[:4], y[:4], mask[:4]), 0))


@pytest.mark.slow
def test_copy_experiment_trains_from_the_command_line(tmp_path):
    sizes = ["--data.init_args.train_size", "128", "--data.init_args.val_size", "64", "--data.init_args.test_size", "64"]
    run_framework(tmp_path, "fit", "--config", str(CONFIGS / "experiment" / "copy_nnrnn.yaml"), "--trainer.max_epochs", "1", *sizes)
    (run,) = find_offline_runs(tmp_path / "logs" / "wandb", finished_within=60)
    history = read_history(run)
    assert any("val/loss" in row for row in history)
    assert any("test/acc" in row for row in history)
