"""The Pruning callback: the contract (DDP, exact resume with steps before and after the resume
epoch, accumulation and clipping, bf16), its logs, checkpoints of pruned models, bad configs."""

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from helpers import MemoryLogger

from callbacks.pruning import Pruning
from framework.errors import UserInputError
from framework.testing import CHECKS, CallbackContract
from framework.testing.contract import tiny_classification_task, tiny_digits
from framework.wandb_offline import find_offline_runs, read_history

# Steps at the start of epochs 0, 1 and 2; the resume check restarts after epoch 1, so two steps
# happen before the checkpoint and one after it; survivors rewind to the initial weights.
ITERATIVE_QM = partial(
    Pruning, amount=0.8, criterion="QM", schedule="exponential", steps=3, fisher_type="mc", score_batches=2, rewind_to=0
)


# The same in optimizer steps (20 batches per epoch): steps before global steps 7 and 23 come
# before the resume checkpoint (end of epoch 1), the one before 47 after it; mid-epoch each time.
# With accumulate_grad_batches=2 (10 optimizer steps per epoch) the second lands in epoch 2.
ITERATIVE_LM_IN_STEPS = partial(
    Pruning, amount=0.7, criterion="LM", schedule="cubic", steps=3, at_steps=[7, 23, 47], score_batches=2, rewind_to=3
)


@pytest.mark.parametrize("check", CHECKS)
def test_pruning_passes_the_callback_contract(check, tmp_path):
    CallbackContract(ITERATIVE_QM, max_epochs=3, resume_epoch=2).check(check, tmp_path)


@pytest.mark.parametrize("check", ["resume", "accumulation_and_clipping"])
def test_a_schedule_in_optimizer_steps_passes_the_callback_contract(check, tmp_path):
    CallbackContract(ITERATIVE_LM_IN_STEPS, max_epochs=3, resume_epoch=2).check(check, tmp_path)


