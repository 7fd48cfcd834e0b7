"""The EKFAC/KFAC optimiser: SGD under identity curvature, the functional core's damped solves,
refusals, eigendecomposition failures, a plain training loop, adaptive (Levenberg-Marquardt)
damping, bf16 statistics, eigendecompositions spread over DDP ranks, the callback's W&B logs read
back, and the callback contract (with adaptive damping and spread eigendecompositions on)."""

import copy
from collections import OrderedDict
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import wandb
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from callbacks.curvature import CurvatureError, EKFACStatistics, FisherStatistics, PVector, fisher
from callbacks.curvature.blocks import EigenBlock
from callbacks.curvature.capture import CapturedBatch
from callbacks.curvature.layers import PATCH_ORDER, channel_major_index
from callbacks.curvature.optimizer import EKFAC
from framework.data import DigitsDataModule
from framework.errors import UserInputError
from framework.models import MLP
from framework.tasks import ClassificationTask
from framework.testing import CHECKS, CallbackContract, fresh_main_port
from framework.wandb_offline import find_offline_runs, read_history


def identity_curvature_batch(size: int = 4) -> CapturedBatch:
    """Statistics of a bias-free (size x size) Linear layer named "" whose factors A, G and
    per-example-gradient scaling are all exactly the identity / ones: one example per (i, j)
    with input 2 e_j and output gradient 2 e_i."""
    eye = torch.eye(size)
    inputs = 2 * eye.repeat(size, 1)[:, None, :]
    gradients = 2 * eye.repeat_interleave(size, dim=0)[:, None, :]
    return CapturedBatch(size * size, {"": inputs}, {"": gradients[None]})


@pytest.mark.parametrize("scale_every", [1, None], ids=["ekfac", "kfac"])
def test_identity_curvature_is_sgd_exactly(scale_every):
    torch.manual_seed(0)
    model, reference = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    reference.load_state_dict(model.state_dict())
    # (I + 1 * I)^-1 halves the direction, so EKFAC at lr 0.2 is SGD at lr 0.1, bit for bit.
    optimizer = EKFAC(
        model.parameters(), lr=0.2, damping=1.0, momentum=0.9, weight_decay=0.01, decay=0.5, eigen_every=2, scale_every=scale_every
    )
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    FisherStatistics(model, optimizer)
    for _ in range(5):
        gradient = torch.randn(4, 4)
        model.weight.grad, reference.weight.grad = gradient.clone(), gradient.clone()
        optimizer.add_statistics(identity_curvature_batch())
        optimizer.step()
        sgd.step()
        assert torch.equal(model.weight, reference.weight)


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
@pytest.mark.parametrize(("representation", "scale_every"), [("ekfac", 1), ("kfac", None)])
def test_step_equals_damped_solve_of_the_functional_core(representation, scale_every, fisher_type):
    torch.manual_seed(0)
    model = conv_net()
    lr, damping = 0.5, 0.1
    optimizer = EKFAC(model.parameters(), lr=lr, damping=damping, momentum=0.0, decay=0.0, eigen_every=1, scale_every=scale_every)
    statistics = FisherStatistics(model, optimizer, fisher_type=fisher_type)
    for _ in range(2):
        inputs, targets = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
        curvature = fisher(model, [(inputs, targets)], representation=representation, fisher_type=fisher_type)
        optimizer.zero_grad()
        with statistics.record(targets):
            logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        gradient = PVector.from_model_grads(curvature.layout).flatten()
        damped = curvature.to_dense() + damping * torch.eye(len(gradient), dtype=torch.float64)
        expected = PVector.from_model(curvature.layout).flatten() - lr * torch.linalg.solve(damped, gradient)
        optimizer.step()
        torch.testing.assert_close(PVector.from_model(curvature.layout).flatten(), expected, rtol=1e-10, atol=1e-12)


