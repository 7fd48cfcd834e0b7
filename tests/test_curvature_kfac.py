"""KFAC and EKFAC (callbacks.curvature) against the dense Fisher and brute-force per-example
gradients, in float64: where KFAC is exact, EKFAC's re-estimated scaling, exact damping."""

import pytest
import torch
import torch.nn.functional as F
from test_curvature_fisher import (
    DOUBLE,
    classification_task,
    conv_task,
    layer_slices,
    reference_fisher,
    weight_sharing_task,
)

from callbacks.curvature import EKFAC, KFAC, ParameterLayout, PVector, fisher, second_moment
from callbacks.curvature.blocks import EigenBlock, KroneckerBlock
from framework.models import MLP
from framework.testing.reference import per_example_gradients


def block_diagonal_part(matrix: torch.Tensor, layout) -> torch.Tensor:
    return torch.block_diag(*(matrix[part, part] for part in layer_slices(layout).values()))


@pytest.mark.parametrize("representation", ["kfac", "ekfac"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_kfac_and_ekfac_equal_the_dense_blocks_when_all_examples_share_one_input(fisher_type, representation):
    model, _, targets = classification_task(n=6)
    inputs = torch.randn(1, 3, dtype=DOUBLE).expand(6, 3)
    approximation = fisher(model, [(inputs, targets)], representation, fisher_type)
    expected = reference_fisher(model, inputs, targets, fisher_type, "classification")
    torch.testing.assert_close(approximation.to_dense(), block_diagonal_part(expected, approximation.layout))


@pytest.mark.parametrize("representation", ["kfac", "ekfac"])
def test_conv2d_with_one_position_is_exact_like_linear_when_all_examples_share_one_input(representation):
    """A Conv2d whose kernel covers its input has one output position, so it is a Linear layer on
    the flattened patch: KFAC and EKFAC equal the dense block, as for Linear."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3, 4)).double()
    inputs, targets = torch.randn(1, 2, 3, 3, dtype=DOUBLE).expand(6, -1, -1, -1), torch.randint(0, 4, (6,))
    approximation = fisher(model, [(inputs, targets)], representation)
    expected = reference_fisher(model, inputs, targets, "exact", "classification")
    assert isinstance(approximation.blocks["0"], EigenBlock if representation == "ekfac" else KroneckerBlock)
    torch.testing.assert_close(approximation.to_dense(), block_diagonal_part(expected, approximation.layout))


@pytest.mark.parametrize("batch_sizes", [[9], [2, 3, 4]])
def test_kfac_is_exact_for_a_deep_linear_network_and_not_with_a_relu(batch_sizes):
    torch.manual_seed(0)
    inputs, targets = torch.randn(9, 3, dtype=DOUBLE), torch.randn(9, 2, dtype=DOUBLE)
    batches = list(zip(inputs.split(batch_sizes), targets.split(batch_sizes)))
    for activation, exact in (("identity", True), ("relu", False)):
        model = MLP(3, 2, hidden=(4, 3), activation=activation).double()
        expected = block_diagonal_part(reference_fisher(model, inputs, targets, "exact", "regression"), ParameterLayout(model))
        for representation in ("kfac", "ekfac"):
            error = (fisher(model, batches, representation, "exact", "regression").to_dense() - expected).norm()
            assert (error < 1e-10) == exact, (activation, representation, error)


@pytest.mark.parametrize("make_task", [classification_task, conv_task, weight_sharing_task], ids=["mlp", "cnn", "shared"])
def test_ekfac_trace_frobenius_and_relation_to_kfac(make_task):
    model, inputs, targets = make_task()
    dense = reference_fisher(model, inputs, targets, "exact", "classification")
    kfac = fisher(model, [(inputs, targets)], "kfac")
    ekfac = fisher(model, [(inputs, targets)], "ekfac")
    torch.testing.assert_close(ekfac.trace(), dense.trace())
    assert not torch.isclose(kfac.trace(), dense.trace())
    kfac_error, ekfac_error = (kfac.to_dense() - dense).norm(), (ekfac.to_dense() - dense).norm()
    assert ekfac_error < kfac_error
    for name, block in kfac.blocks.items():
        if isinstance(block, KroneckerBlock):
            torch.testing.assert_close(block.eigen.to_dense(), block.to_dense())
            torch.testing.assert_close(ekfac.blocks[name].q_g, block.eigen.q_g)


@pytest.mark.parametrize(
    "make_task", [classification_task, conv_task, weight_sharing_task], ids=["linear-fast-path", "conv2d", "shared"]
)
def test_ekfac_scaling_equals_brute_force_projected_per_example_gradients(make_task):
    model, inputs, targets = make_task()
    ekfac = fisher(model, [(inputs, targets)], "ekfac", "empirical")
    gradients = per_example_gradients(model, inputs, targets, F.cross_entropy)
    checked = 0
    for name, part in layer_slices(ekfac.layout).items():
        block = ekfac.blocks[name]
        if isinstance(block, EigenBlock):
            projected = block.q_g.T @ block.layer.to_matrix(gradients[:, part]) @ block.q_a
            torch.testing.assert_close(block.scaling, projected.square().mean(0))
            checked += 1
    assert checked == len(ekfac.blocks)


def test_linear_shortcut_is_the_general_projection_for_one_position():
    torch.manual_seed(0)
    inputs, output_gradients = torch.randn(5, 1, 4, dtype=DOUBLE), torch.randn(5, 1, 3, dtype=DOUBLE)
    q_a, q_g = torch.linalg.qr(torch.randn(4, 4, dtype=DOUBLE)).Q, torch.linalg.qr(torch.randn(3, 3, dtype=DOUBLE)).Q
    brute_force = (q_g.T @ (output_gradients.transpose(1, 2) @ inputs) @ q_a).square().sum(0)
    torch.testing.assert_close(second_moment(inputs @ q_a, output_gradients @ q_g), brute_force)


@pytest.mark.parametrize("representation", ["kfac", "ekfac"])
@pytest.mark.parametrize("make_task", [classification_task, conv_task], ids=["mlp", "cnn"])
def test_damped_solves_and_inverses_equal_dense_solves(representation, make_task):
    model, inputs, targets = make_task()
    approximation = fisher(model, [(inputs, targets)], representation)
    v = PVector.from_flat(approximation.layout, torch.randn(approximation.layout.size, dtype=DOUBLE))
    damped = approximation.to_dense() + 0.1 * torch.eye(approximation.layout.size, dtype=DOUBLE)
    expected = torch.linalg.solve(damped, v.flatten())
    torch.testing.assert_close(approximation.solve(v, damping=0.1).flatten(), expected)
    inverse = approximation.inverse(damping=0.1)
    assert isinstance(inverse, EKFAC) and not isinstance(inverse, KFAC)
    torch.testing.assert_close(inverse.mv(v).flatten(), expected)
    torch.testing.assert_close(inverse.to_dense(), torch.linalg.inv(damped))
