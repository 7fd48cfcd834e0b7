"""A small convolutional network, for tests and small experiments."""

from collections.abc import Sequence

import torch
from torch import nn

from framework.errors import check_positive


class SmallCNN(nn.Module):
    """``[Conv3x3 -> ReLU -> MaxPool2]`` per entry of ``channels``, then global average pooling
    and a Linear classifier. Works on any input size of at least ``2 ** len(channels)``.

    Args:
        in_channels: channels of the input images (1 for digits and MNIST, 3 for CIFAR).
        num_classes: size of the output.
        channels: output channels of each convolutional stage.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        for width in (in_channels, num_classes, *channels):
            check_positive("SmallCNN width", width)
        stages: list[nn.Module] = []
        fan_in = in_channels
        for fan_out in channels:
            stages += [nn.Conv2d(fan_in, fan_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            fan_in = fan_out
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(fan_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))
