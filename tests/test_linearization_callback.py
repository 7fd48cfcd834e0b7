"""The NTKAlignment callback: logged values against directly computed kernels, its schedules, no
work on skipped steps, modes and gradients left alone, the W&B heatmap, bad options, and the
callback contract (DDP, exact resume with evaluations before and after the resume epoch,
accumulation and clipping, bf16)."""

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import MemoryLogger, run_framework

from callbacks.linearization import (
    EmpiricalNTK,
    NTKAlignment,
    kernel_alignment,
    kernel_heatmap,
    kernel_target_alignment,
    next_scheduled_step,
    scheduled_steps,
)
from framework.errors import UserInputError
from framework.testing import CHECKS, CallbackContract
from framework.testing.contract import tiny_classification_task, tiny_digits
from framework.wandb_offline import find_offline_runs, read_history

EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "ntk_alignment_digits.yaml"
# The contract's digits have 20 training batches per epoch (10 steps with accumulation): every 7
# steps evaluates in both epochs, so before and after the resume at the end of epoch 1.
SMALL_PROBE = partial(NTKAlignment, probe_size=32, schedule="every_k", every_k=7)


class DirectKernel(Callback):
    """Runs after NTKAlignment at each batch start: on the steps it evaluated (its next step
    moved), computes the kernel of the probe independently (Jacobian contraction, total kernel)
    and keeps it by step."""

    def __init__(self, callback: NTKAlignment) -> None:
        self.callback = callback
        self.seen_next_step = callback.next_step
        self.kernels: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.callback.next_step == self.seen_next_step:
            return
        self.seen_next_step = self.callback.next_step
        pl_module.eval()
        self.kernels[trainer.global_step] = EmpiricalNTK(mode="trace", implementation="jacobian")(pl_module, self.callback.probe[0])
        pl_module.train()


