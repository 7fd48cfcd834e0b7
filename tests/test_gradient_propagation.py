"""Gradient propagation in recurrent networks: ||dL/dh_t|| against a manual unroll and against
the closed form of linear RNNs, the spectrum and non-normality measures, and the
GradientPropagation callback (logged values, the W&B plot, table and histograms read back from
the offline run, modes/gradients/BN statistics left alone, bad uses refused, the callback
contract)."""

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from helpers import MemoryLogger, run_framework

from callbacks.gradient_propagation import GATES, GradientPropagation, henrici_departure, hidden_state_gradient_norms, recurrent_matrices, spectrum_summary
from framework.data import DigitsDataModule
from framework.errors import UserInputError
from framework.models.rnn_base import PlainLSTM, PlainRNN
from framework.models.rnn_batchnorm import BNLSTM
from framework.models.rnn_memory import RelevancyMemoryRNN
from framework.models.rnn_nonnormal import NNRNN, OrthogonalRNN
from framework.tasks import SequenceTask
from framework.testing import CHECKS, CallbackContract
from framework.testing.contract import tiny_classification_task
from framework.wandb_offline import find_offline_runs, metric_series, read_history

EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "copy_nnrnn_gradient_propagation.yaml"


def manual_gradient_norms(model, x, y, mask) -> torch.Tensor:
    """||dL/dh_t|| by unrolling the model's steps by hand and retaining each h_t's gradient."""
    inputs, weight = model.input_terms(x), model.recurrent_weight()
    state = model.initial_state(x.shape[0], inputs)
    hidden = []
    for t in range(x.shape[1]):
        state = model.step(inputs[:, t], state, t, weight)
        state[0].retain_grad()
        hidden.append(state[0])
    outputs = model.readout(torch.stack(hidden, dim=1))
    torch.nn.functional.cross_entropy(outputs[mask], y[mask]).backward()
    return torch.stack([h.grad.norm() for h in hidden])


@pytest.mark.parametrize("factory", [partial(PlainLSTM, 3, 6, 4), partial(RelevancyMemoryRNN, 3, 6, 4, window=2, relevant_slots=2), partial(NNRNN, 3, 6, 4)], ids=["lstm", "memory_rnn", "nnrnn"])
def test_gradient_norms_equal_those_of_a_manual_unroll(factory):
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(5, 12, 3, dtype=torch.float64)
    y = torch.randint(4, (5, 12))
    mask = torch.rand(5, 12) < 0.5
    norms = hidden_state_gradient_norms(model, x, y, mask)
    assert all(p.grad is None for p in model.parameters())  # parameters' gradients left alone
    torch.testing.assert_close(norms, manual_gradient_norms(model, x, y, mask), rtol=1e-10, atol=0)
    assert norms.shape == (12,) and (norms > 0).all()


def linear_rnn_norms(model, length: int = 30) -> torch.Tensor:
    """Norms for a loss on the last step only (regression): dL/dh_t = (W^T)^(L-t) dL/dh_L."""
    x = torch.randn(4, length, 2, dtype=torch.float64)
    y = torch.randn(4, length, dtype=torch.float64)
    mask = torch.zeros(4, length, dtype=torch.bool)
    mask[:, -1] = True
    return hidden_state_gradient_norms(model, x, y, mask, loss="mse")


def test_orthogonal_linear_rnn_carries_the_gradient_back_undiminished():
    torch.manual_seed(0)
    norms = linear_rnn_norms(OrthogonalRNN(2, 8, 1, activation="identity").double())
    torch.testing.assert_close(norms, norms[-1].expand_as(norms), rtol=1e-10, atol=0)