class MaskProbe(Callback):
    """Records (global_step, batch_idx, pruned weights) at every batch start, after the Pruning callback ran."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        masks = [b for name, b in pl_module.named_buffers() if name.endswith("weight_mask")]
        self.records.append((trainer.global_step, batch_idx, sum(int((m == 0).sum()) for m in masks)))


@pytest.mark.parametrize("accumulate", [1, 3])
def test_steps_in_optimizer_steps_happen_before_the_given_global_steps_and_never_split_a_window(accumulate, tmp_path):
    probe, logger = MaskProbe(), MemoryLogger()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        callbacks=[Pruning(amount=0.5, schedule="linear", steps=2, at_steps=[4, 9], evaluate=accumulate == 1), probe],
        max_epochs=2,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    task = tiny_classification_task()
    trainer.fit(task, datamodule=tiny_digits())
    total = sum(p.numel() for name, p in task.named_parameters() if name.endswith("weight"))
    counts = {0: 0, 4: round(0.25 * total), 9: round(0.5 * total)}
    for global_step, batch_idx, pruned in probe.records:
        assert pruned == counts[max(s for s in counts if s <= global_step)], (global_step, batch_idx)
    changes = [(g, b) for (g, b, n), (_, _, previous) in zip(probe.records, [(0, 0, 0)] + probe.records) if n != previous]
    assert [g for g, _ in changes] == [4, 9] and all(b % accumulate == 0 for _, b in changes), "a step split an accumulation window"
    logged = [(step, m) for step, m in logger.records if "pruning/step" in m]
    assert [(step, m["pruning/step"]) for step, m in logged] == [(4, 1), (9, 2)]
    measured = any("pruning/loss_before" in m for _, m in logger.records) or any("pruning/loss_fine_tuned" in m for _, m in logger.records)
    assert measured == (accumulate == 1), "evaluate=False measures nothing"


def test_every_n_steps_spreads_the_steps_from_start_step():
    assert Pruning(schedule="linear", steps=3, start_step=2, every_n_steps=5).positions == [2, 7, 12]
    assert Pruning(schedule="linear", steps=3, start_step=2, fine_tune=False).positions == [2, 2, 2]
    assert Pruning(schedule="linear", steps=3, start_epoch=1, end_epoch=5).positions == [1, 3, 5]


def fit(callback: Pruning, tmp_path, max_epochs: int = 3) -> tuple[L.Trainer, L.LightningModule, MemoryLogger]:
    """A fit of the contract's tiny task, checkpointing the last epoch to ``tmp_path/last.ckpt``,
    logging in memory and to an offline W&B run under ``tmp_path``."""
    L.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    trainer = L.Trainer(
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=[logger, WandbLogger(save_dir=tmp_path, offline=True, project="pruning")],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    task = tiny_classification_task()
    trainer.fit(task, datamodule=tiny_digits())
    return trainer, task, logger


def test_an_iterative_run_logs_each_step_and_its_checkpoints_load_for_testing(tmp_path):
    trainer, task, logger = fit(ITERATIVE_QM(), tmp_path)
    steps = [(step, m) for step, m in logger.records if "pruning/step" in m]
    assert [m["pruning/step"] for _, m in steps] == [1, 2, 3]
    assert [step for step, _ in steps] == [0, trainer.num_training_batches, 2 * trainer.num_training_batches]
    for _, metrics in steps:
        for key in ("pruning/loss_before", "pruning/loss_after", "pruning/predicted_loss_change", "pruning/measured_loss_change",
                    "pruning/accuracy_before", "pruning/accuracy_after", "pruning/sparsity/backbone.layers.1.weight"):
            assert key in metrics
    assert any("pruning/loss_fine_tuned" in m for _, m in logger.records)
    weights = [p for name, p in task.named_parameters() if name.endswith("weight")]
    total = sum(p.numel() for p in weights)
    assert steps[-1][1]["pruning/sparsity"] == round(0.8 * total) / total
    assert sum(int((p == 0).sum()) for p in weights) == round(0.8 * total), "teardown folds the masks into plain weights"

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert "backbone.layers.1.weight_mask" in checkpoint["state_dict"]
    results = trainer.test(ckpt_path=str(tmp_path / "last.ckpt"), datamodule=tiny_digits(), verbose=False)
    assert results[0]["test/acc"] > 0.5

    trainer.loggers[1].experiment.finish()
    (run,) = find_offline_runs(tmp_path, finished_within=60)
    tables = [row for row in read_history(run) if row.get("pruning/layers/_type") == "table-file"]
    assert [row["trainer/global_step"] for row in tables] == [step for step, _ in steps]
    assert tables[0]["pruning/layers/nrows"] == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"amount": 1.0}, r"amount=1.0 must be in \[0, 1\)"),
        ({"amount": -0.1}, r"amount=-0.1 must be in \[0, 1\)"),
        ({"criterion": "magnitude"}, r"criterion='magnitude' is not allowed; choose one of \['MP', 'LM', 'QM', 'OBD'\]"),
        ({"schedule": "cosine"}, r"schedule='cosine' is not allowed; choose one of \['one_shot', 'linear', 'exponential', 'cubic'\]"),
        ({"scope": "local"}, r"scope='local' is not allowed; choose one of \['global', 'layer'\]"),
        ({"fisher_type": "true"}, r"fisher_type='true' is not allowed; choose one of \['exact', 'mc', 'empirical'\]"),
        ({"parameter_names": ["gamma"]}, r"parameter_names='gamma' is not allowed; choose one of \['weight', 'bias'\]"),
        ({"steps": 3}, r"schedule='one_shot' takes steps=1.*\['linear', 'exponential', 'cubic'\]"),
        ({"schedule": "linear", "steps": 4, "end_epoch": 2}, r"4 steps with fine-tuning in between need 4 epochs"),
        ({"pruning_norm": 2}, r"set structured=True"),
        ({"schedule": "linear", "steps": 2, "at_steps": [5]}, r"at_steps=\[5\] must list one global step per pruning step \(steps=2\)"),
        ({"schedule": "linear", "steps": 2, "at_steps": [5, 3]}, r"at_steps=\[5, 3\] must be non-negative and non-decreasing"),
        ({"schedule": "linear", "steps": 2, "at_steps": [1, 3], "every_n_steps": 2}, r"leave every_n_steps and start_step unset"),
        ({"schedule": "linear", "steps": 2, "start_step": 3}, r"2 steps with fine-tuning in between need every_n_steps or at_steps"),
        ({"schedule": "linear", "steps": 2, "every_n_steps": 0}, r"every_n_steps=0 must be > 0"),
        ({"every_n_steps": 4, "start_epoch": 2}, r"leave start_epoch and end_epoch unset"),
        ({"schedule": "linear", "steps": 2, "every_n_steps": 4, "rewind_to": 1, "start_step": 0}, r"rewind_to=1 must be between 0 and the first pruning step's step, 0"),
        ({"rewind_to": 3, "start_epoch": 1}, r"rewind_to=3 must be between 0 and the first pruning step's epoch, 1"),
    ],
)
def test_bad_configs_are_refused_at_construction(arguments, message):
    with pytest.raises(UserInputError, match=message):
        Pruning(**arguments)


def test_unknown_layer_is_refused_before_training_listing_the_layers(tmp_path):
    allowed = r"\['backbone.layers.1', 'backbone.layers.3'\]"
    with pytest.raises(UserInputError, match=rf"layers='backbone.fc' is not allowed; choose one of {allowed}"):
        fit(Pruning(layers=["backbone.fc"]), tmp_path, max_epochs=1)


def test_a_step_that_would_empty_a_layer_is_refused_unless_allowed(tmp_path):
    with pytest.raises(UserInputError, match=r"would prune all of \['backbone.layers.3.weight'\]"):
        fit(Pruning(amount=0.999, layers=["backbone.layers.3"]), tmp_path, max_epochs=1)
