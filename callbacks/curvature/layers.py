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
``from_matrix`` convert between this matrix and the layout order.

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

from collections.abc import Iterator, Sequence
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
    pruned = {hook._tensor_name for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)}
    tensors = []
    for p_name, p in module.named_parameters(recurse=False):
        attribute = p_name.removesuffix("_orig")
        if attribute in pruned:
            tensors.append(LayerTensor(module_name, module, attribute, p, "pruned"))
        else:
            tensors.append(LayerTensor(module_name, module, p_name, p, "parameter"))
    parametrized = module.parametrizations.items() if parametrize.is_parametrized(module) else ()
    for attribute, parametrizations in parametrized:
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

    def per_example_gradients(self, inputs: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
        """Also for output gradients with leading draw dimensions (..., N, T, out): (..., N, size)."""
        return self.from_matrix(torch.einsum("...nto,nti->...noi", output_gradients, inputs))


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


def input_factor(inputs: torch.Tensor) -> torch.Tensor:
    """KFAC's sum_n sum_t a_nt a_nt^T (in [+1], in [+1]) of captured inputs (N, T, in [+1])."""
    return gram(inputs.reshape(-1, inputs.shape[-1]))


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


def second_moment(inputs: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
    """sum_n (dW_n)^2 of shape (out, in [+1]) for dW_n = sum_t g_nt a_nt^T, from inputs (N, T, in [+1])
    and output gradients (N, T, out), or (D, N, T, out) for D draws, also summed over. With one
    position per example (Linear without weight sharing) dW_n is the outer product g_n a_n^T, so
    this is (sum_d g_d^2)^T (a^2) and no per-example gradient is formed; with several positions
    (Conv2d) each dW_n is a sum, formed before squaring. Applied to ``a Q_A`` and ``g Q_G`` it is
    EKFAC's scaling in the eigenbasis (Q_G^T dW_n Q_A)^2."""
    draws = output_gradients if output_gradients.dim() == 4 else output_gradients[None]
    if inputs.shape[1] == 1:
        return draws[:, :, 0].square().sum(0).T @ inputs[:, 0].square()
    return torch.einsum("dnto,nti->dnoi", draws, inputs).square_().sum((0, 1))  # squared in place: no second buffer


def projected_second_moment(inputs: torch.Tensor, gradients: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor) -> torch.Tensor:
    """sum_n sum_d (Q_G^T dW_nd Q_A)^2 for dW_nd = sum_t g_ndt a_nt^T (inputs (N, T, in [+1]),
    gradients (D, N, T, out)), in the cheaper order: projecting the T positions (T (in^2 + out^2)
    per example) for Linear layers, projecting the per-example gradients (out in (in + out) per
    example) when T exceeds out, as in convolutions."""
    if inputs.shape[1] <= gradients.shape[-1]:
        return second_moment(inputs @ q_a, gradients @ q_g)
    per_example = torch.einsum("dnto,nti->dnoi", gradients, inputs)
    return (q_g.T @ per_example @ q_a).square_().sum((0, 1))


class LinearLayer(KroneckerLayer):
    """``nn.Linear``; extra dimensions between batch and features are weight-shared positions."""

    def captured_inputs(self, args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0].detach()
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return F.pad(x, (0, 1), value=1.0) if self.has_bias else x

    def captured_output_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.reshape(gradients.shape[0], -1, gradients.shape[-1])


def conv_patches(inputs: torch.Tensor, conv: nn.Conv2d, append_one: bool = False) -> torch.Tensor:
    """The input patches of ``conv`` (groups=1, zero padding), (N, T, kh kw C [+1]): position t
    = output pixel in row-major order, entries by kernel row, kernel column, then channel (the
    weight as ``weight.permute(0, 2, 3, 1).reshape(out, -1)``), a 1 appended if ``append_one``
    (the bias). One copy of a window view of the channels-last padded input, in which each
    window row's kw C entries are contiguous (without dilation): measured 2.7-4x faster than the
    channel-major order of ``F.unfold`` for 8-64 channels, whose contiguous runs are kw long."""
    x = F.pad(inputs, conv._reversed_padding_repeated_twice).permute(0, 2, 3, 1).contiguous()
    n, height, width, channels = x.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_height, out_width = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    row, pixel = width * channels, channels
    windows = x.as_strided(
        (n, out_height, out_width, kh, kw, channels),
        (height * row, sh * row, sw * pixel, dh * row, dw * pixel, 1),
        x.storage_offset(),
    )
    size = kh * kw * channels
    patches = x.new_empty(n, out_height, out_width, size + int(append_one))
    patches[..., :size].view(windows.shape).copy_(windows)
    if append_one:
        patches[..., size] = 1
    return patches.view(n, out_height * out_width, -1)


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

    def captured_inputs(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return conv_patches(args[0].detach(), self.module, self.has_bias)

    def captured_output_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.flatten(2).transpose(1, 2)

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        channels, (kh, kw) = self.module.in_channels, self.module.kernel_size
        return weight.unflatten(-1, (self.out_features, channels, kh, kw)).movedim(-3, -1).flatten(-3)

    def _weight_flat(self, matrix: torch.Tensor) -> torch.Tensor:
        channels, (kh, kw) = self.module.in_channels, self.module.kernel_size
        return matrix.unflatten(-1, (kh, kw, channels)).movedim(-1, -3).flatten(-4)


def has_kronecker_form(module: nn.Module) -> bool:
    """Whether ``module`` is a Kronecker layer: ``nn.Linear``, or ``nn.Conv2d`` with groups=1 and
    zero padding, with a trainable weight (also when pruned or parametrized)."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    if not any(t.attribute == "weight" for t in module_tensors("", module)):
        return False
    return isinstance(module, nn.Linear) or (module.groups == 1 and module.padding_mode == "zeros")


def _layer(name: str, module: nn.Module, tensors: list[LayerTensor]) -> Layer:
    if isinstance(module, UNSUPPORTED_TYPES):
        raise UserInputError(f"layer {name!r} of type {type(module).__name__} cannot be handled; supported: {SUPPORTED}")
    if not has_kronecker_form(module):
        for tensor in tensors:  # refuse at construction what per_example_gradients cannot evaluate
            tensor.substitutes(tensor.value())
        return Layer(name, module, tensors)
    return LinearLayer(name, module, tensors) if isinstance(module, nn.Linear) else Conv2dLayer(name, module, tensors)


def _parametrization_modules(model: nn.Module) -> set[str]:
    """Names of the modules that implement parametrizations (not layers of the model)."""
    containers = [
        f"{name}.parametrizations" if name else "parametrizations"
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module)
    ]
    return {name for name, _ in model.named_modules() if any(name == c or name.startswith(c + ".") for c in containers)}


class ParameterLayout:
    """The layers a Fisher covers, in layout order (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        internal = _parametrization_modules(model)
        owned = {name: module_tensors(name, module) for name, module in model.named_modules() if name not in internal}
        if layers is None:
            layers = [name for name, params in owned.items() if params]
        for name in layers:
            check_choice("layers", name, owned)
            if not owned[name]:
                module = model.get_submodule(name)
                raise UserInputError(
                    f"layer {name!r} of type {type(module).__name__} has no trainable parameters of its own; "
                    f"supported: {SUPPORTED}"
                )
        chosen = set(layers)
        self.model = model
        self.layers = {
            name: _layer(name, model.get_submodule(name), params) for name, params in owned.items() if name in chosen
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