def test_scaled_orthogonal_linear_rnn_shrinks_the_gradient_geometrically():
    torch.manual_seed(0)
    model = NNRNN(2, 8, 1, activation="identity").double()
    with torch.no_grad():
        model.alphas.fill_(0.8)  # W = 0.8 x orthogonal: each step back multiplies the norm by 0.8
    norms = linear_rnn_norms(model)
    expected = norms[-1] * 0.8 ** torch.arange(29, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(norms, expected, rtol=1e-9, atol=0)


def test_spectrum_of_a_jordan_block_and_of_an_orthogonal_matrix():
    jordan = torch.tensor([[1.0, 3.0], [0.0, 1.0]], dtype=torch.float64)
    scalars, moduli, singular = spectrum_summary(jordan)
    assert scalars["henrici"] == pytest.approx(3.0, abs=1e-6)  # sqrt(11 - 2)
    assert scalars["henrici_relative"] == pytest.approx(3.0 / math.sqrt(11.0), abs=1e-6)
    assert scalars["spectral_radius"] == pytest.approx(1.0, abs=1e-6)
    assert scalars["commutator"] == pytest.approx(torch.linalg.norm(jordan @ jordan.T - jordan.T @ jordan).item())
    torch.testing.assert_close(singular, torch.linalg.svdvals(jordan))
    assert singular[0] * singular[1] == pytest.approx(1.0)  # |det| = 1
    assert scalars["max_singular_value"] == pytest.approx((3 + math.sqrt(13)) / 2)
    assert torch.equal(moduli, moduli.sort(descending=True).values)

    orthogonal = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    scalars, moduli, singular = spectrum_summary(orthogonal)
    assert scalars["henrici"] < 1e-6 and scalars["commutator"] < 1e-10
    torch.testing.assert_close(moduli, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(singular, torch.ones(6, dtype=torch.float64))
    symmetric = torch.randn(5, 5, dtype=torch.float64)
    assert henrici_departure(symmetric + symmetric.T) < 1e-6


def test_nnrnn_spectrum_follows_alpha_and_its_non_normality_follows_t():
    torch.manual_seed(0)
    model = NNRNN(2, 8, 1)
    with torch.no_grad():
        model.alphas.copy_(torch.tensor([0.5, 0.9, 1.3, 1.0]))
    (matrix,) = recurrent_matrices(model).values()
    scalars, moduli, _ = spectrum_summary(matrix)
    torch.testing.assert_close(moduli, torch.tensor([1.3, 1.3, 1.0, 1.0, 0.9, 0.9, 0.5, 0.5], dtype=torch.float64), atol=1e-5, rtol=0)
    assert scalars["henrici"] < 1e-5  # T = 0: W is normal
    with torch.no_grad():
        model.upper.normal_()
        upper = (model.upper * model.upper_mask).double()
    scalars, _, _ = spectrum_summary(recurrent_matrices(model)["W"])
    assert scalars["henrici"] == pytest.approx(upper.norm().item(), rel=1e-5)  # P orthogonal: ||T||_F exactly


def test_lstm_recurrent_matrix_is_split_into_its_gates():
    model = PlainLSTM(2, 5, 3)
    blocks = recurrent_matrices(model)
    assert list(blocks) == list(GATES)
    torch.testing.assert_close(torch.cat(list(blocks.values())), model.hidden_to_hidden.weight.double())


def sequence_task(backbone: str = "rnn") -> SequenceTask:
    """A tiny recurrent classifier of sequential digits (64 steps, 1 channel), plain SGD."""
    models = {"rnn": partial(PlainRNN, 1, 8, 10), "nnrnn": partial(NNRNN, 1, 8, 10), "bnlstm": partial(BNLSTM, 1, 8, 10, max_steps=64)}
    return SequenceTask(models[backbone](), optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9))


def sequential_digits() -> DigitsDataModule:
    """5 training batches per epoch."""
    return DigitsDataModule(format="sequence", batch_size=256, seed=0)


def fit(callback: GradientPropagation, tmp_path, backbone: str = "rnn", **trainer_kwargs) -> tuple[MemoryLogger, SequenceTask]:
    L.seed_everything(0, verbose=False)
    memory = MemoryLogger()
    wandb_logger = WandbLogger(save_dir=tmp_path, offline=True, project="gradient_propagation")
    settings = dict(max_epochs=1, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1)
    trainer = L.Trainer(callbacks=[callback], logger=[memory, wandb_logger], **{**settings, **trainer_kwargs})
    task = sequence_task(backbone)
    trainer.fit(task, datamodule=sequential_digits())
    wandb_logger.experiment.finish()
    return memory, task


def test_logged_values_are_those_of_the_probe_and_the_wandb_run_holds_plot_table_and_histograms(tmp_path):
    callback = GradientPropagation(probe_size=32, schedule="every_k", every_k=2)
    memory, task = fit(callback, tmp_path, backbone="nnrnn")
    logged = {step: metrics for step, metrics in memory.records if "gradient_propagation/grad_norm_first" in metrics}
    assert list(logged) == [0, 2, 4]
    # Step 0 measures the initial weights: rebuild them with the same seed.
    L.seed_everything(0, verbose=False)
    fresh = sequence_task("nnrnn").backbone.eval()
    x, y, mask = callback.probe
    assert x.shape == (32, 64, 1) and mask[:, -1].all() and not mask[:, :-1].any()
    norms = hidden_state_gradient_norms(fresh, x, y, mask)
    first = logged[0]
    assert first["gradient_propagation/grad_norm_first"] == pytest.approx(norms[0].item(), rel=1e-6)
    assert first["gradient_propagation/grad_norm_last"] == pytest.approx(norms[-1].item(), rel=1e-6)
    assert first["gradient_propagation/grad_norm_log10_ratio"] == pytest.approx(math.log10(norms[0].item() / norms[-1].item()), rel=1e-6)
    scalars, moduli, singular = spectrum_summary(recurrent_matrices(fresh)["W"])
    for key, value in scalars.items():
        assert first[f"gradient_propagation/recurrent/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9)
    assert first["gradient_propagation/recurrent/spectral_radius"] == pytest.approx(1.0, abs=1e-5)  # alpha = 1 at init
    assert logged[4]["gradient_propagation/recurrent/henrici"] > 0  # T learned: W became non-normal

    (run,) = find_offline_runs(tmp_path / "wandb", finished_within=60)
    history = read_history(run)
    assert metric_series(history, "gradient_propagation/grad_norm_first") == [(s, logged[s]["gradient_propagation/grad_norm_first"]) for s in (0, 2, 4)]
    plots = [row for row in history if "gradient_propagation/hidden_grad_norm_table/path" in row]
    assert [row["trainer/global_step"] for row in plots] == [0, 2, 4]
    table = json.loads((run.parent / "files" / plots[0]["gradient_propagation/hidden_grad_norm_table/path"]).read_text())
    assert table["columns"] == ["t", "grad_norm"]
    assert [row[0] for row in table["data"]] == list(range(1, 65))
    torch.testing.assert_close(torch.tensor([row[1] for row in table["data"]], dtype=torch.float64), norms, rtol=1e-6, atol=0)
    histogram = plots[0]["gradient_propagation/recurrent/eigenvalue_moduli/values"]
    assert sum(histogram) == 8  # one count per eigenvalue
    singular_histogram = plots[0]["gradient_propagation/recurrent/singular_values/bins"]
    assert singular_histogram[0] == pytest.approx(singular[-1].item(), rel=1e-5) and singular_histogram[-1] == pytest.approx(singular[0].item(), rel=1e-5)


class BeforeSnapshot(L.Callback):
    """Runs just before GradientPropagation at every batch start: keeps the weights (BN
    population statistics included), modes and gradients."""

    def __init__(self) -> None:
        self.snapshot = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.snapshot = (
            {k: v.clone() for k, v in pl_module.state_dict().items()},
            {name: m.training for name, m in pl_module.named_modules()},
            [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
        )


class UnchangedGuard(L.Callback):
    """Runs just after GradientPropagation at every batch start: all is as ``before`` saw it."""

    def __init__(self, before: BeforeSnapshot) -> None:
        self.before = before
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        weights, modes, grads = self.before.snapshot
        assert all(torch.equal(v, pl_module.state_dict()[k]) for k, v in weights.items())
        assert modes == {name: m.training for name, m in pl_module.named_modules()}
        assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for p, g in zip(pl_module.parameters(), grads))
        self.checked += 1


def test_weights_bn_statistics_modes_and_gradients_are_left_alone(tmp_path):
    before = BeforeSnapshot()
    guard = UnchangedGuard(before)
    callback = GradientPropagation(probe_size=16, schedule="every_k", every_k=1)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        callbacks=[before, callback, guard], max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(sequence_task("bnlstm"), datamodule=sequential_digits())
    assert guard.checked == 3 and callback.next_step == 3


def test_a_non_recurrent_task_is_refused(tmp_path):
    trainer = L.Trainer(callbacks=[GradientPropagation()], max_epochs=1, logger=False, accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(UserInputError, match="needs a SequenceTask with a RecurrentNetwork backbone"):
        trainer.fit(tiny_classification_task(), datamodule=DigitsDataModule())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"probe_size": 0}, "probe_size=0"),
        ({"schedule": "weekly"}, "schedule='weekly'"),
        ({"log_growth": 1.0}, "log_growth=1.0"),
        ({"every_k": -1}, "every_k=-1"),
    ],
)
def test_bad_options_are_refused(arguments, message):
    with pytest.raises(UserInputError, match=message):
        GradientPropagation(**arguments)


@pytest.mark.parametrize("check", CHECKS)
def test_gradient_propagation_passes_the_callback_contract(check, tmp_path):
    contract = CallbackContract(
        partial(GradientPropagation, probe_size=16, schedule="every_k", every_k=2),
        task_factory=partial(sequence_task, "nnrnn"),
        datamodule_factory=sequential_digits,
        max_epochs=2,
        resume_epoch=1,
    )
    contract.check(check, tmp_path)


@pytest.mark.slow
def test_the_copy_experiment_logs_gradient_propagation_from_the_command_line(tmp_path):
    # 768 sequences = 6 steps of 128: the log-spaced schedule evaluates at steps 0 and 5.
    sizes = ["--data.init_args.train_size", "768", "--data.init_args.val_size", "64", "--data.init_args.test_size", "64"]
    run_framework(tmp_path, "fit", "--config", str(EXPERIMENT), "--trainer.max_epochs", "1", *sizes)
    (run,) = find_offline_runs(tmp_path / "logs" / "wandb", finished_within=60)
    history = read_history(run)
    steps = [step for step, _ in metric_series(history, "gradient_propagation/grad_norm_first")]
    assert steps[:2] == [0, 5]
    assert any("gradient_propagation/recurrent/henrici" in row for row in history)
