"""The empirical NTK against ``J J^T`` from brute-force torch.func Jacobians, in float64."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.linearization import EmpiricalNTK, parameter_groups
from callbacks.linearization.ntk import (
    SYMMETRIC_GRAM_LEAF,
    _block_through_positions,
    _contract_jacobians,
    _layer_gradients,
    _LayerFactors,
    _symmetric_gram,
)
from framework.errors import UserInputError
from framework.models import MLP, SmallCNN
from framework.testing.reference import empirical_ntk as reference_ntk
from framework.testing.reference import per_example_jacobians

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

IMPLEMENTATIONS = ["jacobian", "ntk_vector", "structured", "auto"]


class MixedNet(nn.Module):
    """Layers the structured path factorises (a padded conv, a rectangular conv, a Linear called
    twice) next to ones it hands to Jacobian contraction (BatchNorm, a grouped conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.wide = nn.Conv2d(4, 8, kernel_size=(3, 2))
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.grouped(F.relu(self.norm(self.conv(x)))))  # (n, 4, 3, 3)
        h = F.relu(self.wide(h)).mean(dim=(2, 3))
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


def _mixed_net() -> MixedNet:
    model = MixedNet().double()
    with torch.no_grad():  # running statistics and affine parameters away from their defaults
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _model_and_inputs(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(6, 3, hidden=(8, 7)).double(), torch.randn(7, 6, dtype=torch.float64)
    if name == "cnn":
        return SmallCNN(1, 3, channels=(3, 4)).double(), torch.randn(7, 1, 8, 8, dtype=torch.float64)
    return _mixed_net(), torch.randn(7, 1, 8, 8, dtype=torch.float64)


def _as_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """A full (N, N, O, O) kernel as the (N O, N O) Gram matrix of all Jacobian rows."""
    n, _, o, _ = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(n * o, n * o)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "mixed"])
def test_kernel_equals_jacobian_products_in_every_mode(model_name, implementation):
    model, inputs = _model_and_inputs(model_name)
    expected = reference_ntk(model, inputs)
    expected_diagonal = torch.diagonal(expected, dim1=2, dim2=3)
    # chunk_size=3 on 7 examples: uneven chunks, and blocks below the diagonal mirrored
    kernel = lambda **options: EmpiricalNTK(implementation=implementation, chunk_size=3, **options)(model, inputs)
    torch.testing.assert_close(kernel(), expected)
    torch.testing.assert_close(kernel(mode="diagonal"), expected_diagonal)
    torch.testing.assert_close(kernel(mode="trace"), expected_diagonal.mean(-1))
    torch.testing.assert_close(kernel(mode="trace", trace_reduction="sum"), expected_diagonal.sum(-1))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "mixed"])
def test_cross_kernel_equals_jacobian_products(model_name, implementation):
    model, inputs = _model_and_inputs(model_name)
    inputs_1, inputs_2 = inputs, torch.randn_like(inputs[:4])
    expected = reference_ntk(model, inputs_1, inputs_2)
    kernel = lambda **options: EmpiricalNTK(implementation=implementation, chunk_size=3, **options)(model, inputs_1, inputs_2)
    torch.testing.assert_close(kernel(), expected)
    torch.testing.assert_close(kernel(mode="diagonal"), torch.diagonal(expected, dim1=2, dim2=3))


@pytest.mark.parametrize("implementation", ["jacobian", "structured"])
def test_features_beyond_the_cache_budget_are_recomputed(monkeypatch, implementation):
    model, inputs = _model_and_inputs("mixed")
    monkeypatch.setattr("callbacks.linearization.ntk.FEATURE_CACHE_BYTES", 0)
    torch.testing.assert_close(EmpiricalNTK(implementation=implementation, chunk_size=2)(model, inputs), reference_ntk(model, inputs))


