"""Networks that compare two 64x64 grey patches (Zagoruyko & Komodakis 2015, "Learning to
compare image patches via convolutional neural networks"), layers as in the authors' code
(szagoruyko/cvpr15deepcompare). Every network takes a pair as one tensor (N, 2, 64, 64),
channel 0 the first patch and channel 1 the second, and returns one score per pair (N,),
positive for "matching", trained with a hinge loss on +/-1 labels.

Notation: C(n, k, s) an n-channel k x k convolution at stride s, P a 2x2 max-pool, F(n) a
Linear layer with n outputs; ReLU after every layer but the last.

``TwoChannelNet`` (2ch): both patches as the 2 channels of one image:
    C(96, 7, 3)-P-C(192, 5, 1)-P-C(256, 3, 1)-F(256)-F(1).
``SiameseNet``: one tower C(96, 7, 3)-P-C(192, 5, 1)-P-C(256, 3, 1) applied to each patch
    (shared weights), the two 256-d descriptors concatenated, then F(512)-F(1).
``PseudoSiameseNet``: as the siamese net with a separate tower for each patch.
``TwoChannelTwoStreamNet`` (2ch-2stream, central-surround): two 2-channel streams
    C(96, 5, 1)-P-C(96, 3, 1)-P-C(192, 3, 1)-C(192, 3, 1), one on the central 32x32 crop and one
    on the whole pair downsampled 2x (2x2 average pooling) to 32x32; their 768-d outputs
    concatenated, then F(768)-F(1).
"""

import torch
from torch import nn

from framework.errors import UserInputError

PATCH_SIZE = 64


def check_pairs(pairs: torch.Tensor) -> None:
    """Refuse anything but a batch of 64x64 patch pairs (N, 2, 64, 64), which the layers assume."""
    if pairs.dim() != 4 or tuple(pairs.shape[1:]) != (2, PATCH_SIZE, PATCH_SIZE):
        raise UserInputError(f"patch pairs must have shape (N, 2, {PATCH_SIZE}, {PATCH_SIZE}), got {tuple(pairs.shape)}")


def relu_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    """A convolution followed by ReLU."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride), nn.ReLU()]


def patch_tower(in_channels: int) -> nn.Sequential:
    """C(96, 7, 3)-P-C(192, 5, 1)-P-C(256, 3, 1): a 64x64 input to a 256-d vector."""
    return nn.Sequential(
        *relu_conv(in_channels, 96, 7, stride=3),
        nn.MaxPool2d(2),
        *relu_conv(96, 192, 5),
        nn.MaxPool2d(2),
        *relu_conv(192, 256, 3),
        nn.Flatten(),
    )


def stream(in_channels: int) -> nn.Sequential:
    """C(96, 5, 1)-P-C(96, 3, 1)-P-C(192, 3, 1)-C(192, 3, 1): a 32x32 input to a 768-d vector."""
    return nn.Sequential(
        *relu_conv(in_channels, 96, 5),
        nn.MaxPool2d(2),
        *relu_conv(96, 96, 3),
        nn.MaxPool2d(2),
        *relu_conv(96, 192, 3),
        *relu_conv(192, 192, 3),
        nn.Flatten(),
    )


def decision(in_features: int, hidden: int) -> nn.Sequential:
    """F(hidden)-ReLU-F(1): features of a pair to its score."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Flatten(0))


def he_init(model: nn.Module) -> None:
    """He-normal weights and zero biases (the authors' MSR init)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


class TwoChannelNet(nn.Module):
    """2ch: the pair as a 2-channel image through one network; the most accurate and the
    slowest at test time (every pair goes through the whole network)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = patch_tower(2)
        self.decision = decision(256, 256)
        he_init(self)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        check_pairs(pairs)
        return self.decision(self.features(pairs))


class SiameseNet(nn.Module):
    """Siamese: one descriptor tower applied to each patch, descriptors compared by a learnt
    decision network. ``shared_weights`` is False in :class:`PseudoSiameseNet`."""

    shared_weights = True

    def __init__(self) -> None:
        super().__init__()
        self.tower = patch_tower(1)
        self.second_tower = None if self.shared_weights else patch_tower(1)
        self.decision = decision(512, 512)
        he_init(self)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        check_pairs(pairs)
        second_tower = self.tower if self.second_tower is None else self.second_tower
        first, second = self.tower(pairs[:, :1]), second_tower(pairs[:, 1:])
        return self.decision(torch.cat([first, second], dim=1))


class PseudoSiameseNet(SiameseNet):
    """Pseudo-siamese: the siamese layout with a separate tower per patch (unshared weights),
    for patches that come from different distributions."""

    shared_weights = False


class TwoChannelTwoStreamNet(nn.Module):
    """2ch-2stream: a 2-channel stream on the central 32x32 crop (fine detail at full
    resolution) and one on the whole pair downsampled 2x (the surround, at half resolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.centre = stream(2)
        self.surround = nn.Sequential(nn.AvgPool2d(2), stream(2))
        self.decision = decision(2 * 768, 768)
        he_init(self)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        check_pairs(pairs)
        margin = PATCH_SIZE // 4
        centre = pairs[:, :, margin:-margin, margin:-margin]
        return self.decision(torch.cat([self.surround(pairs), self.centre(centre)], dim=1))
