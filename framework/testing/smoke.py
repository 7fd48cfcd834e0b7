"""The generic check every architecture passes (timm-style): output shape, gradients reach every
parameter, finite values, and a state_dict round trip that reproduces the outputs."""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def check_architecture(factory: Callable[[], nn.Module], inputs: torch.Tensor, expected_shape: tuple[int, ...], directory: Path) -> None:
    """Build a model with ``factory``, run it on ``inputs`` and assert the generic properties.

    Raises AssertionError naming the parameter or property that fails.
    """
    torch.manual_seed(0)
    model = factory()
    outputs = model(inputs)
    assert tuple(outputs.shape) == tuple(expected_shape), f"output shape {tuple(outputs.shape)}, expected {tuple(expected_shape)}"
    assert torch.isfinite(outputs).all(), "non-finite outputs"
    outputs.float().square().sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reaches {name}"
            assert torch.isfinite(parameter.grad).all(), f"non-finite gradient for {name}"
    path = Path(directory) / "weights.pt"
    torch.save(model.state_dict(), path)
    restored = factory()
    restored.load_state_dict(torch.load(path, weights_only=True))
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(model(inputs), restored(inputs)), "a state_dict round trip changes the outputs"
