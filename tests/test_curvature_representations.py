"""The representation interface (callbacks.curvature): every method agrees with the dense matrix
it represents, solves invert products, and the parameter-space vector follows the model's order."""

import copy

import pytest
import torch
from test_curvature_fisher import DOUBLE, classification_task, reference_fisher, regression_task

from callbacks.curvature import (
    EKFAC,
    BlockDiagonal,
    Dense,
    Diagonal,
    Implicit,
    LowRank,
    ParameterLayout,
    PVector,
    fisher,
)
from framework.errors import UserInputError

REPRESENTATIONS = ["dense", "diagonal", "block_diagonal", "kfac", "ekfac", "implicit"]
INVERSE_TYPES = {"dense": Dense, "diagonal": Diagonal, "block_diagonal": BlockDiagonal, "kfac": EKFAC, "ekfac": EKFAC, "implicit": Dense}


def random_vector(layout: ParameterLayout, seed: int = 1) -> PVector:
    generator = torch.Generator().manual_seed(seed)
    return PVector.from_flat(layout, torch.randn(layout.size, generator=generator, dtype=DOUBLE))


def test_pvector_follows_the_model_parameter_order():
    model, inputs, targets = classification_task()
    layout = ParameterLayout(model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    params = PVector.from_model(layout)
    torch.testing.assert_close(params.flatten(), flat)
    shaped = PVector.from_flat(layout, flat).to_parameters()
    assert [(name, tuple(t.shape)) for name, t in shaped.items()] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    torch.testing.assert_close(PVector.from_model_grads(layout).flatten(), torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    other = random_vector(layout)
    torch.testing.assert_close((params + 2 * other - other * 0.5).flatten(), flat + 1.5 * other.flatten())
    torch.testing.assert_close((params - other).flatten(), flat - other.flatten())
    torch.testing.assert_close(params.dot(other), flat @ other.flatten())
    torch.testing.assert_close(other.norm(), other.flatten().norm())


def test_gradients_of_frozen_or_missing_parameters():
    model, _, _ = classification_task()
    model.layers[1].bias.requires_grad_(False)
    layout = ParameterLayout(model)
    assert layout.size == sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(PVector.from_model_grads(layout).flatten(), torch.zeros(layout.size, dtype=DOUBLE))


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_every_method_agrees_with_the_dense_matrix(representation):
    model, inputs, targets = classification_task()
    approximation = fisher(model, [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])], representation)
    matrix = approximation.to_dense()
    v = random_vector(approximation.layout)
    torch.testing.assert_close(approximation.mv(v).flatten(), matrix @ v.flatten())
    torch.testing.assert_close(approximation.vTMv(v), v.flatten() @ matrix @ v.flatten())
    torch.testing.assert_close(approximation.trace(), matrix.trace())
    torch.testing.assert_close(approximation.frobenius_norm(), matrix.norm())
    inverse = approximation.inverse(damping=0.3)
    assert type(inverse) is INVERSE_TYPES[representation]
    damped = matrix + 0.3 * torch.eye(len(matrix), dtype=DOUBLE)
    torch.testing.assert_close(inverse.to_dense(), torch.linalg.inv(damped))
    torch.testing.assert_close(approximation.solve(v, damping=0.3).flatten(), torch.linalg.solve(damped, v.flatten()))
    with pytest.raises(UserInputError, match="damping=-1"):
        approximation.solve(v, damping=-1)


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_solve_inverts_mv(representation, damping):
    model, inputs, targets = regression_task(n=20)
    approximation = fisher(model, [(inputs, targets)], representation, "exact", "regression")
    v = random_vector(approximation.layout)
    product = approximation.mv(v) + damping * v
    torch.testing.assert_close(approximation.solve(product, damping).flatten(), v.flatten(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
def test_implicit_products_equal_the_dense_fisher(fisher_type):
    model, inputs, targets = classification_task()
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    dense, implicit = (
        fisher(model, batches, representation, fisher_type, samples=3, generator=torch.Generator().manual_seed(0))
        for representation in ("dense", "implicit")
    )
    assert isinstance(implicit, Implicit)
    torch.testing.assert_close(implicit.to_dense(), dense.to_dense())
    if fisher_type != "mc":
        torch.testing.assert_close(dense.to_dense(), reference_fisher(model, inputs, targets, fisher_type, "classification"))


def test_low_rank_holds_the_top_eigenpairs_exactly_or_by_subspace_iteration():
    model, inputs, targets = regression_task()
    dense = fisher(model, [(inputs, targets)], "dense", "exact", "regression")
    values, vectors = torch.linalg.eigh(dense.to_dense())
    expected = vectors[:, -3:] @ torch.diag(values[-3:]) @ vectors[:, -3:].T
    exact = fisher(model, [(inputs, targets)], "lowrank", "exact", "regression", rank=3)
    assert isinstance(exact, LowRank)
    torch.testing.assert_close(exact.eigenvalues, values[-3:].flip(0))
    torch.testing.assert_close(exact.to_dense(), expected)
    implicit = fisher(model, [(inputs, targets)], "implicit", "exact", "regression")
    iterated = LowRank.from_representation(implicit, 3, iterations=60, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(iterated.to_dense(), expected, rtol=1e-6, atol=1e-8)
    with pytest.raises(UserInputError, match="damping > 0"):
        exact.inverse()
    with pytest.raises(UserInputError, match="rank=99 exceeds"):
        LowRank.from_representation(dense, 99)


def test_conjugate_gradients_warns_when_it_stops_short():
    model, inputs, targets = regression_task(n=20)
    implicit = fisher(model, [(inputs, targets)], "implicit", "exact", "regression")
    implicit.cg_max_iterations = 2
    with pytest.warns(UserWarning, match="stopped after 2 iterations"):
        implicit.solve(random_vector(implicit.layout))


class KeepMask(torch.nn.Module):
    """A parametrization W = original * mask, like a pruning mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.mask


def reparametrized_pair(storage: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A CNN + BatchNorm + MLP head with its Conv2d, BatchNorm and Linear weights (and one bias)
    masked by torch.nn.utils.prune or a parametrization, and a plain copy holding the same effective
    weights."""
    from torch import nn
    from torch.nn.utils import parametrize, prune

    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)
    ).double()
    with torch.no_grad():
        plain[4].weight.uniform_(0.5, 1.5)
        plain[4].running_var.uniform_(0.5, 2.0)
    plain.eval()
    masked = copy.deepcopy(plain)
    generator = torch.Generator().manual_seed(1)
    targets = [(0, "weight"), (3, "weight"), (3, "bias"), (6, "weight")] + ([(4, "weight")] if storage == "pruned" else [])
    for index, name in targets:
        mask = (torch.rand(getattr(plain[index], name).shape, generator=generator) > 0.4).double()
        if storage == "pruned":
            prune.custom_from_mask(masked[index], name, mask)
        else:
            parametrize.register_parametrization(masked[index], name, KeepMask(mask))
        with torch.no_grad():
            getattr(plain[index], name).mul_(mask)
    return masked, plain


@pytest.mark.parametrize("storage", ["pruned", "parametrized"])
def test_pruned_and_parametrized_layers_use_the_effective_weights(storage):
    masked, plain = reparametrized_pair(storage)
    inputs, targets = torch.randn(6, 1, 4, 4, dtype=DOUBLE), torch.randint(0, 3, (6,))
    layout, plain_layout = ParameterLayout(masked), ParameterLayout(plain)
    assert list(layout.layers) == list(plain_layout.layers) == ["0", "3", "4", "6"]
    assert list(layout.parameters()) == [name for name, _ in plain.named_parameters()]
    leaves = list(layout.layers["3"].parameters.values())  # what an optimiser steps on, in layout order
    original = "weight_orig" if storage == "pruned" else "parametrizations.weight.original"
    assert leaves[0] is masked[3].get_parameter(original) and leaves[0].shape == (5, 32)
    torch.testing.assert_close(PVector.from_model(layout).flatten(), PVector.from_model(plain_layout).flatten())
    shaped = PVector.from_model(layout).to_parameters()
    assert list(shaped) == list(dict(plain.named_parameters()))
    for name, p in plain.named_parameters():
        torch.testing.assert_close(shaped[name], p.detach())
    for representation in ["dense", "diagonal", "kfac", "ekfac"]:
        expected = fisher(plain, [(inputs, targets)], representation).to_dense()
        torch.testing.assert_close(fisher(masked, [(inputs, targets)], representation).to_dense(), expected)
    if storage == "pruned":
        v = random_vector(layout)
        expected = fisher(plain, [(inputs, targets)], "dense").mv(v).flatten()
        torch.testing.assert_close(fisher(masked, [(inputs, targets)], "implicit").mv(v).flatten(), expected)
    if storage == "pruned":  # the forward's cached weight is put back after functional calls
        assert torch.equal(masked[3].weight, masked[3].weight_orig * masked[3].weight_mask)
    torch.nn.functional.cross_entropy(masked(inputs), targets).backward()
    gradients = PVector.from_model_grads(layout).to_parameters()
    torch.testing.assert_close(gradients["3.weight"], leaves[0].grad)


def test_parametrizations_that_cannot_be_evaluated_are_refused_by_name():
    masked, _ = reparametrized_pair("parametrized")
    inputs = torch.randn(4, 1, 4, 4, dtype=DOUBLE)
    with pytest.raises(UserInputError, match=r"'0.weight' is parametrized"):
        fisher(masked, [inputs], "implicit")
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(masked[4], "weight", KeepMask(torch.ones(5, dtype=DOUBLE)))
    with pytest.raises(UserInputError, match=r"'4.weight' is parametrized"):
        fisher(masked, [inputs], "diagonal")
    with pytest.raises(UserInputError, match=r"layers='3.parametrizations.weight'"):
        fisher(masked, [inputs], "diagonal", layers=["3.parametrizations.weight"])
