"""Capture of the activations' and their gradients' root-mean-square at named modules."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from framework.errors import UserInputError


def default_modules(network: nn.Module) -> list[str]:
    """The modules whose outputs are worth watching across depth: the children of
    ``network.groups`` when it has groups (DiracNet, PlainNet, WideResNet: each group's output),
    else every leaf module that owns parameters (e.g. each Linear of an MLP)."""
    groups = getattr(network, "groups", None)
    if isinstance(groups, nn.Module) and len(list(groups.children())) > 0:
        return [f"groups.{name}" for name, _ in groups.named_children()]
    return [name for name, module in network.named_modules() if not list(module.children()) and any(True for _ in module.parameters(recurse=False))]


class SignalCapture:
    """Context manager recording, for each named module of ``network``, the root-mean-square of
    its output during the forward passes inside it (``forward``) and of the gradient that
    reaches that output during the backward passes (``backward``; a ``torch.autograd.grad`` or
    a ``backward()``, whichever runs inside). Values are 0-dim float32 tensors (detached, on the
    activations' device), the last pass winning.

    Args:
        network: the model.
        modules: module names as in ``network.named_modules()``.
    """

    def __init__(self, network: nn.Module, modules: Sequence[str]) -> None:
        named = dict(network.named_modules())
        missing = [name for name in modules if name not in named]
        if missing:
            raise UserInputError(f"modules {missing} are not modules of {type(network).__name__}; e.g. {list(named)[1:6]}")
        self.modules = {name: named[name] for name in modules}
        self.outputs: dict[str, torch.Tensor] = {}
        self.forward: dict[str, torch.Tensor] = {}
        self.backward: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "SignalCapture":
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(functools.partial(self._record_forward, name)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.outputs.clear()  # no reference to the graph outlives the block

    def _record_forward(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise UserInputError(f"module {name!r} ({type(module).__name__}) returns {type(output).__name__}, not a tensor; choose modules that output tensors")
        self.forward[name] = rms(output.detach())
        if output.requires_grad:
            self.outputs[name] = output
            output.register_hook(functools.partial(self._record_backward, name))

    def _record_backward(self, name: str, gradient: torch.Tensor) -> None:
        self.backward[name] = rms(gradient.detach())


def rms(tensor: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of all entries, in float32 (bf16 activations included)."""
    return tensor.float().square().mean().sqrt()


def signal_norms(
    network: nn.Module, inputs: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], modules: Sequence[str] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """The RMS of the activation (forward) and of the gradient of ``loss_fn(network(inputs))``
    with respect to it (backward) at each of ``modules`` (default :func:`default_modules`), in
    the network's current mode. Parameters' ``.grad`` are left untouched.

    Why both: with BatchNorm the forward scale of every block is pinned whatever the depth, so
    depth shows in the backward signal; at initialisation it grows towards the input of a deep
    plain net (the gradient explosion of deep BN nets) but stays nearly flat in a DiracNet or a
    ResNet.
    """
    names = default_modules(network) if modules is None else list(modules)
    with SignalCapture(network, names) as capture:
        loss = loss_fn(network(inputs))
        torch.autograd.grad(loss, [capture.outputs[name] for name in names])
    return {name: capture.forward[name].item() for name in names}, {name: capture.backward[name].item() for name in names}
