"""Which parameters a Fisher covers, grouped by the module that owns them, and how each kind of
layer turns its captured inputs and output gradients into per-example gradients.

Layer layout (the order of every flat vector and dense matrix in this package): layers in
``model.named_modules()`` order, each layer's own parameters in ``named_parameters`` order and
flattened row-major -- exactly ``torch.cat([p.reshape(-1) for p in model.parameters()])`` when
every trainable parameter is covered. For Linear and Conv2d that is the weight as an
(out, in) matrix row-major, then the bias.

Kronecker layers (``nn.Linear``, and ``nn.Conv2d`` with ``groups=1`` and zero padding) expose
per-position inputs ``a`` of shape (N, T, in [+1]) and output gradients ``g`` of shape (N, T, out):
a Linear layer has one position per example (more if it is applied over extra dimensions, which
are weight-shared positions), a Conv2d layer one position per output pixel with ``a`` the unfolded
input patch (channel-major, as ``weight.reshape(out, -1)``). The bias is a 1 appended to ``a``.
The per-example gradient of the weight-and-bias matrix is ``sum_t g_t a_t^T``.

Every other module with parameters of its own (BatchNorm in eval mode, Embedding, LayerNorm,
grouped convolutions, ...) is a diagonal layer: its per-example gradients come from a vmapped
vector-Jacobian product of the module alone on its captured input, so it must map a batch of
examples to one tensor of per-example outputs.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from framework.errors import UserInputError, check_choice

SUPPORTED = (
    "Kronecker factors: nn.Linear, nn.Conv2d (groups=1, zero padding); diagonal block: any other "
    "module with parameters of its own whose output is one tensor of per-example outputs "
    "(BatchNorm in eval mode, Embedding, LayerNorm, ...)"
)
UNSUPPORTED_TYPES = (nn.RNNBase, nn.MultiheadAttention)


class Layer:
    """A module and the trainable parameters it owns directly (full names as in the model)."""

    def __init__(self, name: str, module: nn.Module, parameters: dict[str, nn.Parameter]) -> None:
        self.name = name
        self.module = module
        self.parameters = parameters
        self.size = sum(p.numel() for p in parameters.values())

    def captured_inputs(self, args: tuple, kwargs: dict) -> Any:
        """What the forward hook keeps of the module's inputs (detached)."""
        return tuple(a.detach() if torch.is_tensor(a) else a for a in args), kwargs

    def captured_output_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to the module's output, in the form this layer works with."""
        return gradients

    def squared_gradients_sum(self, inputs: Any, output_gradients: torch.Tensor) -> torch.Tensor:
        """sum_n of the squared per-example gradients (the unnormalised diagonal), shape (size,)."""
        return self.per_example_gradients(inputs, output_gradients).square().sum(0)

    def per_example_gradients(self, inputs: Any, output_gradients: torch.Tensor) -> torch.Tensor:
        """Per-example gradients of this layer's parameters, shape (N, size), in layout order."""
        args, kwargs = inputs
        params = {name.rsplit(".", 1)[-1]: p.detach() for name, p in self.parameters.items()}
        in_dims = tuple(0 if torch.is_tensor(a) else None for a in args)

        def contracted_output(p: dict[str, torch.Tensor], example_args: tuple, g: torch.Tensor) -> torch.Tensor:
            batched = tuple(a.unsqueeze(0) if torch.is_tensor(a) else a for a in example_args)
            return (functional_call(self.module, p, batched, kwargs) * g.unsqueeze(0)).sum()

        gradients = vmap(grad(contracted_output), in_dims=(None, in_dims, 0))(params, args, output_gradients)
        return torch.cat([gradients[name].flatten(1) for name in params], dim=1)


