"""Twins of a model that train in the lazy regime, for comparing with the real model on the same
batches (George et al. 2022, "Lazy vs hasty").

Both wrappers copy the model twice at construction: ``model`` holds the trainable parameters
``w`` (the only trainable parameters of the wrapper, so ``optimizer(twin.parameters())`` works
with any optimizer), ``initial`` the frozen point ``w0`` with its buffers. The original model is
never touched.

Buffers: ``f(x; w0)`` always uses the buffers as they were at construction (BatchNorm running
statistics included) and never updates them, so the point of linearisation does not drift. The
wrappers follow their own train/eval mode like any module: in training mode BatchNorm normalises
with batch statistics, in ``f(x; w0)`` as in ``f(x; w)``. Dropout in training mode draws
different masks for the two terms, so use eval mode (or no dropout) where exactness matters.
"""

import copy

import torch
from torch import nn
from torch.func import functional_call, jvp

from framework.errors import check_positive


class _AroundInitialization(nn.Module):
    """A trainable copy ``model`` (w) and a frozen copy ``initial`` (w0) of a model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.initial = copy.deepcopy(model).requires_grad_(False)
        self.linearized_names = [name for name, p in model.named_parameters() if p.requires_grad]

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """w0 for the parameters that train (the others keep their values in both copies)."""
        return {name: self.initial.get_parameter(name) for name in self.linearized_names}

    def initial_function(self, parameters: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """``f(inputs; parameters)`` with copies of the initial buffers, so in-place updates in
        training mode (BatchNorm running statistics) leave the initial buffers as they were."""
        buffers = {name: buffer.clone() for name, buffer in self.initial.named_buffers()}
        return functional_call(self.initial, {**parameters, **buffers}, (inputs,))


class LinearizedModel(_AroundInitialization):
    """``f_lin(x; w) = f(x; w0) + J(x; w0) (w - w0)``: the first-order Taylor expansion of the
    model around its parameters at construction, computed with one ``torch.func.jvp`` (no
    Jacobian is formed). Its training dynamics are those of the empirical NTK at w0: the lazy
    regime. The parameters of ``model`` (w, initially w0) are the trainable ones; ``model``'s
    buffers are unused (see the module docstring)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        initial = self.initial_parameters()
        trained = dict(self.model.named_parameters())
        displacement = {name: trained[name] - initial[name] for name in initial}
        output, change = jvp(lambda parameters: self.initial_function(parameters, inputs), (initial,), (displacement,))
        return output + change


class AlphaScaledModel(_AroundInitialization):
    """``alpha (f(x; w) - f(x; w0))`` (Chizat et al. 2019; George et al. 2022): zero at
    construction, and the larger ``alpha``, the closer its training is to the linearised model's
    (lazy), provided the step is scaled by ``1 / alpha^2`` (:func:`alpha_scaled_learning_rate`).
    ``alpha = 1`` is the real model up to the constant offset ``f(x; w0)``."""

    def __init__(self, model: nn.Module, alpha: float) -> None:
        check_positive("alpha", alpha)
        super().__init__(model)
        self.alpha = alpha

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            initial_output = self.initial_function(self.initial_parameters(), inputs)
        return self.alpha * (self.model(inputs) - initial_output)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def alpha_scaled_learning_rate(learning_rate: float, alpha: float) -> float:
    """The learning rate for an :class:`AlphaScaledModel`: ``learning_rate / alpha^2``, as George
    et al. 2022 scale it, so that the function moves at a speed independent of alpha
    (the gradient in w grows as alpha and its effect on the output as alpha again)."""
    check_positive("learning_rate", learning_rate)
    check_positive("alpha", alpha)
    return learning_rate / alpha**2