@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vector", "structured"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "mixed"])
def test_layer_kernels_are_their_parameters_kernels_sum_to_the_total_and_are_psd(model_name, implementation):
    model, inputs = _model_and_inputs(model_name)
    jacobians = per_example_jacobians(model, inputs)
    kernels = EmpiricalNTK(implementation=implementation, chunk_size=4).layerwise(model, inputs)
    groups = parameter_groups(model)
    assert list(kernels) == list(groups)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    start = 0
    for group, names in groups.items():
        stop = start + sum(sizes[name] for name in names)
        layer_jacobians = jacobians[:, :, start:stop]
        torch.testing.assert_close(kernels[group], torch.einsum("iap,jbp->ijab", layer_jacobians, layer_jacobians))
        matrix = _as_matrix(kernels[group])
        torch.testing.assert_close(matrix, matrix.T)
        eigenvalues = torch.linalg.eigvalsh(matrix)
        assert eigenvalues.min() >= -1e-10 * eigenvalues.max()
        start = stop
    torch.testing.assert_close(sum(kernels.values()), EmpiricalNTK()(model, inputs))


def test_layer_names_are_the_modules_owning_parameters():
    model, _ = _model_and_inputs("mixed")
    assert list(parameter_groups(model)) == ["conv", "norm", "grouped", "wide", "shared", "head"]
    assert parameter_groups(nn.Linear(2, 2)) == {"(root)": ["weight", "bias"]}
    model.norm.requires_grad_(False)
    assert "norm" not in parameter_groups(model)


@pytest.mark.parametrize("positions", [(1, 1), (3, 2)])
@pytest.mark.parametrize("mode", ["full", "diagonal", "trace"])
def test_both_contraction_orders_of_layer_factors_agree_with_explicit_jacobians(positions, mode):
    """Over pairs of positions, and through per-example layer gradients (the structured path
    picks one per layer by cost, so the models above need not exercise both), against the
    kernel of the layer's explicit per-example Jacobians ``sum_l G[a, i, l] (x) A[i, l]``; traced
    (summed over outputs) blocks never pass through the per-output kernel."""
    torch.manual_seed(0)
    factors = [
        _LayerFactors(torch.randn(n, length, 5, dtype=torch.float64), torch.randn(3, n, length, 4, dtype=torch.float64))
        for n, length in zip((4, 2), positions)
    ]
    jacobians = [torch.einsum("ailc,ilp->iacp", f.output_gradients, f.inputs).flatten(start_dim=2) for f in factors]
    full = torch.einsum("iap,jbp->ijab", *jacobians)
    expected = {"full": full, "diagonal": torch.diagonal(full, dim1=2, dim2=3), "trace": torch.diagonal(full, dim1=2, dim2=3).sum(-1)}[mode]
    gradients = [_layer_gradients(f, mode) for f in factors]
    torch.testing.assert_close(_contract_jacobians(*gradients, mode), expected)
    torch.testing.assert_close(_block_through_positions(*factors, mode), expected)
    same = _layer_gradients(factors[0], mode)  # a block on the diagonal of K(X, X): half of a symmetric product
    expected_same = _contract_jacobians(same, same.clone(), mode)
    torch.testing.assert_close(_contract_jacobians(same, same, mode), expected_same)
    torch.testing.assert_close(_block_through_positions(factors[0], factors[0], mode), expected_same)


def test_symmetric_gram_equals_the_plain_product_across_recursion_levels():
    torch.manual_seed(0)
    for shape in [(5, 7), (4 * SYMMETRIC_GRAM_LEAF + 3, 6), (3, 2 * SYMMETRIC_GRAM_LEAF + 1, 4)]:
        rows = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(_symmetric_gram(rows), rows @ rows.transpose(-1, -2))


