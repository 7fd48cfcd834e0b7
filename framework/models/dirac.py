"""DiracNets (Zagoruyko & Komodakis 2017): deep networks without skip connections, trainable
because every convolution is parameterised as the identity plus a normalised residual kernel,
``W_hat = diag(a) I + diag(b) W / ||W||``; and a plain net of the same layout for comparison.

Layouts (every Dirac convolution is 3x3 at stride 1 and keeps the resolution; max-pooling 2x2
between groups halves it):

``cifar``, depth ``6n + 4``, widen factor k: a 3x3 stem with 16k channels, three groups of
    ``2n`` convolutions of widths 16k, 32k, 64k (DiracNet-28-10: n = 4, 8 convolutions a group).
``imagenet``, depth 18 or 34: a 7x7 stride-2 stem with 64k channels and a 3x3 stride-2 max-pool,
    four groups of widths 64k, 128k, 256k, 512k with 2 x (2, 2, 2, 2) convolutions (DiracNet-18)
    or 2 x (3, 4, 6, 5) (DiracNet-34), as in the authors' code (szagoruyko/diracnets; note the
    last group of DiracNet-34 is longer than ResNet-34's 2 x 3).

Depth follows the wide-ResNet naming: DiracNet-28-10 has 24 Dirac convolutions and 36.5M
parameters, like WRN-28-10.

Each convolution is pre-activated (BN-ReLU-Conv), and the net ends with BN-ReLU, global
average pooling and a Linear classifier. The authors' code differs in two details: it applies
NCReLU-Conv-BN (NCReLU concatenates relu(x) and -relu(-x), so the identity kernel passes x
itself) and initialises a = 5, b = 1e-3; here a = 1, b = 0.1 as in the paper.
"""

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import UserInputError, check_choice, check_positive

Layout = Literal["cifar", "imagenet"]
IMAGENET_CONVS_PER_GROUP = {18: (4, 4, 4, 4), 34: (6, 8, 12, 10)}
NORM_EPS = 1e-12  # floor of a filter's norm, as in F.normalize


