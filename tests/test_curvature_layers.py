"""The capture primitives of callbacks.curvature.layers against their plain definitions, in
float64: Conv2d patch extraction against ``F.unfold``, the blocked symmetric product against
``X^T X``, and the KFAC factors of both gradient layouts against flattened sums."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.curvature.layers import channel_major_index, conv_patches, gram, input_factor, output_factor

DOUBLE = torch.float64


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.Conv2d(2, 4, (2, 3), stride=(2, 1), padding=(1, 0)),
        nn.Conv2d(2, 3, 3, padding="same", dilation=2),
        nn.Conv2d(2, 3, (3, 2), stride=2, dilation=(1, 2)),
        nn.Conv2d(2, 3, 1, stride=2),
        nn.Conv2d(1, 2, 4),
    ],
    ids=["3x3-same", "no-bias", "rect-stride", "dilated-same", "strided-dilated", "1x1-strided", "covering"],
)
def test_conv_patches_equal_unfold_kernel_major_with_a_one_appended(conv):
    torch.manual_seed(0)
    inputs = torch.randn(3, conv.in_channels, 4, 4 if conv.kernel_size == (4, 4) else 7, dtype=DOUBLE)
    padded = F.pad(inputs, conv._reversed_padding_repeated_twice)
    unfolded = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride).transpose(1, 2)
    # F.unfold's entries are channel-major; ours by kernel row, kernel column, then channel
    expected = unfolded[..., channel_major_index(conv.in_channels, conv.kernel_size, has_bias=False)]
    torch.testing.assert_close(conv_patches(inputs, conv), expected, rtol=0, atol=0)
    with_one = conv_patches(inputs, conv, append_one=True)
    ones = torch.ones(*expected.shape[:2], 1, dtype=DOUBLE)
    torch.testing.assert_close(with_one, torch.cat([expected, ones], 2), rtol=0, atol=0)
    # the patches are what the convolution multiplies by its weight
    output = conv.double()(inputs).flatten(2).transpose(1, 2)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    linear = with_one @ torch.cat([weight, conv.bias[:, None]], 1).T if conv.bias is not None else expected @ weight.T
    torch.testing.assert_close(linear, output)


@pytest.mark.parametrize("columns", [5, 255, 256, 300, 577])
def test_blocked_gram_equals_the_full_product(columns):
    torch.manual_seed(0)
    matrix = torch.randn(40, columns, dtype=DOUBLE)
    torch.testing.assert_close(gram(matrix), matrix.T @ matrix, rtol=1e-12, atol=1e-12)


def test_factors_of_linear_and_conv_layouts_equal_flattened_sums():
    """Linear gradients (D, N, 1, out) are contiguous; a Conv2d's are a (D, N, T, out) view of
    (D, N, out, T) storage. Both give sum g g^T / T; inputs give sum a a^T."""
    torch.manual_seed(0)
    storage = torch.randn(2, 3, 4, 6, dtype=DOUBLE)  # D, N, out, T
    conv_gradients = storage.transpose(2, 3)
    assert conv_gradients.stride(-1) != 1
    flat = conv_gradients.reshape(-1, 4)
    torch.testing.assert_close(output_factor(conv_gradients), flat.T @ flat / 6)
    linear_gradients = torch.randn(2, 3, 1, 300, dtype=DOUBLE)  # wide enough for the blocked product
    flat = linear_gradients.reshape(-1, 300)
    torch.testing.assert_close(output_factor(linear_gradients), flat.T @ flat)
    inputs = torch.randn(3, 6, 5, dtype=DOUBLE)
    torch.testing.assert_close(input_factor(inputs), torch.einsum("nti,ntj->ij", inputs, inputs))
