"""Vectors in parameter space: one flat tensor per layer, in the layout's order."""

import torch

from callbacks.curvature.layers import ParameterLayout


class PVector:
    """A parameter-space vector: ``tensors[layer_name]`` is that layer's flat part (its tensors
    in layout order, each flattened row-major; see :mod:`callbacks.curvature.layers`). Shaped
    tensors are keyed by effective tensor name (``0.weight``, also for a pruned or parametrized
    module); ``layout.parameters()[name]`` is the trainable leaf holding each one."""

    def __init__(self, layout: ParameterLayout, tensors: dict[str, torch.Tensor]) -> None:
        self.layout = layout
        self.tensors = tensors

    @classmethod
    def from_flat(cls, layout: ParameterLayout, flat: torch.Tensor) -> "PVector":
        """Split a vector of length ``layout.size`` (the model's parameter order) into layers."""
        sizes = [layer.size for layer in layout.layers.values()]
        return cls(layout, dict(zip(layout.layers, flat.split(sizes))))

    @classmethod
    def from_parameters(cls, layout: ParameterLayout, parameters: dict[str, torch.Tensor]) -> "PVector":
        """From tensors shaped like the parameters, keyed by effective tensor name."""
        return cls(
            layout,
            {name: torch.cat([parameters[t.name].reshape(-1) for t in layer.tensors]) for name, layer in layout.layers.items()},
        )

    @classmethod
    def from_model(cls, layout: ParameterLayout) -> "PVector":
        """The current effective values (detached copies; a pruned weight with its zeros)."""
        return cls.from_parameters(layout, {t.name: t.value().detach().clone() for t in layout.tensors()})

    @classmethod
    def from_model_grads(cls, layout: ParameterLayout) -> "PVector":
        """The trainable leaves' ``.grad`` (zeros where there is none): for a pruned weight the
        gradient of ``weight_orig``, i.e. the masked gradient."""
        gradients = {
            name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for name, p in layout.parameters().items()
        }
        return cls.from_parameters(layout, gradients)

    def flatten(self) -> torch.Tensor:
        return torch.cat([self.tensors[name] for name in self.layout.layers])

    def to_parameters(self) -> dict[str, torch.Tensor]:
        """Tensors shaped like the parameters, keyed by effective tensor name, in layout order."""
        shaped = {}
        for name, layer in self.layout.layers.items():
            parts = self.tensors[name].split([t.leaf.numel() for t in layer.tensors])
            shaped.update({t.name: part.view(t.leaf.shape) for t, part in zip(layer.tensors, parts)})
        return shaped

    def _combine(self, other: "PVector", operation) -> "PVector":
        return PVector(self.layout, {name: operation(t, other.tensors[name]) for name, t in self.tensors.items()})

    def dot(self, other: "PVector") -> torch.Tensor:
        return sum(torch.dot(t, other.tensors[name]) for name, t in self.tensors.items())

    def norm(self) -> torch.Tensor:
        return self.dot(self).sqrt()

    def __add__(self, other: "PVector") -> "PVector":
        return self._combine(other, torch.add)

    def __sub__(self, other: "PVector") -> "PVector":
        return self._combine(other, torch.sub)

    def __mul__(self, scalar: float | torch.Tensor) -> "PVector":
        return PVector(self.layout, {name: t * scalar for name, t in self.tensors.items()})

    __rmul__ = __mul__
