"""Every architecture: output shape, gradients reach every parameter, no NaNs, state_dict round
trip; plus what is specific to each."""

import pytest
import torch
from torch import nn

from framework.errors import UserInputError
from framework.models import MLP, SmallCNN, WideResNet
from framework.testing.smoke import check_architecture

# (factory, input shape) for every architecture of framework.models.
ARCHITECTURES = {
    "mlp": (lambda: MLP(64, 10, hidden=(16, 16)), (4, 1, 8, 8)),
    "mlp_linear_no_bias": (lambda: MLP(12, 3, hidden=(5,), activation="identity", bias=False), (4, 12)),
    "small_cnn": (lambda: SmallCNN(1, 10, channels=(4, 8)), (4, 1, 8, 8)),
    "wrn_10_1_digits": (lambda: WideResNet(10, 1, num_classes=10, in_channels=1), (4, 1, 8, 8)),
    "wrn_16_2_cifar": (lambda: WideResNet(16, 2, num_classes=100, in_channels=3, dropout=0.3), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_smoke(name, tmp_path):
    factory, shape = ARCHITECTURES[name]
    with torch.no_grad():
        expected = factory()(torch.zeros(shape)).shape
    assert expected[0] == shape[0] and len(expected) == 2
    check_architecture(factory, torch.randn(shape), tuple(expected), tmp_path)


def test_wide_resnet_layout():
    model = WideResNet(depth=28, widen_factor=10, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 3 * 4 * 2  # stem + 3 groups x 4 blocks x 2 convs: depth 28 = 6*4+4
    assert {c.out_channels for c in convs} == {16, 160, 320, 640}
    shortcuts = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(shortcuts) == 3  # one where each group changes width (and, for 2 and 3, resolution)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(36.5e6, rel=0.01)  # the paper's 36.5M


def test_wide_resnet_resolution_and_identity_shortcuts():
    model = WideResNet(depth=16, widen_factor=1, num_classes=10)
    features = model.groups(model.stem(torch.randn(1, 3, 32, 32)))
    assert features.shape == (1, 64, 8, 8)
    first_group = model.groups[0]
    assert first_group[0].shortcut is None  # 16 -> 16 channels at stride 1 with k = 1: identity


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: WideResNet(depth=12), "6n+4"),
        (lambda: WideResNet(widen_factor=0), "widen_factor=0"),
        (lambda: WideResNet(dropout=1.0), "dropout=1.0"),
        (lambda: MLP(activation="sigmoid"), "activation='sigmoid'"),
        (lambda: SmallCNN(channels=(4, 0)), "must be > 0"),
    ],
)
def test_bad_hyperparameters_are_refused(factory, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace("+", r"\+")):
        factory()