def dirac_delta(out_channels: int, in_channels: int, kernel_size: int) -> torch.Tensor:
    """The kernel whose convolution (stride 1, padding ``kernel_size // 2``) is the identity; when
    the channel counts differ (one must divide the other), the identity repeated: each input
    channel copied to several outputs, or several inputs summed into each output."""
    if max(out_channels, in_channels) % min(out_channels, in_channels) != 0:
        raise UserInputError(
            f"a Dirac convolution needs one channel count to divide the other, got in_channels={in_channels}, "
            f"out_channels={out_channels}"
        )
    channels = min(out_channels, in_channels)
    delta = nn.init.dirac_(torch.empty(channels, channels, kernel_size, kernel_size))
    return delta.repeat(out_channels // channels, in_channels // channels, 1, 1)


class DiracConv2d(nn.Module):
    """A stride-1 'same' convolution with the weight ``diag(alpha) delta + diag(beta) W / ||W||``,
    the norm taken per output filter (over in x kh x kw). ``alpha`` and ``beta`` are learnt per
    output channel; the parameterisation is folded into one weight before a single
    ``F.conv2d``, so it costs no extra convolution.

    Args:
        in_channels: input channels.
        out_channels: output channels; one of the two channel counts must divide the other.
        kernel_size: odd kernel size.
        alpha: initial identity scale a.
        beta: initial scale b of the normalised kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, alpha: float = 1.0, beta: float = 0.1) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UserInputError(f"kernel_size={kernel_size} must be odd, so the identity kernel keeps the resolution")
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.alpha = nn.Parameter(torch.full((out_channels,), float(alpha)))
        self.beta = nn.Parameter(torch.full((out_channels,), float(beta)))
        self.register_buffer("delta", dirac_delta(out_channels, in_channels, kernel_size), persistent=False)

    def folded_weight(self) -> torch.Tensor:
        """The effective kernel ``diag(alpha) delta + diag(beta) W / ||W||``. The per-filter
        factor ``beta / ||W||`` is formed on the (out,) vector and applied in one ``addcmul``:
        two passes over the kernel instead of four when W is normalised first (see
        scripts/bench/dirac_conv.py)."""
        scale = self.beta / torch.linalg.vector_norm(self.weight.flatten(1), dim=1).clamp_min(NORM_EPS)
        return torch.addcmul(self.alpha.view(-1, 1, 1, 1) * self.delta, scale.view(-1, 1, 1, 1), self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.folded_weight(), padding=self.padding)


def pre_activated(conv: nn.Module, in_channels: int) -> nn.Sequential:
    """BN-ReLU-``conv``, the unit DiracNets chain without shortcuts."""
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(in_channels), relu=nn.ReLU(), conv=conv))


class DiracNet(nn.Module):
    """A DiracNet: chains of BN-ReLU-DiracConv3x3 with no skip connections, max-pooling between
    groups; the layouts are described in the module docstring. ``groups`` is an
    ``nn.Sequential`` of the groups (the pooling opens groups 2, 3, ...), so hooks on its
    children see each group's output.

    Args:
        depth: ``6n + 4`` for the ``cifar`` layout (10, 16, 22, 28, 34, 40, ...), 18 or 34 for
            ``imagenet``.
        widen_factor: k, the width multiplier; fractional for thinner nets (DiracNet-18-0.75).
        num_classes: size of the output.
        in_channels: channels of the input images.
        layout: ``cifar`` or ``imagenet``.
    """

    dirac = True  # PlainNet builds the same layout with ordinary convolutions

    def __init__(
        self,
        depth: int = 28,
        widen_factor: float = 1,
        num_classes: int = 10,
        in_channels: int = 3,
        layout: Layout = "cifar",
    ) -> None:
        super().__init__()
        check_choice("layout", layout, ("cifar", "imagenet"))
        check_positive("widen_factor", widen_factor)
        if layout == "cifar":
            if depth < 10 or (depth - 4) % 6 != 0:
                raise UserInputError(f"depth={depth} is not allowed; the cifar layout needs 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...)")
            convs_per_group = (2 * (depth - 4) // 6,) * 3
            widths = [round(w * widen_factor) for w in (16, 32, 64)]
            stem = OrderedDict(conv=nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False))
        else:
            check_choice("depth (imagenet layout)", depth, IMAGENET_CONVS_PER_GROUP)
            convs_per_group = IMAGENET_CONVS_PER_GROUP[depth]
            widths = [round(w * widen_factor) for w in (64, 128, 256, 512)]
            stem = OrderedDict(
                conv=nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                pool=nn.MaxPool2d(3, stride=2, padding=1),
            )
        self.stem = nn.Sequential(stem)
        groups = []
        fan_in = widths[0]
        for index, (width, count) in enumerate(zip(widths, convs_per_group)):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index > 0 else []
            for _ in range(count):
                layers.append(pre_activated(self._conv(fan_in, width), fan_in))
                fan_in = width
            groups.append(nn.Sequential(*layers))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(fan_in)
        self.classifier = nn.Linear(fan_in, num_classes)
        self._init_weights()

    def _conv(self, in_channels: int, out_channels: int) -> nn.Module:
        if self.dirac:
            return DiracConv2d(in_channels, out_channels)
        return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)

    def _init_weights(self) -> None:
        """He-normal ordinary convolutions (the stem; all of them in PlainNet) and a zero
        classifier bias; BatchNorm starts at PyTorch's (1, 0), a Dirac kernel's W at randn."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.bn(self.groups(self.stem(x))))
        return self.classifier(features.mean(dim=(2, 3)))


class PlainNet(DiracNet):
    """The layout of :class:`DiracNet` with ordinary 3x3 convolutions (He-initialised) in place
    of the Dirac-parameterised ones: the baseline that shows what the parameterisation buys."""

    dirac = False
