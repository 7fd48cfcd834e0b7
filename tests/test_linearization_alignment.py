"""Centred kernel-target and kernel-kernel alignment, against the formulas written with H."""

import pytest
import torch
import torch.nn.functional as F
from test_linearization_ntk import _model_and_inputs

from callbacks.linearization import (
    CenteredKernel,
    EmpiricalNTK,
    center_kernel,
    kernel_alignment,
    kernel_target_alignment,
    layerwise_target_alignment,
    target_kernel,
)
from framework.errors import UserInputError

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

LABELS = torch.tensor([0, 2, 1, 0, 2, 2, 1])


def _centring(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1 / n, dtype=torch.float64)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def test_center_kernel_is_h1_k_h2_on_the_example_dimensions():
    torch.manual_seed(0)
    kernel = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    expected = torch.einsum("ik,klab,lj->ijab", _centring(5), kernel, _centring(3))
    torch.testing.assert_close(center_kernel(kernel), expected)


def test_target_alignment_matches_the_formula_with_centring_matrices():
    model, inputs = _model_and_inputs("mlp")
    kernel = EmpiricalNTK(mode="trace")(model, inputs)
    one_hot = F.one_hot(LABELS, 3).double()
    centring = _centring(len(LABELS))
    expected = _cosine(centring @ kernel @ centring, (centring @ one_hot) @ (centring @ one_hot).T)
    alignment = kernel_target_alignment(kernel, LABELS)
    torch.testing.assert_close(alignment, expected)
    assert -1 <= alignment <= 1
    torch.testing.assert_close(kernel_target_alignment(kernel, one_hot), expected)


def test_target_kernel_aligns_perfectly_with_itself_and_alignment_ignores_scale_and_offset():
    targets = target_kernel(LABELS)
    torch.testing.assert_close(kernel_target_alignment(targets, LABELS), torch.tensor(1.0, dtype=torch.float64))
    kernel = EmpiricalNTK(mode="trace")(*_model_and_inputs("cnn"))
    alignment = kernel_target_alignment(kernel, LABELS)
    torch.testing.assert_close(kernel_target_alignment(37.5 * kernel + 2.0, LABELS), alignment)


def test_one_hot_width_follows_num_classes():
    labels = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(target_kernel(labels, num_classes=5), target_kernel(labels))
    assert torch.equal(target_kernel(labels), (labels[:, None] == labels[None, :]).double())


def test_kernel_alignment_is_one_for_the_same_geometry_and_symmetric():
    model, inputs = _model_and_inputs("cnn")
    kernel = EmpiricalNTK()(model, inputs)
    torch.testing.assert_close(kernel_alignment(kernel, 3.0 * kernel), torch.tensor(1.0, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    moved = EmpiricalNTK()(model, inputs)
    alignment = kernel_alignment(kernel, moved)
    assert alignment < 1 - 1e-6
    torch.testing.assert_close(kernel_alignment(moved, kernel), alignment)
    torch.testing.assert_close(alignment, _cosine(center_kernel(kernel), center_kernel(moved)))


def test_a_centred_reference_aligns_many_kernels_as_kernel_alignment_does():
    """Centred once and reused (as the callback does with the targets and the initial kernel)."""
    model, inputs = _model_and_inputs("mixed")
    kernels = EmpiricalNTK(mode="trace").layerwise(model, inputs)
    targets = CenteredKernel(target_kernel(LABELS))
    for kernel in kernels.values():
        torch.testing.assert_close(targets.alignment(kernel), kernel_target_alignment(kernel, LABELS))
        torch.testing.assert_close(CenteredKernel(kernel).alignment(kernels["head"]), kernel_alignment(kernels["head"], kernel))
    with pytest.raises(UserInputError, match="same shape"):
        targets.alignment(torch.eye(3))


def test_layerwise_target_alignment_aligns_each_layer_kernel():
    model, inputs = _model_and_inputs("mixed")
    kernels = EmpiricalNTK(mode="trace").layerwise(model, inputs)
    alignments = layerwise_target_alignment(kernels, LABELS)
    assert list(alignments) == list(kernels)
    for layer, kernel in kernels.items():
        torch.testing.assert_close(alignments[layer], kernel_target_alignment(kernel, LABELS))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kernel_target_alignment(torch.ones(4, 4, 2, 2), torch.arange(4)), "square"),
        (lambda: kernel_target_alignment(torch.eye(4), torch.arange(3)), "3 examples"),
        (lambda: kernel_alignment(torch.eye(4), torch.eye(3)), "same shape"),
        (lambda: target_kernel(torch.zeros(2, 2, 2)), "targets"),
    ],
)
def test_bad_inputs_say_what_is_wrong(call, message):
    with pytest.raises(UserInputError, match=message):
        call()