def fit(callback: NTKAlignment, tmp_path, extra: tuple[Callback, ...] = (), **trainer_kwargs) -> MemoryLogger:
    """A fit of the contract's tiny task logging in memory and to an offline W&B run under tmp_path."""
    L.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    wandb_logger = WandbLogger(save_dir=tmp_path, offline=True, project="ntk")
    settings = dict(max_epochs=1, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer = L.Trainer(callbacks=[callback, *extra], logger=[logger, wandb_logger], **{**settings, **trainer_kwargs})
    trainer.fit(tiny_classification_task(), datamodule=tiny_digits())
    wandb_logger.experiment.finish()
    return logger


def test_logged_values_equal_those_of_a_directly_computed_kernel_on_the_probe(tmp_path):
    callback = NTKAlignment(probe_size=32, schedule="every_k", every_k=4, num_eigenvalues=3)
    direct = DirectKernel(callback)
    logger = fit(callback, tmp_path, extra=(direct,), limit_train_batches=10)
    logged = {step: metrics for step, metrics in logger.records if "ntk/alignment" in metrics}
    assert list(logged) == list(direct.kernels) == [0, 4, 8]

    inputs, targets = callback.probe
    assert len(inputs) == len(targets) == 32
    assert torch.equal(targets, targets.sort().values), "the probe is sorted by class"
    initial = direct.kernels[0]
    for step, kernel in direct.kernels.items():
        metrics = logged[step]
        assert metrics["ntk/alignment"] == pytest.approx(kernel_target_alignment(kernel, targets).item(), abs=1e-5)
        assert metrics["ntk/kernel_alignment_to_init"] == pytest.approx(kernel_alignment(kernel, initial).item(), abs=1e-5)
        assert metrics["ntk/trace"] == pytest.approx(kernel.trace().item(), rel=1e-5)
        top = torch.linalg.eigvalsh(kernel.double()).flip(0)[:3]
        assert [metrics[f"ntk/eigenvalue_{i}"] for i in (1, 2, 3)] == pytest.approx(top.tolist(), rel=1e-4)
        assert "ntk/eigenvalue_4" not in metrics
        for layer in ("backbone.layers.1", "backbone.layers.3"):
            assert -1.0 <= metrics[f"ntk/alignment/{layer}"] <= 1.0
    assert logged[0]["ntk/kernel_alignment_to_init"] == pytest.approx(1.0)
    assert logged[8]["ntk/kernel_alignment_to_init"] < 1.0, "the kernel moves during training"
    assert torch.equal(callback.initial_kernel, callback.state_dict()["initial_kernel"])

    (run,) = find_offline_runs(tmp_path, finished_within=60)
    images = [row for row in read_history(run) if row.get("ntk/kernel/_type") == "image-file"]
    assert [row["trainer/global_step"] for row in images] == [0, 4, 8]
    assert (images[0]["ntk/kernel/width"], images[0]["ntk/kernel/height"]) == (256, 256), "8 pixels per entry of the 32 x 32 kernel"


@pytest.mark.parametrize(("probe_size", "side"), [(32, 256), (100, 300), (128, 256), (256, 256), (300, 300)])
def test_heatmap_is_at_least_256_pixels_wide_from_white_to_dark_blue(probe_size, side):
    kernel = torch.arange(probe_size**2, dtype=torch.float32).reshape(probe_size, probe_size)
    image = kernel_heatmap(kernel)
    assert image.shape == (side, side, 3) and image.dtype.name == "uint8"
    assert image[0, 0].tolist() == [255, 255, 255] and image[-1, -1].tolist() == [8, 48, 107]
    pixels = side // probe_size
    assert (image[:pixels, :pixels] == image[0, 0]).all() and not (image[:, pixels] == image[0, 0]).all()


def test_schedules_give_the_expected_steps():
    assert scheduled_steps("every_k", 10, every_k=3) == [0, 3, 6, 9]
    assert scheduled_steps("every_k", 9, every_k=3) == [0, 3, 6, 9]
    assert scheduled_steps("every_k", 4, every_k=1) == [0, 1, 2, 3, 4]
    # 5 * floor(1.15^i): i = 0..4 -> 5, 5..7 -> 10, 8..9 -> 15, 10..11 -> 20, then 25 ... 50, 60, 70.
    assert scheduled_steps("log_spaced", 70) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70]
    assert scheduled_steps("log_spaced", 30, log_base=1, log_growth=2.0) == [0, 1, 2, 4, 8, 16]
    # A step that is not scheduled (e.g. a run resumed without the callback) goes to the next one.
    assert next_scheduled_step("every_k", 5, every_k=3) == 6
    assert next_scheduled_step("log_spaced", 52) == 60


def test_default_schedule_starts_later_to_keep_the_overhead_within_budget():
    """40 * floor(1.15^i): every 40 steps up to 400, then sparser; 3 evaluations in the digits
    experiment's 120 steps and 13 in 600 (docs/benchmarks.md, NTK alignment callback)."""
    defaults = NTKAlignment()
    options = {"every_k": defaults.every_k, "log_base": defaults.log_base, "log_growth": defaults.log_growth}
    steps = partial(scheduled_steps, defaults.schedule, **options)
    assert steps(119) == [0, 40, 80]
    assert steps(599) == [0, 40, 80, 120, 160, 200, 240, 280, 320, 360, 400, 480, 560]


