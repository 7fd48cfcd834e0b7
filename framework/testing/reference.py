"""Brute-force references for estimators, computed with ``torch.func`` on small models.

Slow and memory-hungry on purpose: they materialise every per-example gradient or Jacobian, so
they are the ground truth that the fast estimators (Fisher representations, empirical NTKs) are
checked against in float64.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap


def flat_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters by name, detached (the point the references linearise at)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def per_example_jacobians(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Jacobians of the outputs with respect to all trainable parameters, one per example:
    shape (N, O, P) with P ordered as ``model.named_parameters()`` and each parameter
    flattened row-major. The model is evaluated in its current mode (use ``eval`` for BatchNorm)."""
    params = flat_parameters(model)

    def output(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0).reshape(-1)

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params, inputs)
    return torch.cat([j.reshape(inputs.shape[0], j.shape[1], -1) for j in jacobians.values()], dim=2)


def per_example_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Gradients of ``loss(output, target)`` (for one example, batch dimension of 1) with respect
    to all trainable parameters: shape (N, P), ordered as in :func:`per_example_jacobians`."""
    params = flat_parameters(model)

    def example_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    gradients = vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.cat([g.reshape(inputs.shape[0], -1) for g in gradients.values()], dim=1)


def empirical_ntk(model: nn.Module, inputs_1: torch.Tensor, inputs_2: torch.Tensor | None = None) -> torch.Tensor:
    """The full empirical NTK ``J(x1) J(x2)^T`` of shape (N1, N2, O, O) from full Jacobians."""
    jacobian_1 = per_example_jacobians(model, inputs_1)
    jacobian_2 = jacobian_1 if inputs_2 is None else per_example_jacobians(model, inputs_2)
    return torch.einsum("iap,jbp->ijab", jacobian_1, jacobian_2)