class KroneckerLayer(Layer):
    """A layer whose per-example gradient is ``sum_t g_t a_t^T`` (see the module docstring)."""

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d, parameters: dict[str, nn.Parameter]) -> None:
        super().__init__(name, module, parameters)
        self.has_bias = module.bias is not None and module.bias.requires_grad
        self.out_features = module.weight.shape[0]
        self.in_features = module.weight[0].numel()
        self.in_augmented = self.in_features + int(self.has_bias)

    def augmented(self, inputs: torch.Tensor) -> torch.Tensor:
        """Append the 1 that multiplies the bias."""
        if not self.has_bias:
            return inputs
        return torch.cat([inputs, inputs.new_ones(*inputs.shape[:-1], 1)], dim=-1)

    def to_matrix(self, flat: torch.Tensor) -> torch.Tensor:
        """(..., size) in layout order -> (..., out, in [+1]) with the bias as the last column."""
        weight = flat[..., : self.out_features * self.in_features].unflatten(-1, (self.out_features, self.in_features))
        if not self.has_bias:
            return weight
        return torch.cat([weight, flat[..., self.out_features * self.in_features :, None]], dim=-1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`."""
        weight = matrix[..., : self.in_features].flatten(-2)
        return torch.cat([weight, matrix[..., self.in_features]], dim=-1) if self.has_bias else weight

    def per_example_gradients(self, inputs: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
        return self.from_matrix(torch.einsum("nto,nti->noi", output_gradients, inputs))

    def squared_gradients_sum(self, inputs: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
        return self.from_matrix(second_moment(inputs, output_gradients))


def second_moment(inputs: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
    """sum_n (dW_n)^2 of shape (out, in [+1]) for dW_n = sum_t g_nt a_nt^T, from inputs (N, T, in [+1])
    and output gradients (N, T, out). With one position per example (Linear without weight sharing)
    dW_n is the outer product g_n a_n^T, so this is (g^2)^T (a^2) and no per-example gradient is
    formed; with several positions (Conv2d) each dW_n is a sum, formed before squaring. Applied
    to ``a Q_A`` and ``g Q_G`` it is EKFAC's scaling in the eigenbasis (Q_G^T dW_n Q_A)^2."""
    if inputs.shape[1] == 1:
        return output_gradients[:, 0].square().T @ inputs[:, 0].square()
    return torch.einsum("nto,nti->noi", output_gradients, inputs).square().sum(0)


class LinearLayer(KroneckerLayer):
    """``nn.Linear``; extra dimensions between batch and features are weight-shared positions."""

    def captured_inputs(self, args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0].detach()
        return self.augmented(x.reshape(x.shape[0], -1, x.shape[-1]))

    def captured_output_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.reshape(gradients.shape[0], -1, gradients.shape[-1])


class Conv2dLayer(KroneckerLayer):
    """``nn.Conv2d`` by unfolded patches: one position per output pixel."""

    def captured_inputs(self, args: tuple, kwargs: dict) -> torch.Tensor:
        conv = self.module
        x = F.pad(args[0].detach(), conv._reversed_padding_repeated_twice)
        patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        return self.augmented(patches.transpose(1, 2))

    def captured_output_gradients(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.flatten(2).transpose(1, 2)


def has_kronecker_form(module: nn.Module) -> bool:
    """Whether ``module`` is a Kronecker layer: ``nn.Linear``, or ``nn.Conv2d`` with groups=1 and
    zero padding, with a trainable weight."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or not module.weight.requires_grad:
        return False
    return isinstance(module, nn.Linear) or (module.groups == 1 and module.padding_mode == "zeros")


def _layer(name: str, module: nn.Module, parameters: dict[str, nn.Parameter]) -> Layer:
    if isinstance(module, UNSUPPORTED_TYPES):
        raise UserInputError(f"layer {name!r} of type {type(module).__name__} cannot be handled; supported: {SUPPORTED}")
    if not has_kronecker_form(module):
        return Layer(name, module, parameters)
    return LinearLayer(name, module, parameters) if isinstance(module, nn.Linear) else Conv2dLayer(name, module, parameters)


class ParameterLayout:
    """The layers a Fisher covers, in layout order (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        owned = {
            name: {
                f"{name}.{p_name}" if name else p_name: p
                for p_name, p in module.named_parameters(recurse=False)
                if p.requires_grad
            }
            for name, module in model.named_modules()
        }
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

    def parameters(self) -> dict[str, nn.Parameter]:
        """The covered parameters by full name, in layout order."""
        return {name: p for layer in self.layers.values() for name, p in layer.parameters.items()}

    def check_examples_independent(self) -> None:
        """Refuse BatchNorm in training mode: it mixes examples, so per-example gradients do not exist."""
        for name, layer in self.layers.items():
            if isinstance(layer.module, nn.modules.batchnorm._BatchNorm) and layer.module.training:
                raise UserInputError(
                    f"layer {name!r} ({type(layer.module).__name__}) is in training mode, where it mixes the examples of a "
                    "batch; call model.eval() before computing a Fisher"
                )
