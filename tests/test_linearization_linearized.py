"""Linearised and alpha-scaled twins: the Taylor expansion, its training, and its buffers."""

import copy

import pytest
import torch
from test_linearization_ntk import _mixed_net
from torch import nn

from callbacks.linearization import AlphaScaledModel, LinearizedModel, alpha_scaled_learning_rate
from framework.errors import UserInputError
from framework.models import MLP
from framework.testing.reference import per_example_jacobians

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def _smooth_mlp_and_inputs() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MLP(5, 3, hidden=(6, 4), activation="tanh").double(), torch.randn(8, 5, dtype=torch.float64)


def _move(model: nn.Module, direction: dict[str, torch.Tensor], scale: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(scale * direction[name])


def test_linearized_model_equals_the_model_at_w0_and_is_second_order_close_nearby():
    model, inputs = _smooth_mlp_and_inputs()
    linearized = LinearizedModel(model)
    torch.testing.assert_close(linearized(inputs), model(inputs))
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}

    def gap(scale: float) -> float:
        moved, moved_linearized = MLP(5, 3, hidden=(6, 4), activation="tanh").double(), LinearizedModel(model)
        moved.load_state_dict(model.state_dict())
        _move(moved, direction, scale)
        _move(moved_linearized.model, direction, scale)
        return (moved_linearized(inputs) - moved(inputs)).norm().item()

    for scale in (0.1, 0.05):
        assert 3 <= gap(scale) / gap(scale / 2) <= 5


def test_one_sgd_step_changes_the_outputs_by_the_jacobian_times_the_step():
    model, inputs = _smooth_mlp_and_inputs()
    linearized = LinearizedModel(model)
    before = linearized(inputs).detach()
    optimizer = torch.optim.SGD(linearized.parameters(), lr=0.3)
    linearized(inputs).pow(2).sum().backward()
    optimizer.step()
    step = torch.cat([(p - model.get_parameter(name)).detach().reshape(-1) for name, p in linearized.model.named_parameters()])
    assert step.norm() > 0.1
    expected = before + torch.einsum("nop,p->no", per_example_jacobians(model, inputs), step)
    torch.testing.assert_close(linearized(inputs), expected)


def test_only_the_copy_of_the_parameters_trains_and_the_original_model_is_untouched():
    model, inputs = _smooth_mlp_and_inputs()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    linearized = LinearizedModel(model)
    trainable = [p for p in linearized.parameters() if p.requires_grad]
    assert len(trainable) == len(original) and all(a is b for a, b in zip(trainable, linearized.model.parameters()))
    optimizer = torch.optim.Adam(linearized.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        linearized(inputs).pow(2).sum().backward()
        optimizer.step()
    assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())
    assert all(torch.equal(p, original[name]) for name, p in linearized.initial.named_parameters())
    assert not torch.equal(linearized.model.layers[1].weight, original["layers.1.weight"])


def test_initial_buffers_stay_and_training_mode_uses_batch_statistics_in_both_terms():
    torch.manual_seed(0)
    model = _mixed_net()
    inputs = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    eval_outputs = model(inputs)
    train_outputs = copy.deepcopy(model).train()(inputs)
    linearized, scaled = LinearizedModel(model).train(), AlphaScaledModel(model, alpha=4.0).train()
    torch.testing.assert_close(linearized(inputs), train_outputs)
    torch.testing.assert_close(scaled(inputs), torch.zeros_like(train_outputs))
    for twin in (linearized, scaled):
        assert torch.equal(twin.initial.norm.running_mean, model.norm.running_mean)
        assert torch.equal(twin.initial.norm.running_var, model.norm.running_var)
    torch.testing.assert_close(linearized.eval()(inputs), eval_outputs)


def test_alpha_scaled_model_is_zero_at_init_then_alpha_times_the_change():
    model, inputs = _smooth_mlp_and_inputs()
    scaled = AlphaScaledModel(model, alpha=10.0)
    torch.testing.assert_close(scaled(inputs), torch.zeros(8, 3, dtype=torch.float64))
    optimizer = torch.optim.SGD(scaled.parameters(), lr=alpha_scaled_learning_rate(0.5, 10.0))
    (scaled(inputs) - 1.0).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        expected = 10.0 * (scaled.model(inputs) - model(inputs))
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(scaled(inputs), expected)


def test_alpha_scaled_learning_rate_divides_by_alpha_squared_and_checks_its_inputs():
    assert alpha_scaled_learning_rate(0.1, 10.0) == pytest.approx(1e-3)
    with pytest.raises(UserInputError, match="alpha=0"):
        alpha_scaled_learning_rate(0.1, 0)
    with pytest.raises(UserInputError, match="alpha=-1"):
        AlphaScaledModel(nn.Linear(2, 2), alpha=-1)
