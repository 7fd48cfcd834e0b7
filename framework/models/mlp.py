"""A plain multilayer perceptron, for tests and small experiments."""

from collections.abc import Sequence

import torch
from torch import nn

from framework.errors import check_choice, check_positive

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}


class MLP(nn.Module):
    """Flattens its input and applies Linear layers with an activation between them.

    Args:
        in_features: size of the flattened input (64 for 8x8 digits).
        num_classes: size of the output.
        hidden: widths of the hidden layers.
        activation: one of ``relu``, ``tanh``, ``gelu``, ``identity`` (a deep linear network).
        bias: whether the Linear layers have a bias.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        for width in (in_features, num_classes, *hidden):
            check_positive("MLP width", width)
        widths = [in_features, *hidden, num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
