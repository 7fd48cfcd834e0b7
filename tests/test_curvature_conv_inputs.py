"""A Conv2d layer's captured input without its patches (:class:`ConvInputs`): the input factor
from shifted products, the per-example weight gradients from shifted slices and the patches
projected by a convolution, each against the same quantity computed from the patches, in
float64, over kernel sizes, paddings (none, same, asymmetric, larger than the kernel), dilations,
strides, rectangular images and with or without bias."""

import pytest
import torch
from torch import nn

from callbacks.curvature import layers
from callbacks.curvature.layers import ConvInputs, input_factor, projected_second_moment, second_moment, weight_gradients

DOUBLE = torch.float64

CONVS = {
    "3x3-same": lambda: nn.Conv2d(3, 4, 3, padding=1),
    "3x3-same-no-bias": lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False),
    "3x3-valid": lambda: nn.Conv2d(2, 3, 3),
    "5x5-pad-1": lambda: nn.Conv2d(2, 3, 5, padding=1),
    "rect-kernel-pad": lambda: nn.Conv2d(2, 3, (2, 3), padding=(1, 0)),
    "dilated-same": lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2),
    "even-same": lambda: nn.Conv2d(2, 3, 4, padding="same"),
    "pad-exceeds-kernel": lambda: nn.Conv2d(2, 3, 3, padding=3),
    "1x1": lambda: nn.Conv2d(3, 2, 1),
    "strided": lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
    "strided-dilated": lambda: nn.Conv2d(2, 3, (3, 2), stride=2, dilation=(1, 2)),
}


def captured(name: str, size: tuple[int, int] = (6, 7), examples: int = 3) -> tuple[nn.Conv2d, ConvInputs, torch.Tensor]:
    torch.manual_seed(0)
    conv = CONVS[name]().double()
    inputs = torch.randn(examples, conv.in_channels, *size, dtype=DOUBLE)
    return conv, ConvInputs(inputs, conv, append_one=conv.bias is not None), inputs


def output_gradients(conv: nn.Conv2d, inputs: torch.Tensor, draws: int = 2) -> torch.Tensor:
    """(D, N, T, out) as the capture gives them: a transposed view of (D, N, out, T) storage."""
    storage = torch.randn(draws, *conv(inputs).flatten(2).shape, dtype=DOUBLE)
    return storage.transpose(2, 3)


@pytest.mark.parametrize("name", [n for n in CONVS if "strided" not in n])
@pytest.mark.parametrize("size", [(6, 7), (5, 3)], ids=["6x7", "5x3"])
def test_factor_by_shifts_equals_the_product_of_the_patches(name, size):
    conv, conv_inputs, _ = captured(name, size)
    patches = conv_inputs.patches().reshape(-1, conv_inputs.features)
    torch.testing.assert_close(conv_inputs.factor_by_shifts(), patches.T @ patches, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["3x3-same", "even-same", "pad-exceeds-kernel"])
def test_factor_by_shifts_on_one_pixel_images(name):
    """Every window leaves out every border: the corrections are the whole product."""
    test_factor_by_shifts_equals_the_product_of_the_patches(name, (1, 1))


def test_shifted_paths_refuse_strides():
    conv, conv_inputs, inputs = captured("strided")
    with pytest.raises(ValueError, match="stride 1"):
        conv_inputs.factor_by_shifts()
    with pytest.raises(ValueError, match="stride 1"):
        conv_inputs.weight_gradients_by_shifts(output_gradients(conv, inputs))


@pytest.mark.parametrize("size", [(4, 4), (32, 32)], ids=["small: patches", "large: shifts"])
def test_factor_takes_either_path_and_agrees(size):
    conv = nn.Conv2d(32, 32, 3, padding=1).double()
    torch.manual_seed(0)
    conv_inputs = ConvInputs(torch.randn(8, 32, *size, dtype=DOUBLE), conv, append_one=True)
    assert conv_inputs.shifted_factor_pays() == (size == (32, 32))
    patches = conv_inputs.patches().reshape(-1, conv_inputs.features)
    torch.testing.assert_close(input_factor(conv_inputs), patches.T @ patches, rtol=1e-12, atol=1e-10)


