"""Wide residual networks (Zagoruyko & Komodakis 2016), pre-activation variant."""

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import UserInputError, check_positive


class PreActBlock(nn.Module):
    """BN-ReLU-Conv3x3-BN-ReLU-(Dropout)-Conv3x3 with an identity shortcut, or a 1x1 conv on the
    pre-activated input when the number of channels or the resolution changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        y = self.conv1(pre)
        y = F.relu(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: a 3x3 stem with 16 channels, three groups of
    ``(depth - 4) / 6`` pre-activation blocks of widths 16k, 32k, 64k (strides 1, 2, 2), then
    BN-ReLU, global average pooling and a Linear classifier.

    Args:
        depth: total depth, ``6n + 4`` (10, 16, 22, 28, 40, ...).
        widen_factor: k, the width multiplier.
        num_classes: size of the output.
        in_channels: channels of the input images.
        dropout: dropout probability between the two convolutions of each block.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise UserInputError(f"depth={depth} is not allowed; WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)")
        check_positive("widen_factor", widen_factor)
        if not 0.0 <= dropout < 1.0:
            raise UserInputError(f"dropout={dropout} must be in [0, 1)")
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups = []
        fan_in = 16
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(blocks_per_group):
                blocks.append(PreActBlock(fan_in, width, stride if i == 0 else 1, dropout))
                fan_in = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(fan_in)
        self.classifier = nn.Linear(fan_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.bn(self.groups(self.stem(x))))
        return self.classifier(features.mean(dim=(2, 3)))
