"""Patch-matching networks, the hinge loss, FPR95 against a brute-force computation, the task
and its configs."""

from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_vision_dirac import parse_config

from framework.cli import main
from framework.data.patches import DigitPairsDataModule
from framework.errors import UserInputError
from framework.models.patch_matching import PseudoSiameseNet, SiameseNet, TwoChannelNet, TwoChannelTwoStreamNet
from framework.tasks.patch_matching import FalsePositiveRateAtRecall, PatchMatchingTask, hinge_loss
from framework.testing.smoke import check_architecture

REPO = Path(__file__).resolve().parents[1]
NETWORKS = {"2ch": TwoChannelNet, "siamese": SiameseNet, "pseudo_siamese": PseudoSiameseNet, "2ch2stream": TwoChannelTwoStreamNet}


@pytest.mark.parametrize("name", NETWORKS)
def test_architecture_smoke(name, tmp_path):
    check_architecture(NETWORKS[name], torch.randn(3, 2, 64, 64), (3,), tmp_path)


def test_siamese_towers_are_shared_and_pseudo_siamese_towers_are_not():
    torch.manual_seed(0)
    siamese, pseudo = SiameseNet(), PseudoSiameseNet()
    assert siamese.second_tower is None and not any(k.startswith("second_tower") for k in siamese.state_dict())
    patch = torch.randn(2, 1, 64, 64)
    assert not torch.allclose(pseudo.tower(patch), pseudo.second_tower(patch))
    # Shared towers: swapping the patches swaps the two descriptors the decision network sees.
    pairs = torch.randn(2, 2, 64, 64)
    descriptors = torch.cat([siamese.tower(pairs[:, 1:]), siamese.tower(pairs[:, :1])], dim=1)
    torch.testing.assert_close(siamese(pairs.flip(1)), siamese.decision(descriptors))


def test_two_stream_centre_sees_the_central_crop_and_surround_the_whole_pair_at_half_resolution():
    torch.manual_seed(0)
    net = TwoChannelTwoStreamNet()
    pairs = torch.randn(2, 2, 64, 64)
    border_changed = pairs.clone()
    border_changed[:, :, :16] += 1.0  # outside the central 32x32
    centre = lambda x: net.centre(x[:, :, 16:48, 16:48])  # noqa: E731
    torch.testing.assert_close(centre(pairs), centre(border_changed))
    assert not torch.allclose(net.surround(pairs), net.surround(border_changed))
    # The surround stream sees 2x2 averages: changes that keep every 2x2 mean leave it unchanged.
    mean_preserving = pairs.clone()
    mean_preserving[:, :, 0::2, 0::2] += 1.0
    mean_preserving[:, :, 1::2, 0::2] -= 1.0
    torch.testing.assert_close(net.surround(pairs), net.surround(mean_preserving))
    assert not torch.allclose(net(pairs), net(mean_preserving))  # the centre stream sees them


def test_networks_refuse_inputs_that_are_not_64x64_pairs():
    with pytest.raises(UserInputError, match=r"\(N, 2, 64, 64\), got \(2, 2, 32, 32\)"):
        TwoChannelNet()(torch.randn(2, 2, 32, 32))


def test_hinge_loss_on_plus_minus_one_labels():
    scores = torch.tensor([2.0, 0.5, -0.5, -3.0])
    labels = torch.tensor([1, 1, 1, -1])
    # max(0, 1 - y s): 0, 0.5, 1.5, 0
    assert hinge_loss(scores, labels).item() == pytest.approx(0.5)
    assert hinge_loss(scores, labels, margin=3.0).item() == pytest.approx((1 + 2.5 + 3.5 + 0) / 4)


def brute_force_fpr95(scores: np.ndarray, positive: np.ndarray) -> float:
    """Try every threshold: the highest one declaring >= 95% of the matching pairs matching."""
    best = None
    for threshold in np.unique(scores):
        declared = scores >= threshold
        if declared[positive].mean() >= 0.95 and (best is None or threshold > best):
            best = threshold
    return float((scores[~positive] >= best).mean())


@pytest.mark.parametrize(("seed", "num_positive", "num_negative"), [(0, 20, 30), (1, 100, 57), (2, 7, 200), (3, 333, 333)])
def test_fpr95_equals_a_brute_force_computation(seed, num_positive, num_negative):
    rng = np.random.default_rng(seed)
    positive = rng.permutation(np.r_[np.ones(num_positive, bool), np.zeros(num_negative, bool)])
    scores = np.round(rng.normal(size=len(positive)) + positive, 1)  # rounding makes ties
    metric = FalsePositiveRateAtRecall()
    labels = np.where(positive, 1, -1)
    for chunk in np.array_split(np.arange(len(scores)), 3):  # accumulated over batches
        metric.update(torch.from_numpy(scores[chunk]), torch.from_numpy(labels[chunk]))
    assert metric.compute().item() == pytest.approx(brute_force_fpr95(scores, positive))


def test_fpr95_edge_cases():
    metric = FalsePositiveRateAtRecall()
    metric.update(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 1, 1]))
    assert torch.isnan(metric.compute())  # no negatives: undefined
    metric.reset()
    metric.update(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, -1, 1, -1]))
    assert metric.compute().item() == 0.5  # all positives needed: threshold 1.0 admits one of two negatives
    assert metric._reductions["scores"].__name__ == "dim_zero_cat" and metric._reductions["labels"].__name__ == "dim_zero_cat"


def test_task_logs_loss_fpr95_and_acc_and_learns_on_digit_pairs():
    torch.manual_seed(0)
    task = PatchMatchingTask(TwoChannelNet(), optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9))
    data = DigitPairsDataModule(batch_size=32, seed=0)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=12, limit_val_batches=3, limit_test_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    (before,) = trainer.validate(task, datamodule=data, verbose=False)
    trainer.fit(task, datamodule=data)
    logged = trainer.callback_metrics
    assert {"train/loss", "train/fpr95", "train/acc", "val/loss", "val/fpr95", "val/acc"} <= set(logged)
    assert logged["val/fpr95"] < before["val/fpr95"] - 0.2 and logged["val/loss"] < before["val/loss"]
    (tested,) = trainer.test(task, datamodule=data, verbose=False)
    assert set(tested) == {"test/loss", "test/fpr95", "test/acc"}


@pytest.mark.parametrize("name", NETWORKS)
def test_patch_experiments_build_their_network_on_digit_pairs(name, monkeypatch):
    cli = parse_config(monkeypatch, "--config", str(REPO / "configs" / "experiment" / f"patch_{name}_digits.yaml"))
    assert type(cli.model) is PatchMatchingTask and type(cli.model.backbone) is NETWORKS[name]
    assert isinstance(cli.datamodule, DigitPairsDataModule)


def test_brown_experiment_without_files_fails_with_one_line_naming_the_directory(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["framework"])
    experiment = REPO / "configs" / "experiment" / "patch_2ch_digits.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(experiment), "--data", str(REPO / "configs" / "data" / "patches_brown.yaml"), "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: Brown scene directory data/brown/liberty") and "info.txt" in line and "\n" not in line