@pytest.mark.parametrize(
    ("options", "expected_steps"),
    [
        ({"schedule": "every_k", "every_k": 4}, [0, 4, 8]),
        ({"schedule": "log_spaced", "log_base": 1, "log_growth": 2.0}, [0, 1, 2, 4, 8]),
    ],
)
def test_no_kernel_is_computed_on_skipped_steps_even_with_accumulation(options, expected_steps, monkeypatch):
    trainer_steps: list[int] = []
    computed_at: list[int] = []
    callback = NTKAlignment(probe_size=16, **options)
    original = EmpiricalNTK.layerwise

    def counting_layerwise(self, model, *args, **kwargs):
        computed_at.append(trainer_steps[-1])
        return original(self, model, *args, **kwargs)

    class StepTracker(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            trainer_steps.append(trainer.global_step)

    monkeypatch.setattr(EmpiricalNTK, "layerwise", counting_layerwise)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        callbacks=[StepTracker(), callback], max_epochs=1, limit_train_batches=20, accumulate_grad_batches=2, accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(tiny_classification_task(), datamodule=tiny_digits())
    assert trainer.global_step == 10
    assert computed_at == expected_steps


class DropoutMLP(L.LightningModule):
    """A small classifier with Dropout (whose mode changes outputs) and a frozen-in-eval block."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.hidden(x)))


def test_modes_and_gradients_are_left_as_they_were():
    torch.manual_seed(0)
    model = DropoutMLP().train()
    model.head.eval()
    gradients = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = gradients[name].clone()
    loader = DataLoader(TensorDataset(torch.randn(20, 6), torch.arange(20) % 3), batch_size=5)
    trainer = SimpleNamespace(global_step=0, train_dataloader=loader, loggers=[], is_global_zero=True)
    callback = NTKAlignment(probe_size=12, schedule="every_k", every_k=2)

    callback.on_train_batch_start(trainer, model, None, 0)

    assert callback.initial_kernel is not None, "the kernel was computed"
    assert {name: m.training for name, m in model.named_modules()} == {
        "": True, "hidden": True, "dropout": True, "head": False, "head.0": False, "head.1": False
    }
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, gradients[name]), name
    model.eval()
    expected = EmpiricalNTK(mode="trace", implementation="jacobian")(model, callback.probe[0])
    torch.testing.assert_close(callback.initial_kernel, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"schedule": "cosine"}, r"schedule='cosine' is not allowed; choose one of \['every_k', 'log_spaced'\]"),
        ({"every_k": 0}, r"every_k=0 must be > 0"),
        ({"log_base": 0}, r"log_base=0 must be > 0"),
        ({"log_growth": 1.0}, r"log_growth=1.0 must be > 1"),
        ({"probe_size": 0}, r"probe_size=0 must be > 0"),
        ({"num_eigenvalues": -1}, r"num_eigenvalues=-1 must be >= 0"),
        ({"probe_size": 4, "num_eigenvalues": 5}, r"num_eigenvalues=5 exceeds probe_size=4"),
        ({"trace_reduction": "max"}, r"trace_reduction='max' is not allowed; choose one of \['mean', 'sum'\]"),
        ({"implementation": "fast"}, r"implementation='fast' is not allowed; choose one of \['auto', 'jacobian', 'ntk_vector', 'structured'\]"),
        ({"chunk_size": 0}, r"chunk_size=0 must be > 0"),
    ],
)
def test_bad_options_are_refused_at_construction(arguments, message):
    with pytest.raises(UserInputError, match=message):
        NTKAlignment(**arguments)


def test_a_probe_larger_than_the_training_set_is_refused(tmp_path):
    with pytest.raises(UserInputError, match=r"probe_size=5000 exceeds the \d+ training examples"):
        fit(NTKAlignment(probe_size=5000, num_eigenvalues=1), tmp_path, limit_train_batches=1)


@pytest.mark.parametrize("check", CHECKS)
def test_ntk_alignment_passes_the_callback_contract(check, tmp_path):
    CallbackContract(SMALL_PROBE, max_epochs=2, resume_epoch=1).check(check, tmp_path)


def test_the_digits_experiment_runs_from_the_command_line_and_logs_the_alignment(tmp_path):
    shortened = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "1"]
    run_framework(tmp_path, "fit", "--config", str(EXPERIMENT), *shortened)
    (run,) = find_offline_runs(tmp_path / "logs" / "wandb", finished_within=60)
    rows = [row for row in read_history(run) if "ntk/alignment" in row]
    assert [row["trainer/global_step"] for row in rows] == [0, 5]
    for layer in ("backbone.features.0", "backbone.features.3", "backbone.classifier"):
        assert f"ntk/alignment/{layer}" in rows[0]
    assert "ntk/eigenvalue_5" in rows[0] and rows[0]["ntk/kernel_alignment_to_init"] == pytest.approx(1.0)
