"""Capture of layer inputs and pre-activation output gradients by module hooks, apart from the
algebra. Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is ever written."""

from types import TracebackType

import torch
from torch import nn

from callbacks.curvature.layers import SUPPORTED, ParameterLayout
from framework.errors import UserInputError, check_choice


class CapturedBatch:
    """One batch of ``size`` examples: each layer's captured inputs, and its output gradients for
    each of D draws stacked per layer as ``gradients[name]`` (D, N, ...), as
    :meth:`LayerCapture.draw_gradients` gives them."""

    def __init__(self, size: int, inputs: dict[str, object], gradients: dict[str, torch.Tensor]) -> None:
        self.size = size
        self.inputs = inputs
        self.gradients = gradients


class LayerCapture:
    """Context manager: during a forward pass inside it, every layer of ``layout`` records its
    inputs and its output tensor; :meth:`output_gradients` then differentiates any scalar built
    from the model's output with respect to those outputs.

    The hook returns a clone of each layer's output, so a later in-place op (``ReLU(inplace=True)``)
    cannot turn the recorded pre-activation into a post-activation.
    """

    def __init__(self, layout: ParameterLayout) -> None:
        self.layout = layout
        self.inputs: dict[str, object] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "LayerCapture":
        for name, layer in self.layout.layers.items():
            self._handles.append(layer.module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        layer = self.layout.layers[name]

        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor:
            if not torch.is_tensor(output):
                raise UserInputError(
                    f"layer {name!r} of type {type(module).__name__} cannot be handled: its output is not one tensor; "
                    f"supported: {SUPPORTED}"
                )
            if name in self._outputs:
                raise UserInputError(
                    f"layer {name!r} of type {type(module).__name__} ran twice in one forward pass; a module "
                    "reused within a forward (weight sharing across calls) is not supported"
                )
            self.inputs[name] = layer.captured_inputs(args, kwargs)
            self._outputs[name] = output
            return output.clone()

        return record

    def draw_bytes(self) -> int:
        """Memory of one draw's output gradients of all layers (what :meth:`draw_gradients`
        returns per draw)."""
        return sum(output.numel() * output.element_size() for output in self._outputs.values())

    def draw_gradients(self, outputs: torch.Tensor, draws: torch.Tensor) -> dict[str, torch.Tensor]:
        """For each draw u_d of ``draws`` (D, N, O) (see :func:`output_gradient_draws`), each layer's
        per-example output gradients of sum_n u_dn . outputs_n, with ``outputs`` (N, ...) the model
        output flattened to O, stacked over draws: (D, N, ...) per layer. All draws go through one
        vmapped backward (``is_grads_batched``) instead of D backward passes; ``torch.func.vmap``,
        which batches the convolution and max-pooling backwards that this older vmap loops over,
        took 0.9-0.95x the time of the digits CNN's KFAC Fisher but 1.1-1.2x the MLP's (its
        Python overhead per call), so this one stays. The graph is kept for further calls."""
        names = list(self._outputs)
        layer_outputs = [self._outputs[name] for name in names]
        cotangents = draws.reshape(len(draws), *outputs.shape)
        if len(draws) == 1:
            gradients = torch.autograd.grad(outputs, layer_outputs, cotangents[0], retain_graph=True, allow_unused=True)
            gradients = [None if g is None else g.unsqueeze(0) for g in gradients]
        else:
            gradients = torch.autograd.grad(
                outputs, layer_outputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        stacked = {}
        for name, output, gradient in zip(names, layer_outputs, gradients):
            if gradient is None:
                gradient = output.new_zeros(len(draws), *output.shape)
            captured = self.layout.layers[name].captured_output_gradients(gradient.flatten(0, 1))
            stacked[name] = captured.unflatten(0, (len(draws), output.shape[0]))
        return stacked

    def output_gradients(self, loss: torch.Tensor, reduction: str = "sum") -> dict[str, torch.Tensor]:
        """Gradients of the scalar ``loss`` with respect to each layer's output, as per-example
        gradients: with ``reduction="mean"`` (a loss averaged over the batch) they are multiplied
        by the batch size, undoing the 1/N. The graph is kept for further calls."""
        check_choice("reduction", reduction, ("sum", "mean"))
        names = list(self._outputs)
        outputs = [self._outputs[name] for name in names]
        gradients = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        scale = outputs[0].shape[0] if reduction == "mean" else 1
        return {
            name: self.layout.layers[name].captured_output_gradients(
                torch.zeros_like(output) if gradient is None else gradient * scale
            )
            for name, output, gradient in zip(names, outputs, gradients)
        }
