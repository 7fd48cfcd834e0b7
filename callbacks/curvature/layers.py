"""Which parameters a Fisher covers, grouped by the module that owns them, and how each kind of
layer turns its captured inputs and output gradients into per-example gradients.

Layer layout (the order of every flat vector and dense matrix in this package): layers in
``model.named_modules()`` order, each layer's own parameters in ``named_parameters`` order
(reparametrized layers: see below) and flattened row-major -- exactly
``torch.cat([p.reshape(-1) for p in model.parameters()])`` when every trainable parameter is covered. For Linear and Conv2d that is the weight as an
(out, in) matrix row-major, then the bias.

Kronecker layers (``nn.Linear``, and ``nn.Conv2d`` with ``groups=1`` and zero padding) expose
per-position inputs ``a`` of shape (N, T, in [+1]) and output gradients ``g`` of shape (N, T, out):
a Linear layer has one position per example (more if it is applied over extra dimensions, which
are weight-shared positions), a Conv2d layer one position per output pixel with ``a`` the unfolded
input patch (by kernel row, kernel column, then channel, so its weight matrix is
``weight.permute(0, 2, 3, 1).reshape(out, -1)``). The bias is a 1 appended to ``a``. The
per-example gradient of the weight-and-bias matrix is ``sum_t g_t a_t^T``; ``to_matrix`` and
``from_matrix`` convert between this matrix and the layout order. A Conv2d keeps its input rather
than its patches (:class:`ConvInputs`), and computes the statistics that need patches from it.

Every other module with parameters of its own (BatchNorm in eval mode, Embedding, LayerNorm,
grouped convolutions, ...) is a diagonal layer: its per-example gradients come from a vmapped
vector-Jacobian product of the module alone on its captured input, so it must map a batch of
examples to one tensor of per-example outputs.

Pruned and parametrized modules: the coordinates are always the tensors the module's forward
uses (its *effective* ``weight``), named ``<module>.weight``, whatever holds them: a plain
parameter, ``torch.nn.utils.prune``'s ``weight_orig`` times the buffer ``weight_mask``, or a
``torch.nn.utils.parametrize`` parametrization of ``parametrizations.weight.original``. A
reparametrized layer lists ``weight`` first and ``bias`` second (pruning re-registers the pruned
parameter last). The trainable leaf that holds each tensor (what an optimiser steps on, and whose
``.grad`` :meth:`PVector.from_model_grads` reads) is ``layer.parameters[name]``. Parametrizations
must keep the tensor's shape and have a single ``original``; they are supported on Kronecker
layers (whose statistics come from the captured inputs) but not by ``implicit`` Fishers or on
diagonal layers, which would need the forward with the effective tensor substituted.
"""

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize, prune

from framework.errors import UserInputError, check_choice

SUPPORTED = (
    "Kronecker factors: nn.Linear, nn.Conv2d (groups=1, zero padding); diagonal block: any other "
    "module with parameters of its own whose output is one tensor of per-example outputs "
    "(BatchNorm in eval mode, Embedding, LayerNorm, ...)"
)
UNSUPPORTED_TYPES = (nn.RNNBase, nn.MultiheadAttention)