def test_cross_kernel_between_image_sizes_mixing_both_contraction_orders():
    """On 3x3 images the convolution has one position (contracted as Gram matrices), on 5x5
    nine (through per-example gradients): a block of K(X3, X5) mixes the two feature kinds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    small, large = torch.randn(5, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 5, 5, dtype=torch.float64)
    full = reference_ntk(model, small, large)
    for mode, expected, swapped in [
        ("full", full, full.permute(1, 0, 3, 2)),
        ("diagonal", torch.diagonal(full, dim1=2, dim2=3), torch.diagonal(full, dim1=2, dim2=3).transpose(0, 1)),
        ("trace", torch.diagonal(full, dim1=2, dim2=3).mean(-1), torch.diagonal(full, dim1=2, dim2=3).mean(-1).T),
    ]:
        ntk = EmpiricalNTK(mode=mode, implementation="structured", chunk_size=3)
        torch.testing.assert_close(ntk(model, small, large), expected)
        torch.testing.assert_close(ntk(model, large, small), swapped)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_single_linear_layer_kernel_is_input_gram_plus_one_times_identity(implementation):
    torch.manual_seed(0)
    inputs_1, inputs_2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    layer = nn.Linear(4, 3).double()
    expected = (inputs_1 @ inputs_2.T + 1)[:, :, None, None] * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(EmpiricalNTK(implementation=implementation)(layer, inputs_1, inputs_2), expected)


@pytest.mark.parametrize("implementation", ["jacobian", "structured"])
def test_frozen_parameters_do_not_count(implementation):
    torch.manual_seed(0)
    inputs = torch.randn(5, 4, dtype=torch.float64)
    layer = nn.Linear(4, 3).double()
    layer.bias.requires_grad_(False)
    expected = (inputs @ inputs.T)[:, :, None, None] * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(EmpiricalNTK(implementation=implementation)(layer, inputs), expected)


@pytest.mark.parametrize("implementation", ["jacobian", "structured"])
def test_centered_kernel_is_the_kernel_of_centred_gradients_and_equals_hkh(implementation):
    model, inputs = _model_and_inputs("cnn")
    jacobians = per_example_jacobians(model, inputs)
    centred_jacobians = jacobians - jacobians.mean(dim=0)
    expected = torch.einsum("iap,jbp->ijab", centred_jacobians, centred_jacobians)
    centred = EmpiricalNTK(centered=True, implementation=implementation)(model, inputs)
    torch.testing.assert_close(centred, expected)
    n = len(inputs)
    centring = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1 / n, dtype=torch.float64)
    traced = EmpiricalNTK(mode="trace", implementation=implementation)(model, inputs)
    centred_traced = EmpiricalNTK(mode="trace", centered=True, implementation=implementation)(model, inputs)
    torch.testing.assert_close(centred_traced, centring @ traced @ centring)


@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vector", "structured"])
@pytest.mark.parametrize("training", [True, False])
def test_mode_parameters_and_gradients_are_untouched(implementation, training):
    model, inputs = _model_and_inputs("cnn")
    model.train(training)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()}
    ntk = EmpiricalNTK(implementation=implementation)
    ntk(model, inputs)
    ntk.layerwise(model, inputs)
    assert all(module.training == training for module in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name][0]) and torch.equal(p.grad, before[name][1])
        assert p.requires_grad
    assert not any(module._forward_hooks for module in model.modules())


def test_training_mode_batchnorm_is_refused_not_switched():
    model, inputs = _model_and_inputs("mixed")
    model.train()
    with pytest.raises(UserInputError, match="'norm'.*model.eval()"):
        EmpiricalNTK()(model, inputs)
    assert model.training


def test_structured_refuses_shared_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    model[2].weight = model[0].weight
    inputs = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(UserInputError, match="shared"):
        EmpiricalNTK(implementation="structured")(model, inputs)
    torch.testing.assert_close(EmpiricalNTK()(model, inputs), reference_ntk(model, inputs))


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("mode", "frobenius", "['full', 'trace', 'diagonal']"),
        ("trace_reduction", "max", "['mean', 'sum']"),
        ("implementation", "fast", "['auto', 'jacobian', 'ntk_vector', 'structured']"),
        ("chunk_size", 0, "> 0"),
    ],
)
def test_bad_options_name_the_option_and_what_is_allowed(option, value, allowed):
    with pytest.raises(UserInputError) as error:
        EmpiricalNTK(**{option: value})
    assert f"{option}={value!r}" in str(error.value) and allowed in str(error.value)