@pytest.fixture(params=["shifted slices", "patches"])
def weight_gradient_path(request, monkeypatch):
    """Per-example weight gradients without patches (every size above 0 entries), or from them."""
    if request.param == "shifted slices":
        monkeypatch.setattr(layers, "PATCHES_KEPT", 0)
    return request.param


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("name", list(CONVS))
def test_weight_gradients_equal_patch_sums(name, weight_gradient_path):
    conv, conv_inputs, inputs = captured(name)
    gradients = output_gradients(conv, inputs)
    expected = torch.einsum("dnto,nti->dnoi", gradients, ConvInputs(inputs, conv, conv.bias is not None).patches())
    torch.testing.assert_close(weight_gradients(conv_inputs, gradients), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight_gradients(conv_inputs, gradients[0]), expected[0], rtol=1e-12, atol=1e-12)
    # the weight gradient of sum_t g_t . conv(x)_t, summed over examples, is what autograd gives
    weight = torch.autograd.grad((conv(inputs).flatten(2) * gradients[0].transpose(1, 2)).sum(), conv.weight)[0]
    matrix = weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    torch.testing.assert_close(expected[0].sum(0)[:, : matrix.shape[1]], matrix)


@pytest.mark.parametrize("name", list(CONVS))
def test_projection_by_convolution_equals_projected_patches(name):
    _, conv_inputs, _ = captured(name)
    basis = torch.linalg.qr(torch.randn(conv_inputs.features, conv_inputs.features, dtype=DOUBLE))[0]
    torch.testing.assert_close(conv_inputs.projected(basis), conv_inputs.patches() @ basis, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["3x3-same", "3x3-valid", "strided"])
@pytest.mark.parametrize("small", [False, True], ids=["T>out: per-example order", "T<=out: positions order"])
def test_second_moments_equal_those_of_the_patches(name, small, weight_gradient_path):
    conv, conv_inputs, inputs = captured(name, {"3x3-same": (2, 2), "3x3-valid": (3, 3), "strided": (2, 2)}[name] if small else (6, 7))
    assert (conv_inputs.positions <= conv.out_channels) == small
    gradients = output_gradients(conv, inputs)
    patches = ConvInputs(inputs, conv, conv.bias is not None).patches()  # another object: conv_inputs forms none
    torch.testing.assert_close(second_moment(conv_inputs, gradients), second_moment(patches, gradients), rtol=1e-12, atol=1e-12)
    q_a = torch.linalg.qr(torch.randn(conv_inputs.features, conv_inputs.features, dtype=DOUBLE))[0]
    q_g = torch.linalg.qr(torch.randn(conv.out_channels, conv.out_channels, dtype=DOUBLE))[0]
    brute = (q_g.T @ torch.einsum("dnto,nti->dnoi", gradients, patches) @ q_a).square().sum((0, 1))
    torch.testing.assert_close(projected_second_moment(conv_inputs, gradients, q_a, q_g), brute, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("small", [False, True], ids=["T>out", "T<=out"])
def test_second_moments_in_chunks_of_one_example_equal_all_at_once(small, weight_gradient_path, monkeypatch):
    conv, conv_inputs, inputs = captured("3x3-same", (2, 2) if small else (6, 7), examples=5)
    gradients = output_gradients(conv, inputs)
    q_a = torch.linalg.qr(torch.randn(conv_inputs.features, conv_inputs.features, dtype=DOUBLE))[0]
    q_g = torch.linalg.qr(torch.randn(conv.out_channels, conv.out_channels, dtype=DOUBLE))[0]
    whole = second_moment(conv_inputs, gradients), projected_second_moment(conv_inputs, gradients, q_a, q_g)
    monkeypatch.setattr(layers, "CHUNK_ELEMENTS", 1)
    chunked = second_moment(conv_inputs, gradients), projected_second_moment(conv_inputs, gradients, q_a, q_g)
    for one, other in zip(whole, chunked):
        torch.testing.assert_close(one, other, rtol=1e-12, atol=1e-12)


def test_large_inputs_form_no_patches():
    conv = nn.Conv2d(16, 8, 3, padding=1)
    conv_inputs = ConvInputs(torch.randn(64, 16, 32, 32), conv, append_one=True)
    assert conv_inputs.size * conv_inputs.positions * conv_inputs.features > layers.PATCHES_KEPT
    gradients = torch.randn(1, 64, 8, 1024).transpose(2, 3)
    second_moment(conv_inputs, gradients)
    input_factor(conv_inputs)
    basis = torch.eye(conv_inputs.features)
    projected_second_moment(conv_inputs, gradients, basis, torch.eye(8))
    assert conv_inputs._patches is None


def test_conversion_keeps_the_geometry():
    _, conv_inputs, _ = captured("3x3-same")
    single = conv_inputs.to(torch.float32)
    assert single.flat.dtype == torch.float32 and conv_inputs.flat.dtype == DOUBLE
    torch.testing.assert_close(single.patches(), conv_inputs.patches().float())
    assert conv_inputs.to(DOUBLE) is conv_inputs