@dataclass(frozen=True)
class LayerTensor:
    """One tensor a module's forward uses (``module.<attribute>``) and the trainable leaf holding
    it: the parameter itself (``storage="parameter"``), prune's ``<attribute>_orig``
    (``"pruned"``: the forward uses it times the mask) or a parametrization's ``original``
    (``"parametrized"``)."""

    module_name: str
    module: nn.Module
    attribute: str
    leaf: nn.Parameter
    storage: str

    @property
    def name(self) -> str:
        """The full name of the effective tensor, e.g. ``features.0.weight``."""
        return f"{self.module_name}.{self.attribute}" if self.module_name else self.attribute

    def value(self) -> torch.Tensor:
        """The effective tensor now (recomputed, not the one cached by prune's last forward)."""
        if self.storage == "pruned":
            return self.leaf * getattr(self.module, f"{self.attribute}_mask")
        return getattr(self.module, self.attribute)

    def substitutes(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Entries for ``functional_call`` on the module that make its forward use ``value`` as
        this tensor (under prune: ``value`` as the original and a mask of ones)."""
        if self.storage == "parametrized":
            raise UserInputError(
                f"{self.name!r} is parametrized (torch.nn.utils.parametrize): its forward cannot be evaluated at a given "
                f"effective tensor, so implicit Fishers and diagonal layers cannot cover it; supported: {SUPPORTED}"
            )
        if self.storage == "pruned":
            return {f"{self.attribute}_orig": value, f"{self.attribute}_mask": torch.ones_like(value)}
        return {self.attribute: value}


def module_tensors(module_name: str, module: nn.Module) -> list[LayerTensor]:
    """The trainable tensors ``module`` uses that it holds itself (not through a submodule), in
    layout order (see the module docstring)."""
    parametrized = parametrize.is_parametrized(module)
    if not module._parameters and not parametrized:  # containers and parameter-free modules, most of a model
        return []
    pruned = {hook._tensor_name for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)}
    tensors = []
    for p_name, p in module.named_parameters(recurse=False):
        attribute = p_name.removesuffix("_orig")
        if attribute in pruned:
            tensors.append(LayerTensor(module_name, module, attribute, p, "pruned"))
        else:
            tensors.append(LayerTensor(module_name, module, p_name, p, "parameter"))
    for attribute, parametrizations in module.parametrizations.items() if parametrized else ():
        tensor = LayerTensor(module_name, module, attribute, getattr(parametrizations, "original", None), "parametrized")
        if tensor.leaf is None or tensor.leaf.shape != tensor.value().shape:
            raise UserInputError(
                f"{tensor.name!r}: a parametrization must keep the tensor's shape and have one 'original' to be covered "
                f"by a Fisher (layers= can leave the module {module_name!r} out); supported: {SUPPORTED}"
            )
        tensors.append(tensor)
    tensors = [t for t in tensors if t.leaf.requires_grad]
    if any(t.storage != "parameter" for t in tensors):
        order = {"weight": 0, "bias": 1}
        tensors.sort(key=lambda t: order.get(t.attribute, 2))
    return tensors


@contextmanager
def restored_pruned_tensors(tensors: Sequence[LayerTensor]) -> Iterator[None]:
    """Put back the effective tensors that prune's forward pre-hook caches on the module, which a
    ``functional_call`` with substituted tensors leaves behind."""
    saved = [(t.module, t.attribute, getattr(t.module, t.attribute)) for t in tensors if t.storage == "pruned"]
    try:
        yield
    finally:
        for module, attribute, value in saved:
            setattr(module, attribute, value)


class Layer:
    """A module and the trainable tensors it uses, held by itself (see :class:`LayerTensor`)."""

    def __init__(self, name: str, module: nn.Module, tensors: list[LayerTensor]) -> None:
        self.name = name
        self.module = module
        self.tensors = tensors
        self.size = sum(t.leaf.numel() for t in tensors)

    @property
    def parameters(self) -> dict[str, nn.Parameter]:
        """The trainable leaves (what an optimiser updates) by effective tensor name, in layout order."""
        return {t.name: t.leaf for t in self.tensors}

    def captured_inputs(self, args: tuple, kwargs: dict) -> Any:
        """What the forward hook keeps of the module's inputs (detached)."""
        return tuple(a.detach() if torch.is_tensor(a) else a for a in args), kwargs

    def captured_output_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to the module's output, in the form this layer works with."""
        return gradients

    def per_example_gradients(self, inputs: Any, output_gradients: torch.Tensor) -> torch.Tensor:
        """Per-example gradients of this layer's parameters, shape (N, size), in layout order."""
        args, kwargs = inputs
        values = {t.attribute: t.value().detach() for t in self.tensors}
        in_dims = tuple(0 if torch.is_tensor(a) else None for a in args)

        def contracted_output(p: dict[str, torch.Tensor], example_args: tuple, g: torch.Tensor) -> torch.Tensor:
            batched = tuple(a.unsqueeze(0) if torch.is_tensor(a) else a for a in example_args)
            substituted = {key: v for t in self.tensors for key, v in t.substitutes(p[t.attribute]).items()}
            return (functional_call(self.module, substituted, batched, kwargs) * g.unsqueeze(0)).sum()

        with restored_pruned_tensors(self.tensors):
            gradients = vmap(grad(contracted_output), in_dims=(None, in_dims, 0))(values, args, output_gradients)
        return torch.cat([gradients[name].flatten(1) for name in values], dim=1)


class KroneckerLayer(Layer):
    """A layer whose per-example gradient is ``sum_t g_t a_t^T`` (see the module docstring)."""

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d, tensors: list[LayerTensor]) -> None:
        super().__init__(name, module, tensors)
        self.has_bias = any(t.attribute == "bias" for t in tensors)
        self.out_features = module.weight.shape[0]
        self.in_features = module.weight[0].numel()
        self.in_augmented = self.in_features + int(self.has_bias)

    def to_matrix(self, flat: torch.Tensor) -> torch.Tensor:
        """(..., size) in layout order -> (..., out, in [+1]) with the bias as the last column."""
        weight = self._weight_matrix(flat[..., : self.out_features * self.in_features])
        if not self.has_bias:
            return weight
        return torch.cat([weight, flat[..., self.out_features * self.in_features :, None]], dim=-1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`."""
        weight = self._weight_flat(matrix[..., : self.in_features])
        return torch.cat([weight, matrix[..., self.in_features]], dim=-1) if self.has_bias else weight

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """(..., out in) in layout order -> (..., out, in) with the columns in the captured inputs' order."""
        return weight.unflatten(-1, (self.out_features, self.in_features))

    def _weight_flat(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_weight_matrix`."""
        return matrix.flatten(-2)

    def matrix_positions(self) -> torch.Tensor:
        """For each layout position, its index in the (out, in [+1]) matrix flattened row-major."""
        return self.from_matrix(torch.arange(self.out_features * self.in_augmented).view(self.out_features, -1))

    def per_example_gradients(self, inputs: "CapturedInputs", output_gradients: torch.Tensor) -> torch.Tensor:
        """Also for output gradients with leading draw dimensions (..., N, T, out): (..., N, size)."""
        return self.from_matrix(weight_gradients(inputs, output_gradients))


def gram(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.T @ matrix`` for a (rows, n) matrix, by blocks of about 128 columns (at most 4)
    computing only the upper block triangle and mirroring it: (k + 1) / 2k of the flops, and the
    narrower products also run faster (measured about 2x on the 577-column patch matrices of a
    64-channel 3x3 convolution)."""
    n = matrix.shape[1]
    blocks = min(4, n // 128)
    if blocks < 2:
        return matrix.T @ matrix
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    result = matrix.new_empty(n, n)
    for start, stop in zip(edges[:-1], edges[1:]):
        rows = matrix[:, start:stop].T @ matrix[:, start:]
        result[start:stop, start:] = rows
        result[stop:, start:stop] = rows[:, stop - start :].T
    return result


def input_factor(inputs: "CapturedInputs") -> torch.Tensor:
    """KFAC's sum_n sum_t a_nt a_nt^T (in [+1], in [+1]) of captured inputs (N, T, in [+1])
    or of a Conv2d's :class:`ConvInputs`."""
    if isinstance(inputs, ConvInputs):
        return inputs.factor()
    return gram(inputs.reshape(-1, inputs.shape[-1]))


def weight_gradients(inputs: "CapturedInputs", output_gradients: torch.Tensor) -> torch.Tensor:
    """Per-example sum_t g_t a_t^T, (..., N, out, in [+1]), for output gradients (..., N, T, out)."""
    if isinstance(inputs, ConvInputs):
        return inputs.weight_gradients(output_gradients)
    return torch.einsum("...nto,nti->...noi", output_gradients, inputs)


def _positions(inputs: "CapturedInputs") -> int:
    """T, the positions per example of captured inputs."""
    return inputs.positions if isinstance(inputs, ConvInputs) else inputs.shape[1]


def output_factor(gradients: torch.Tensor) -> torch.Tensor:
    """KFAC's sum sum_t g_t g_t^T / T (out, out) of captured output gradients (..., T, out), summed over
    all leading dimensions (examples, draws). A Conv2d's gradients are a transposed view
    (positions contiguous, see :meth:`Conv2dLayer.captured_output_gradients`), which cannot be
    flattened to (positions, out) without an element-by-element copy, so they are multiplied per
    example (a batched product of the views) and summed."""
    positions, out = gradients.shape[-2:]
    if positions == 1 or gradients.stride(-1) == 1:
        flat = gradients.reshape(-1, out)
        return gram(flat) if positions == 1 else gram(flat) / positions
    per_example = gradients.reshape(-1, positions, out)
    return torch.bmm(per_example.transpose(1, 2), per_example).sum(0) / positions


CHUNK_ELEMENTS = 2**21
"""Per-example second moments are summed over chunks of examples whose per-example intermediates
(gradients, projected positions) stay within this many entries (8 MB in float32), so that their
memory does not grow with the batch: measured on CPU, EKFAC's scaling of a 128-channel 3x3 layer
at 8x8, batch 128, took 17 ms in chunks of 16 examples and 35 ms at once."""


def _features(inputs: "CapturedInputs") -> int:
    """in [+1], the entries per position of captured inputs."""
    return inputs.features if isinstance(inputs, ConvInputs) else inputs.shape[-1]


def _examples(inputs: "CapturedInputs", start: int, stop: int) -> "CapturedInputs":
    """The captured inputs of examples ``start`` to ``stop`` - 1."""
    return inputs.examples(start, stop) if isinstance(inputs, ConvInputs) else inputs[start:stop]


def _summed_over_examples(
    inputs: "CapturedInputs",
    gradients: torch.Tensor,
    per_example: int,
    moment: Callable[["CapturedInputs", torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``moment(inputs, gradients)`` of consecutive chunks of examples, summed; gradients
    (..., N, T, out), chunks of ``CHUNK_ELEMENTS // per_example`` examples (at least one)."""
    size = gradients.shape[-3]
    step = max(1, CHUNK_ELEMENTS // per_example)
    total = moment(_examples(inputs, 0, step), gradients[..., :step, :, :])
    for start in range(step, size, step):
        total += moment(_examples(inputs, start, start + step), gradients[..., start : start + step, :, :])
    return total


def second_moment(inputs: "CapturedInputs", output_gradients: torch.Tensor) -> torch.Tensor:
    """sum_n (dW_n)^2 of shape (out, in [+1]) for dW_n = sum_t g_nt a_nt^T, from captured inputs
    (N, T, in [+1]) and output gradients (N, T, out), or (D, N, T, out) for D draws, also summed
    over. With one position per example (Linear without weight sharing) dW_n is the outer product
    g_n a_n^T, so this is (sum_d g_d^2)^T (a^2) and no per-example gradient is formed; with several
    positions (Conv2d) each dW_n is a sum, formed before squaring (in chunks of examples, see
    ``CHUNK_ELEMENTS``). Applied to ``a Q_A`` and ``g Q_G`` it is EKFAC's scaling in the
    eigenbasis (Q_G^T dW_n Q_A)^2."""
    draws = output_gradients if output_gradients.dim() == 4 else output_gradients[None]
    if isinstance(inputs, torch.Tensor) and inputs.shape[1] == 1:
        return draws[:, :, 0].square().sum(0).T @ inputs[:, 0].square()

    def moment(part: "CapturedInputs", gradients: torch.Tensor) -> torch.Tensor:
        return weight_gradients(part, gradients).square_().sum((0, 1))  # squared in place: no second buffer

    return _summed_over_examples(inputs, draws, len(draws) * draws.shape[-1] * _features(inputs), moment)


def projected_second_moment(inputs: "CapturedInputs", gradients: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor) -> torch.Tensor:
    """sum_n sum_d (Q_G^T dW_nd Q_A)^2 for dW_nd = sum_t g_ndt a_nt^T (captured inputs, gradients
    (D, N, T, out)), in chunks of examples (see ``CHUNK_ELEMENTS``) and in the cheaper order:
    projecting the T positions (T (in^2 + out^2) per example; a Conv2d's patches by a convolution
    with Q_A's columns as filters) when T is at most out, as for Linear layers, projecting the
    per-example gradients (out in (in + out) per example) when T exceeds out, as in early
    convolutions."""
    if isinstance(inputs, torch.Tensor) and inputs.shape[1] == 1:  # outer products: no per-example intermediates
        return second_moment(inputs @ q_a, gradients @ q_g)
    draws, out, size = len(gradients), gradients.shape[-1], q_a.shape[1]
    if _positions(inputs) <= out:

        def moment(part: "CapturedInputs", part_gradients: torch.Tensor) -> torch.Tensor:
            projected = part.projected(q_a) if isinstance(part, ConvInputs) else part @ q_a
            return second_moment(projected, part_gradients @ q_g)

        return _summed_over_examples(inputs, gradients, (_positions(inputs) + draws * out) * size, moment)

    def moment(part: "CapturedInputs", part_gradients: torch.Tensor) -> torch.Tensor:
        return (q_g.T @ weight_gradients(part, part_gradients) @ q_a).square_().sum((0, 1))

    return _summed_over_examples(inputs, gradients, 2 * draws * out * size, moment)


class LinearLayer(KroneckerLayer):
    """``nn.Linear``; extra dimensions between batch and features are weight-shared positions."""

    def captured_inputs(self, args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0].detach()
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return F.pad(x, (0, 1), value=1.0) if self.has_bias else x

    def captured_output_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.reshape(gradients.shape[0], -1, gradients.shape[-1])


PATCHES_KEPT = 2**22
"""Above this many entries (16 MB in float32) a Conv2d's per-example weight gradients are computed
without forming its patches (:meth:`ConvInputs.weight_gradients`): measured on CPU 1.1-2.7x
faster from there for 3x3 kernels on 16x16 images and larger, up to 2.5x slower below."""


def _conv_geometry(conv: nn.Conv2d) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(left, right, top, bottom) zero padding, kernel size, stride and dilation of ``conv``."""
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    return (left, right, top, bottom), conv.kernel_size, conv.stride, conv.dilation


class ConvInputs:
    """What a Conv2d layer keeps of its input for the statistics, instead of its patches.

    The patch of output position t is the input at t + o_k for the K = kh kw kernel offsets o_k
    (entries by kernel row, kernel column, then channel; a 1 appended for the bias), so the
    patches repeat every input pixel up to K times. This keeps the input once: zero-padded as the
    convolution pads it, channels last, in a flat buffer of pixels x C in which each row and each
    image is followed by at least as many zeros as the kernel spans (and a zero tail after the
    last image). A shift of the flat buffer by an offset difference then pairs every pixel with
    the pixel at that offset and never with one of another row or image (such pairs meet a zero),
    which gives, for stride 1:

    - KFAC's input factor A = sum_n sum_t a_nt a_nt^T: its block (k, l) sums x(t + o_k) x(t + o_l)^T
      over the output positions t, i.e. over the pixels u of the window of offset k of
      x(u) x(u + o_l - o_k)^T. Blocks with the same offset difference share one product of two
      shifted slices of the buffer (all pixels) and differ by the few border rows and columns
      their windows leave out: (2 kh - 1)(2 kw - 1) / 2 + 1/2 products of (pixels x C) matrices
      instead of one (positions x K C) product, about K / 2 times fewer flops on large images;
    - per-example weight gradients sum_t g_t a_t^T: for each kernel offset, one batched product
      of the output gradients (spread to the buffer's row width with zeros) and a shifted slice;
    - patches projected on a basis Q_A (EKFAC's scaling): a convolution with Q_A's columns as
      filters.

    Strided convolutions use the patches, formed when asked for (:meth:`patches`).
    """

    def __init__(self, inputs: torch.Tensor, conv: nn.Conv2d, append_one: bool) -> None:
        (left, right, top, bottom), kernel, stride, dilation = _conv_geometry(conv)
        n, channels, height, width = inputs.shape
        (kh, kw), (dh, dw) = kernel, dilation
        self.padded_size = (top + height + bottom, left + width + right)
        self.kernel, self.stride, self.dilation, self.append_one = kernel, stride, dilation, append_one
        self.out_size = tuple(
            (size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(self.padded_size, kernel, stride, dilation)
        )
        self.data_rows, self.data_columns = (top, top + height), (left, left + width)
        # zeros after each row / image beyond the convolution's own padding, so that every gap is >= the kernel span
        rows = self.padded_size[0] + max(0, dh * (kh - 1) - top - bottom)
        columns = self.padded_size[1] + max(0, dw * (kw - 1) - left - right)
        self.buffer_size = (rows, columns)
        self.size, self.channels = n, channels
        tail = self._tail()
        flat = inputs.new_zeros(n * rows * columns + tail, channels)
        images = flat[: n * rows * columns].view(n, rows, columns, channels)
        images[:, top : top + height, left : left + width].copy_(inputs.permute(0, 2, 3, 1))
        self.flat = flat
        self._patches: torch.Tensor | None = None
        self.patches_large = n * self.positions * self.features > PATCHES_KEPT  # the whole batch's, kept by examples()

    def _tail(self) -> int:
        """Zero pixels after the last image, so that every shifted slice stays inside the buffer."""
        (kh, kw), (dh, dw), (rows, columns) = self.kernel, self.dilation, self.buffer_size
        return dh * (kh - 1) * columns + dw * (kw - 1) + columns

    @property
    def positions(self) -> int:
        """T, the number of output positions per example."""
        return self.out_size[0] * self.out_size[1]

    @property
    def features(self) -> int:
        """Entries of a patch: kh kw C, plus 1 with the bias."""
        return self.kernel[0] * self.kernel[1] * self.channels + int(self.append_one)

    def to(self, dtype: torch.dtype) -> "ConvInputs":
        """The same inputs with the buffer in ``dtype``."""
        if dtype == self.flat.dtype:
            return self
        converted = copy.copy(self)
        converted.flat, converted._patches = self.flat.to(dtype), None
        return converted

    def examples(self, start: int, stop: int) -> "ConvInputs":
        """The inputs of examples ``start`` to ``stop`` - 1: a view of the same buffer (the zero
        gaps after each image keep the shifts inside the chunk)."""
        stop = min(stop, self.size)
        part = copy.copy(self)
        part.flat = self.flat[start * self.buffer_size[0] * self.buffer_size[1] :]
        part.size = stop - start
        part._patches = None if self._patches is None else self._patches[start:stop]
        return part

    def _images(self) -> torch.Tensor:
        rows, columns = self.buffer_size
        return self.flat[: self.size * rows * columns].view(self.size, rows, columns, self.channels)

    def _view(self, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> torch.Tensor:
        """A view of the flat buffer in pixels: ``strides`` and ``offset`` count pixels."""
        c = self.channels
        return self.flat.as_strided((*shape, c), (*(s * c for s in strides), 1), self.flat.storage_offset() + offset * c)

    def patches(self) -> torch.Tensor:
        """(N, T, kh kw C [+1]): position t = output pixel in row-major order, entries by kernel
        row, kernel column, then channel, a 1 appended with the bias; one copy of a window view
        of the buffer, in which each window row's kw C entries are contiguous (without dilation),
        kept for later calls."""
        if self._patches is None:
            self._patches = self._form_patches()
        return self._patches

    def _form_patches(self) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        (out_h, out_w), (rows, columns) = self.out_size, self.buffer_size
        windows = self._view((self.size, out_h, out_w, kh, kw), (rows * columns, sh * columns, sw, dh * columns, dw), 0)
        size = kh * kw * self.channels
        patches = self.flat.new_empty(self.size, out_h, out_w, self.features)
        patches[..., :size].view(windows.shape).copy_(windows)
        if self.append_one:
            patches[..., size] = 1
        return patches.view(self.size, out_h * out_w, -1)

    def _kernel_shift(self, row: int, column: int) -> int:
        """Flat offset, in pixels, of kernel entry (row, column) from the window's origin."""
        return self.dilation[0] * row * self.buffer_size[1] + self.dilation[1] * column

    def _left_out(self, index: int, axis: int) -> list[int]:
        """The data rows (axis 0) or columns (axis 1) outside the window of kernel row or column
        ``index`` (stride 1): pixels a patch entry of that offset never sees."""
        start = self.dilation[axis] * index
        first, last = (self.data_rows, self.data_columns)[axis]
        return [line for line in range(first, last) if not start <= line < start + self.out_size[axis]]

    def shifted_factor_pays(self) -> bool:
        """Whether the shifted-product input factor (stride 1) costs fewer flops than the product
        of the patches (blocked, see :func:`gram`), which also has to form them, on a layer large
        enough for that to matter: measured on CPU, 2-4x faster from 8x8 images with 64-128
        channels up, slower for 16 channels at 8x8 (many narrow products)."""
        if self.stride != (1, 1) or self.kernel == (1, 1):
            return False
        (kh, kw), (rows, columns), c = self.kernel, self.buffer_size, self.channels
        shifts = kh * (2 * kw - 1) - (kw - 1)
        offset_flops = 2 * shifts * self.size * (rows * columns + 2 * (rows + columns)) * c * c
        patch_flops = 2 * self.size * self.positions * self.features**2 * (0.625 if self.features >= 256 else 1.0)
        return patch_flops > 4e8 and offset_flops < patch_flops

    def factor(self) -> torch.Tensor:
        """KFAC's sum_n sum_t a_nt a_nt^T (F, F): by shifted products where they pay (see
        :meth:`factor_by_shifts`), otherwise as the product of the patches."""
        if self.shifted_factor_pays():
            return self.factor_by_shifts()
        return gram(self.patches().reshape(-1, self.features))

    def factor_by_shifts(self) -> torch.Tensor:
        """KFAC's input factor from products of shifted slices of the buffer (stride 1 only; see
        the class docstring)."""
        if self.stride != (1, 1):
            raise ValueError(f"shifted products need stride 1, got {self.stride}")
        (kh, kw), (rows, columns), c, n = self.kernel, self.buffer_size, self.channels, self.size
        image, pixels = rows * columns, n * rows * columns
        offsets = [(i, j) for i in range(kh) for j in range(kw)]
        shifts = sorted({self._kernel_shift(*q) - self._kernel_shift(*p) for p in offsets for q in offsets if q >= p})

        def shifted_products(shape: tuple[int, ...], strides: tuple[int, ...], start: int) -> torch.Tensor:
            """For every shift s: sum over the pixels u of the view of x(u) x(u + s)^T, (shifts, C, C)."""
            first = self._view(shape, strides, start).reshape(-1, c)
            partners = torch.stack([self._view(shape, strides, start + s) for s in shifts], dim=-2).reshape(first.shape[0], -1)
            return (first.T @ partners).view(c, len(shifts), c).transpose(0, 1)

        # per shift: all pixels; then the pixels of each border row and column some window leaves out, and their crossings
        full = torch.stack([self.flat[:pixels].T @ self.flat[s : pixels + s] for s in shifts])
        edge_rows = sorted({r for i in range(kh) for r in self._left_out(i, 0)})
        edge_columns = sorted({col for j in range(kw) for col in self._left_out(j, 1)})
        row_terms = {r: shifted_products((n, columns), (image, 1), r * columns) for r in edge_rows}
        column_terms = {col: shifted_products((n, rows), (image, columns), col) for col in edge_columns}
        corner_terms = {(r, col): shifted_products((n,), (image,), r * columns + col) for r in row_terms for col in column_terms}
        k = len(offsets)
        factor = self.flat.new_empty(k, c, k, c)
        for p, (i, j) in enumerate(offsets):
            # blocks (p, q >= p) at their shifts: all pixels - left-out rows - left-out columns + their crossings
            index = torch.tensor([shifts.index(self._kernel_shift(*offsets[q]) - self._kernel_shift(i, j)) for q in range(p, k)])
            rows_out, columns_out = self._left_out(i, 0), self._left_out(j, 1)
            blocks = full[index]
            for r in rows_out:
                blocks -= row_terms[r][index]
            for col in columns_out:
                blocks -= column_terms[col][index]
            for r in rows_out:
                for col in columns_out:
                    blocks += corner_terms[r, col][index]
            factor[p, :, p:] = blocks.transpose(0, 1)
            factor[p + 1 :, :, p] = blocks[1:].transpose(1, 2)
        factor = factor.view(k * c, k * c)
        if not self.append_one:
            return factor
        (dh, dw), (out_h, out_w) = self.dilation, self.out_size
        sums = self._images().sum(0)
        window_sums = torch.cat([sums[dh * i : dh * i + out_h, dw * j : dw * j + out_w].sum((0, 1)) for i, j in offsets])
        augmented = self.flat.new_empty(k * c + 1, k * c + 1)
        augmented[: k * c, : k * c] = factor
        augmented[: k * c, -1] = augmented[-1, : k * c] = window_sums
        augmented[-1, -1] = n * self.positions
        return augmented

    def weight_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        """Per-example sum_t g_t a_t^T, (..., N, out, F), for output gradients (..., N, T, out)
        (leading dimensions: draws). Without forming the patches, for each kernel offset one
        batched product of the gradients, spread to the buffer's row width with zeros, and a
        shifted slice of the buffer (:meth:`weight_gradients_by_shifts`), when the batch's patches
        would be large (more than ``PATCHES_KEPT`` entries) and the spread adds at most 20% to the
        products (images of 16 pixels or more across, for a 3x3 kernel); otherwise, and for other
        strides, from the patches (``scripts/bench/conv_statistics.py`` measures both)."""
        if self._patches is not None or not self.shifted_weight_gradients_pay():
            return weight_gradients(self.patches(), gradients)
        return self.weight_gradients_by_shifts(gradients)

    def shifted_weight_gradients_pay(self) -> bool:
        """Whether :meth:`weight_gradients` takes shifted slices when no patches exist (see there)."""
        spread_width = self.buffer_size[1] / self.out_size[1]
        return self.stride == (1, 1) and self.patches_large and spread_width <= 1.2

    def weight_gradients_by_shifts(self, gradients: torch.Tensor) -> torch.Tensor:
        """Per-example weight gradients from shifted slices of the buffer (stride 1 only; see
        :meth:`weight_gradients`)."""
        if self.stride != (1, 1):
            raise ValueError(f"shifted slices need stride 1, got {self.stride}")
        *lead, n, _, out = gradients.shape
        (kh, kw), (out_h, out_w), (rows, columns), c = self.kernel, self.out_size, self.buffer_size, self.channels
        spread = gradients.new_zeros(n, *lead, out, out_h, columns)
        spread[..., :out_w] = gradients.movedim(-3, 0).transpose(-1, -2).unflatten(-1, (out_h, out_w))
        spread = spread.view(n, -1, out_h * columns)
        result = gradients.new_empty(n, spread.shape[1], self.features)
        per_offset = result[..., : kh * kw * c].view(n, -1, kh * kw, c)
        for k, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw)):
            window = self._view((n, out_h * columns), (rows * columns, 1), self._kernel_shift(i, j))
            per_offset[:, :, k] = torch.bmm(spread, window)
        if self.append_one:
            result[..., -1] = gradients.sum(-2).movedim(-2, 0).reshape(n, -1)
        return result.view(n, *lead, out, self.features).movedim(0, -3)

    def projected(self, basis: torch.Tensor) -> torch.Tensor:
        """The patches times ``basis`` (F, F'), (N, T, F'): a convolution of the input with the
        basis's columns as filters (its bias row as their biases), no patches formed."""
        (kh, kw), c = self.kernel, self.channels
        size = kh * kw * c
        filters = basis[:size].T.reshape(-1, kh, kw, c).permute(0, 3, 1, 2)
        padded_h, padded_w = self.padded_size
        inputs = self._images()[:, :padded_h, :padded_w].permute(0, 3, 1, 2)
        bias = basis[size] if self.append_one else None
        projected = F.conv2d(inputs, filters, bias, stride=self.stride, dilation=self.dilation)
        return projected.permute(0, 2, 3, 1).reshape(self.size, self.positions, -1)


CapturedInputs = torch.Tensor | ConvInputs  # a Kronecker layer's captured input: (N, T, in [+1]) or a Conv2d's


def conv_patches(inputs: torch.Tensor, conv: nn.Conv2d, append_one: bool = False) -> torch.Tensor:
    """The input patches of ``conv`` (groups=1, zero padding), (N, T, kh kw C [+1]): position t
    = output pixel in row-major order, entries by kernel row, kernel column, then channel (the
    weight as ``weight.permute(0, 2, 3, 1).reshape(out, -1)``), a 1 appended if ``append_one``
    (the bias). See :meth:`ConvInputs.patches`."""
    return ConvInputs(inputs, conv, append_one).patches()


PATCH_ORDER = "kernel row, kernel column, channel"  # of a Conv2d patch's entries; F.unfold's is channel first


def channel_major_index(channels: int, kernel_size: tuple[int, int], has_bias: bool) -> torch.Tensor:
    """For each entry of a :func:`conv_patches` patch, its index in ``F.unfold``'s channel-major
    order (the bias's 1 last in both): re-indexes a factor or basis from one order to the other."""
    kh, kw = kernel_size
    index = torch.arange(channels * kh * kw).view(channels, kh, kw).permute(1, 2, 0).flatten()
    return torch.cat([index, torch.tensor([index.numel()])]) if has_bias else index


class Conv2dLayer(KroneckerLayer):
    """``nn.Conv2d`` by unfolded patches: one position per output pixel, input columns in the
    patches' order (kernel row, kernel column, channel), so the weight matrix is
    ``weight.permute(0, 2, 3, 1).reshape(out, -1)``."""

    def captured_inputs(self, args: tuple, kwargs: dict) -> "ConvInputs":
        return ConvInputs(args[0].detach(), self.module, self.has_bias)

    def captured_output_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.flatten(2).transpose(1, 2)

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        channels, (kh, kw) = self.module.in_channels, self.module.kernel_size
        return weight.unflatten(-1, (self.out_features, channels, kh, kw)).movedim(-3, -1).flatten(-3)

    def _weight_flat(self, matrix: torch.Tensor) -> torch.Tensor:
        channels, (kh, kw) = self.module.in_channels, self.module.kernel_size
        return matrix.unflatten(-1, (kh, kw, channels)).movedim(-1, -3).flatten(-4)


def has_kronecker_form(module: nn.Module, tensors: list[LayerTensor] | None = None) -> bool:
    """Whether ``module`` is a Kronecker layer: ``nn.Linear``, or ``nn.Conv2d`` with groups=1 and
    zero padding, with a trainable weight (also when pruned or parametrized); ``tensors``: its
    :func:`module_tensors` if already known."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    if not any(t.attribute == "weight" for t in (module_tensors("", module) if tensors is None else tensors)):
        return False
    return isinstance(module, nn.Linear) or (module.groups == 1 and module.padding_mode == "zeros")


def _layer(name: str, module: nn.Module, tensors: list[LayerTensor]) -> Layer:
    if isinstance(module, UNSUPPORTED_TYPES):
        raise UserInputError(f"layer {name!r} of type {type(module).__name__} cannot be handled; supported: {SUPPORTED}")
    if not has_kronecker_form(module, tensors):
        for tensor in tensors:  # refuse at construction what per_example_gradients cannot evaluate
            tensor.substitutes(tensor.value())
        return Layer(name, module, tensors)
    return LinearLayer(name, module, tensors) if isinstance(module, nn.Linear) else Conv2dLayer(name, module, tensors)


def _parametrization_modules(modules: dict[str, nn.Module]) -> set[str]:
    """Names, among a model's ``modules`` (by name), of those that implement parametrizations
    (not layers of the model)."""
    containers = [
        f"{name}.parametrizations" if name else "parametrizations"
        for name, module in modules.items()
        if parametrize.is_parametrized(module)
    ]
    if not containers:
        return set()
    return {name for name in modules if any(name == c or name.startswith(c + ".") for c in containers)}


class ParameterLayout:
    """The layers a Fisher covers, in layout order (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        modules = dict(model.named_modules())
        internal = _parametrization_modules(modules)
        owned = {name: module_tensors(name, module) for name, module in modules.items() if name not in internal}
        if layers is None:
            layers = [name for name, params in owned.items() if params]
        for name in layers:
            check_choice("layers", name, owned)
            if not owned[name]:
                raise UserInputError(
                    f"layer {name!r} of type {type(modules[name]).__name__} has no trainable parameters of its own; "
                    f"supported: {SUPPORTED}"
                )
        chosen = set(layers)
        self.model = model
        self.layers = {
            name: _layer(name, modules[name], params) for name, params in owned.items() if name in chosen
        }
        self.size = sum(layer.size for layer in self.layers.values())

    def tensors(self) -> list[LayerTensor]:
        """The covered tensors in layout order."""
        return [t for layer in self.layers.values() for t in layer.tensors]

    def parameters(self) -> dict[str, nn.Parameter]:
        """The trainable leaves by effective tensor name, in layout order (see the module docstring)."""
        return {t.name: t.leaf for t in self.tensors()}

    def check_examples_independent(self) -> None:
        """Refuse BatchNorm in training mode: it mixes examples, so per-example gradients do not exist."""
        for name, layer in self.layers.items():
            if isinstance(layer.module, nn.modules.batchnorm._BatchNorm) and layer.module.training:
                raise UserInputError(
                    f"layer {name!r} ({type(layer.module).__name__}) is in training mode, where it mixes the examples of a "
                    "batch; call model.eval() before computing a Fisher"
                )