def test_accumulated_step_uses_the_statistics_of_every_micro_batch():
    torch.manual_seed(0)
    model = conv_net()
    optimizer = EKFAC(model.parameters(), lr=0.5, damping=0.1, momentum=0.0, decay=0.0)
    statistics = FisherStatistics(model, optimizer, fisher_type="empirical")
    halves = [(torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(2)]
    curvature = fisher(model, halves, representation="ekfac", fisher_type="empirical")
    for inputs, targets in halves:
        with statistics.record(targets):
            logits = model(inputs)
        (F.cross_entropy(logits, targets) / 2).backward()
    expected = PVector.from_model(curvature.layout) - 0.5 * curvature.solve(PVector.from_model_grads(curvature.layout), 0.1)
    optimizer.step()
    torch.testing.assert_close(PVector.from_model(curvature.layout).flatten(), expected.flatten(), rtol=1e-10, atol=1e-12)


def test_a_checkpoint_with_channel_major_conv_statistics_is_reindexed_on_loading():
    """A state saved before Conv2d patches were ordered kernel-major (no ``patch_order``, the
    conv layer's input factor and basis in F.unfold's channel-major order) loads as the state the
    current order gives, so a resumed run preconditions as the saved one did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 2)).double()
    optimizer = EKFAC(model.parameters(), lr=0.1, damping=0.1, eigen_every=1, scale_every=1)
    statistics = FisherStatistics(model, optimizer)
    inputs, targets = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    with statistics.record(targets):
        loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
    current = optimizer.state_dict()
    assert current["counters"]["patch_order"] == PATCH_ORDER

    old = copy.deepcopy(current)
    del old["counters"]["patch_order"]
    conv_state = old["state"][0]  # the conv layer's statistics live on its weight, parameter 0
    to_channel_major = torch.argsort(channel_major_index(2, (3, 3), has_bias=True))
    conv_state["input_factor"] = conv_state["input_factor"][to_channel_major][:, to_channel_major]
    conv_state["input_basis"] = conv_state["input_basis"][to_channel_major]
    assert not torch.equal(conv_state["input_factor"], current["state"][0]["input_factor"])

    resumed = EKFAC(model.parameters(), lr=0.1, damping=0.1, eigen_every=1, scale_every=1)
    resumed.load_state_dict(old)
    reloaded = resumed.state_dict()
    for index, state in current["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(reloaded["state"][index][key], value), (index, key)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"damping": 0.0}, "damping=0.0 must be > 0"),
        ({"damping": -1e-3}, "damping"),
        ({"stats_every": 0}, "stats_every=0 must be an integer >= 1"),
        ({"eigen_every": 0}, "eigen_every"),
        ({"scale_every": 0}, "scale_every"),
        ({"eigen_every": 2.5}, "eigen_every"),
        ({"decay": 1.0}, r"decay=1.0 must be in \[0, 1\)"),
        ({"decay": -0.1}, "decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr": 0.0}, "lr"),
        ({"kl_clip": 0.0}, "kl_clip"),
        ({"adapt_damping_every": 0}, "adapt_damping_every=0 must be an integer >= 1"),
        ({"damping_factor": 1.0}, r"damping_factor=1.0 must be in \(0, 1\)"),
        ({"damping": 1e-9, "min_damping": 1e-8}, r"damping=1e-09 must lie in \[min_damping, max_damping\]"),
        ({"damping": 10.0, "max_damping": 1.0}, "max_damping"),
        ({"min_damping": 0.0}, "min_damping > 0"),
    ],
)
def test_bad_hyperparameters_are_refused(setting, message):
    with pytest.raises(UserInputError, match=message):
        EKFAC(nn.Linear(2, 2).parameters(), **setting)


def named_linear() -> nn.Module:
    return nn.Sequential(OrderedDict(fc=nn.Linear(3, 2)))


def test_non_finite_factors_are_refused_naming_layer_and_step():
    model = named_linear()
    optimizer = EKFAC(model.parameters(), lr=0.1)
    statistics = FisherStatistics(model, optimizer)
    for step in range(2):
        with statistics.record():
            outputs = model(torch.randn(4, 3))
        outputs.sum().backward()
        if step == 0:
            optimizer.step()
    overflowed = torch.full((1, 1, 4), float("inf"))  # an input of 'fc' (bias 1 appended) that overflowed
    optimizer.add_statistics(CapturedBatch(1, {"fc": overflowed}, {"fc": torch.ones(1, 1, 1, 2)}))
    with pytest.raises(CurvatureError, match=r"the input factor of layer 'fc' became non-finite at step 1"):
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_model_output_is_refused():
    model = named_linear()
    optimizer = EKFAC(model.parameters(), lr=0.1)
    statistics = FisherStatistics(model, optimizer)
    with pytest.raises(CurvatureError, match="non-finite model output at step 0"):
        with statistics.record():
            model(torch.full((4, 3), float("nan")))


def test_failed_eigendecomposition_is_retried_in_float64_then_refused(monkeypatch):
    model = named_linear()
    optimizer = EKFAC(model.parameters(), lr=0.1)
    statistics = FisherStatistics(model, optimizer)
    eigh, dtypes = torch.linalg.eigh, []

    def eigh_failing_in_float32(matrix: torch.Tensor):
        dtypes.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure to converge")
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_float32)
    with statistics.record():
        outputs = model(torch.randn(4, 3))
    outputs.sum().backward()
    before = model.fc.weight.detach().clone()
    optimizer.step()
    assert dtypes == [torch.float32, torch.float64] * 2
    assert torch.isfinite(model.fc.weight).all() and not torch.equal(model.fc.weight, before)
    assert model.fc.weight.dtype == torch.float32 and optimizer.state[model.fc.weight]["input_basis"].dtype == torch.float32

    def eigh_failing(matrix: torch.Tensor):
        raise torch.linalg.LinAlgError("simulated failure to converge")

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing)
    optimizer.steps = optimizer.eigen_every
    with statistics.record():
        outputs = model(torch.randn(4, 3))
    outputs.sum().backward()
    failure = "input factor of layer 'fc' could not be eigendecomposed at step 20, also in float64"
    with pytest.raises(CurvatureError, match=failure):
        optimizer.step()


def test_step_without_statistics_is_refused():
    model = named_linear()
    with pytest.raises(UserInputError, match="not attached to a model"):
        EKFAC(model.parameters()).step()
    optimizer = EKFAC(model.parameters())
    FisherStatistics(model, optimizer)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(UserInputError, match="no curvature statistics for layer 'fc' at step 0"):
        optimizer.step()


@pytest.mark.parametrize("kl_clip", [1e-6, 1e6])
def test_kl_clipping_scales_the_preconditioned_step(kl_clip):
    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    steps, gradients = [], []
    for clip in (None, kl_clip):
        torch.manual_seed(1)
        model = conv_net()
        optimizer = EKFAC(model.parameters(), lr=0.5, damping=0.1, momentum=0.0, kl_clip=clip)
        statistics = FisherStatistics(model, optimizer, fisher_type="empirical")
        with statistics.record(targets):
            logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        optimizer.step()
        steps.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    unclipped, clipped = steps
    predicted_kl = -0.5 * unclipped @ gradients[0]  # lr^2 v.g with the step -lr v, lr 0.5
    expected_factor = min(1.0, (kl_clip / predicted_kl.item()) ** 0.5)
    assert (expected_factor < 1e-2) == (kl_clip < 1)
    torch.testing.assert_close(clipped, expected_factor * unclipped, rtol=1e-10, atol=1e-14)


def digits_loss(model: nn.Module, loader) -> float:
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in loader) / len(loader.dataset)


@pytest.mark.parametrize("scale_every", [1, None], ids=["ekfac", "kfac"])
def test_plain_loop_training_decreases_the_loss_on_digits(scale_every):
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    loader = data.train_dataloader()
    model = MLP(64, 10, hidden=(32,))
    optimizer = EKFAC(model.parameters(), lr=0.1, damping=0.03, eigen_every=5, scale_every=scale_every, kl_clip=1e-3)
    statistics = FisherStatistics(model, optimizer, seed=0)
    initial = digits_loss(model, loader)
    for _ in range(2):
        for inputs, targets in loader:
            optimizer.zero_grad()
            with statistics.record(targets):
                logits = model(inputs)
            F.cross_entropy(logits, targets).backward()
            optimizer.step()
    final = digits_loss(model, loader)
    # SGD (lr 0.05 or 0.2, momentum 0.9) reaches 0.19 or 0.28 in these 2 epochs.
    assert initial > 2.0 and final < 0.1, (initial, final)
    metrics = optimizer.pop_metrics()
    expected = {"ekfac/damping", "ekfac/kl_clip_factor", "ekfac/preconditioned_to_raw_norm", "ekfac/condition/layers.1"}
    assert expected <= metrics.keys()


def ekfac_task(**settings) -> ClassificationTask:
    """The contract's tiny MLP on digits, trained by EKFAC with adaptive damping and
    eigendecompositions spread over the ranks (under DDP)."""
    hyperparameters = dict(
        lr=0.1, damping=0.03, momentum=0.9, weight_decay=1e-4, eigen_every=3, stats_every=1, scale_every=2, kl_clip=1e-3,
        adapt_damping_every=2, distribute_eigen=True,
    )
    optimizer = partial(EKFAC, **(hyperparameters | settings))
    return ClassificationTask(MLP(64, 10, hidden=(32,)), optimizer=optimizer, no_weight_decay=("*.bias",))


@pytest.mark.parametrize("check", CHECKS)
def test_callback_passes_the_contract(check, tmp_path):
    CallbackContract(EKFACStatistics, task_factory=ekfac_task, max_epochs=2, resume_epoch=1).check(check, tmp_path)


@pytest.mark.slow
def test_callback_logs_the_optimizers_measurements_to_wandb(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="ekfac")
    trainer = L.Trainer(
        callbacks=[EKFACStatistics()], max_steps=3, log_every_n_steps=1, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(ekfac_task(), datamodule=DigitsDataModule(batch_size=64, seed=0))
    optimizer = trainer.optimizers[0]
    spectra = optimizer.spectra()
    logger.experiment.finish()
    wandb.teardown()  # waits for wandb-core to write the whole run file
    history = read_history(find_offline_runs(tmp_path, finished_within=60)[-1])
    # A histogram comes back as nested keys <name>/_type, <name>/bins, <name>/values.
    histogram_parts = ("/_type", "/bins", "/values")
    logged = {
        (row["trainer/global_step"], key.removesuffix(next((p for p in histogram_parts if key.endswith(p)), "")))
        for row in history
        for key in row
        if key.startswith("ekfac/")
    }
    layers = ["backbone.layers.1", "backbone.layers.3"]
    per_step = ["ekfac/damping", "ekfac/kl_clip_factor", "ekfac/preconditioned_to_raw_norm"]
    per_step += [f"ekfac/{kind}/{layer}" for kind in ("condition", "spectrum") for layer in layers]
    # Steps 0, 1, 2 are logged at global steps 1, 2, 3; eigen_every=3 decomposes in step 0 only,
    # adapt_damping_every=2 adapts the damping in steps 0 and 2.
    expected = {(step, key) for step in (1, 2, 3) for key in per_step}
    expected |= {(1, "ekfac/eigen_seconds"), (1, "ekfac/reduction_ratio"), (3, "ekfac/reduction_ratio")}
    assert logged == expected, logged ^ expected
    last = {key: value for row in history if row["trainer/global_step"] == 3 for key, value in row.items()}
    # The damping logged is the one the step used; the step's adaptation then applied the rule.
    ratio, used = last["ekfac/reduction_ratio"], last["ekfac/damping"]
    assert optimizer.damping == pytest.approx(used / 0.75 if ratio < 0.25 else used * 0.75 if ratio > 0.75 else used)
    for layer in layers:
        histogram = {part: last[f"ekfac/spectrum/{layer}/{part}"] for part in ("_type", "bins", "values")}
        values = spectra[layer]
        assert histogram["_type"] == "histogram" and sum(histogram["values"]) == values.numel()
        assert histogram["bins"][0] == pytest.approx(values.min().item()) and histogram["bins"][-1] == pytest.approx(values.max().item())
        scaling = optimizer.state[optimizer.layers[layer].module.weight]["scaling"]
        torch.testing.assert_close(values, torch.log10(scaling + optimizer.damping).flatten())
        condition = (scaling.max() + used) / (scaling.min() + used)
        assert last[f"ekfac/condition/{layer}"] == pytest.approx(condition.item(), rel=1e-6)
    assert 0 < last["ekfac/preconditioned_to_raw_norm"] and 0 < last["ekfac/kl_clip_factor"] <= 1


def test_callback_refuses_a_task_without_ekfac(tmp_path):
    trainer = L.Trainer(
        callbacks=[EKFACStatistics()], max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    task = ClassificationTask(MLP(64, 10, hidden=(8,)))
    with pytest.raises(UserInputError, match=r"needs exactly one EKFAC optimizer in the task, got \['SGD'\]"):
        trainer.fit(task, datamodule=DigitsDataModule(batch_size=64, seed=0))


def quadratic_closure(model: nn.Module, optimizer: EKFAC, statistics: FisherStatistics, inputs, targets):
    """A closure for a regression loss 1/2 ||f(x) - y||^2 averaged over the batch, recording the
    statistics of its forward pass (when the optimiser asks for them)."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with statistics.record(targets):
            outputs = model(inputs)
        loss = 0.5 * (outputs - targets).square().sum(1).mean()
        loss.backward()
        return loss

    return closure


def test_adaptive_damping_predicts_a_quadratic_loss_exactly_and_lowers_the_damping():
    # A Linear layer under a squared loss: the loss is quadratic and its Hessian is exactly the
    # KFAC Fisher I (x) A of the batch, so the quadratic model predicts the change exactly (rho = 1,
    # momentum included) and every adaptation multiplies the damping by damping_factor.
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    inputs, targets = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    optimizer = EKFAC(
        model.parameters(), lr=0.1, damping=0.1, momentum=0.9, decay=0.0, eigen_every=1, scale_every=None,
        adapt_damping_every=1, damping_factor=0.5,
    )
    statistics = FisherStatistics(model, optimizer, fisher_type="exact", task="regression")
    closure = quadratic_closure(model, optimizer, statistics, inputs, targets)
    for step in range(3):
        optimizer.step(closure)
        assert optimizer.pop_metrics()["ekfac/reduction_ratio"] == pytest.approx(1.0, abs=1e-9)
        assert optimizer.damping == pytest.approx(0.1 * 0.5 ** (step + 1), rel=1e-15)
        assert len(optimizer._pending) == 0  # the re-evaluation recorded no statistics


def test_adaptive_damping_raises_the_damping_when_the_loss_rises_more_than_predicted():
    torch.manual_seed(0)
    model = conv_net()
    inputs, targets = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    lr, damping = 1.0, 0.01  # a full natural-gradient step: the model predicts a decrease, the loss rises
    optimizer = EKFAC(model.parameters(), lr=lr, damping=damping, momentum=0.0, decay=0.0, eigen_every=1, adapt_damping_every=1)
    statistics = FisherStatistics(model, optimizer, fisher_type="exact")
    curvature = fisher(model, [(inputs, targets)], representation="ekfac", fisher_type="exact")
    losses = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with statistics.record(targets):
            loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        losses.append(loss.item())
        return loss

    closure()
    gradient = PVector.from_model_grads(curvature.layout).flatten()
    before = PVector.from_model(curvature.layout).flatten()
    optimizer.zero_grad()
    optimizer.step(closure)
    delta = PVector.from_model(curvature.layout).flatten() - before
    predicted = gradient @ delta + 0.5 * delta @ curvature.to_dense() @ delta
    expected_ratio = (losses[-1] - losses[-2]) / predicted.item()
    assert predicted < 0 and losses[-1] > losses[-2] and expected_ratio < 0
    assert optimizer.pop_metrics()["ekfac/reduction_ratio"] == pytest.approx(expected_ratio, rel=1e-9)
    assert optimizer.damping == pytest.approx(damping / 0.75, rel=1e-15)


def test_adaptive_damping_needs_a_closure():
    model = named_linear()
    optimizer = EKFAC(model.parameters(), adapt_damping_every=1)
    statistics = FisherStatistics(model, optimizer)
    with statistics.record():
        model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(UserInputError, match="adapt_damping_every is set, so EKFAC.step needs a closure"):
        optimizer.step()


def test_bf16_statistics_are_kept_in_float32():
    model = named_linear()
    optimizer = EKFAC(model.parameters(), eigen_every=1)
    statistics = FisherStatistics(model, optimizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with statistics.record():
            outputs = model(torch.randn(4, 3))
    assert outputs.dtype == torch.bfloat16
    outputs.float().sum().backward()
    optimizer.step()
    state = optimizer.state[model.fc.weight]
    assert {state[key].dtype for key in ("input_factor", "output_factor", "input_basis", "scaling")} == {torch.float32}


class SpreadEigenCheck(Callback):
    """Counts this rank's eigendecompositions; at the end compares each layer's preconditioner
    (from the broadcast bases) with one computed on this rank from its own factors, and saves the
    curvature state to ``<directory>/rank<r>.pt``."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.calls = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        eigh = optimizer._eigh

        def counted(factor: torch.Tensor):
            self.calls += 1
            return eigh(factor)

        optimizer._eigh = counted

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        worst, curvature, calls = 0.0, {}, self.calls
        for name, layer in optimizer.layers.items():
            state = optimizer.state[layer.module.weight]
            (values_a, q_a), (values_g, q_g) = optimizer._eigendecompose_layer(layer)
            local = EigenBlock(layer, q_g, q_a, torch.outer(values_g, values_a)).inverse(optimizer.damping).to_dense()
            spread = EigenBlock(layer, state["output_basis"], state["input_basis"], state["scaling"]).inverse(optimizer.damping).to_dense()
            worst = max(worst, ((spread - local).abs().max() / local.abs().max()).item())
            curvature[name] = {key: state[key] for key in ("input_basis", "output_basis", "scaling")}
        torch.save({"calls": calls, "worst": worst, "curvature": curvature}, f"{self.directory}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_spread_eigendecompositions_give_every_rank_the_undistributed_preconditioner(tmp_path):
    # KFAC decomposing at every step: at the end the scaling is the product of the eigenvalues.
    task = ekfac_task(eigen_every=1, scale_every=None, adapt_damping_every=None)
    with fresh_main_port():
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=[EKFACStatistics(), SpreadEigenCheck(tmp_path)],
            max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(task, datamodule=DigitsDataModule(batch_size=64, seed=0))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Layer 1 (65x65 and 32x32 factors) is dealt to rank 0, layer 3 (33x33, 10x10) to rank 1:
    # two decompositions per rank and step, not four.
    assert [rank["calls"] for rank in ranks] == [2 * 3, 2 * 3]
    for name, state in ranks[0]["curvature"].items():
        for key, value in state.items():
            assert torch.equal(value, ranks[1]["curvature"][name][key]), (name, key)
    assert max(rank["worst"] for rank in ranks) < 1e-5
