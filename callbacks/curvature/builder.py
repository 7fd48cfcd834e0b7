"""``fisher(model, data, representation=..., fisher_type=...)``: the one builder.

Statistics are sums over examples divided by the total number of examples N, so the result does
not depend on how the data is batched. KFAC factors follow KFC (Grosse & Martens 2016) for
positions t = 1..T of a layer (T = 1 for a plain Linear layer):

    A = (1/N) sum_n sum_t a_nt a_nt^T,   G = (1/N) sum_n sum_d (1/T) sum_t g_ndt g_ndt^T,

so the block is G (x) A. EKFAC keeps the eigenbases Q_G, Q_A of these factors and replaces the
scaling l_G l_A^T by the second moment of projected per-example gradients (a second pass over
the data; for ``mc`` with fresh samples), s = (1/N) sum_n sum_d (Q_G^T DW_nd Q_A)^2, computed
by :func:`callbacks.curvature.layers.second_moment`.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from callbacks.curvature.blocks import Block, DenseBlock, DiagonalBlock, EigenBlock, KroneckerBlock
from callbacks.curvature.capture import LayerCapture
from callbacks.curvature.layers import KroneckerLayer, Layer, ParameterLayout, second_moment
from callbacks.curvature.representations import (
    EKFAC,
    KFAC,
    BlockDiagonal,
    Dense,
    Diagonal,
    FisherRepresentation,
    Implicit,
    LowRank,
)
from callbacks.curvature.targets import FISHER_TYPES, TASKS, output_gradient_draws
from framework.errors import UserInputError, check_choice, check_positive

REPRESENTATIONS = ("dense", "diagonal", "block_diagonal", "kfac", "ekfac", "lowrank", "implicit")


@dataclass
class CapturedBatch:
    """One batch: each layer's captured inputs, and its output gradients for each draw."""

    size: int
    inputs: dict[str, object]
    draws: list[dict[str, torch.Tensor]]


def _split(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if torch.is_tensor(batch):
        return batch, None
    if not isinstance(batch, (tuple, list)):
        raise UserInputError(f"a batch must be an inputs tensor or an (inputs, targets, ...) tuple, got {type(batch).__name__}")
    return batch[0], batch[1] if len(batch) > 1 else None


def _captured_batches(
    layout: ParameterLayout, data: Iterable, fisher_type: str, task: str, samples: int, generator: torch.Generator | None
) -> Iterator[CapturedBatch]:
    for batch in data:
        inputs, targets = _split(batch)
        with torch.enable_grad():
            with LayerCapture(layout) as capture:
                outputs = layout.model(inputs)
            draws = output_gradient_draws(outputs, targets, fisher_type, task, samples, generator)
            gradients = [capture.output_gradients((outputs.flatten(1) * draw).sum()) for draw in draws]
        yield CapturedBatch(inputs.shape[0], capture.inputs, gradients)


def _check_not_empty(count: int) -> None:
    if count == 0:
        raise UserInputError("data yielded no batches")


def _average(batches: Iterable[CapturedBatch], statistics: Callable[[CapturedBatch], dict]) -> dict:
    """Each statistic summed over all batches, divided by the number of examples."""
    sums: dict = {}
    examples = 0
    for batch in batches:
        examples += batch.size
        for key, value in statistics(batch).items():
            sums[key] = sums[key] + value if key in sums else value
    _check_not_empty(examples)
    return {key: value / examples for key, value in sums.items()}


def _sum_over_draws(
    batch: CapturedBatch, layers: dict[str, Layer], statistic: Callable[[Layer, object, torch.Tensor], torch.Tensor], kind: str
) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (kind, name): sum(statistic(layer, batch.inputs[name], draw[name]) for draw in batch.draws)
        for name, layer in layers.items()
    }


def _diagonal(layer: Layer, inputs: object, gradients: torch.Tensor) -> torch.Tensor:
    return layer.squared_gradients_sum(inputs, gradients)


def _block(layer: Layer, inputs: object, gradients: torch.Tensor) -> torch.Tensor:
    per_example = layer.per_example_gradients(inputs, gradients)
    return per_example.T @ per_example


def _output_factor(layer: Layer, inputs: object, gradients: torch.Tensor) -> torch.Tensor:
    return gradients.flatten(0, 1).T @ gradients.flatten(0, 1) / gradients.shape[1]


def _dense_statistics(layout: ParameterLayout, batch: CapturedBatch) -> dict:
    total = 0
    for draw in batch.draws:
        per_example = torch.cat(
            [layer.per_example_gradients(batch.inputs[name], draw[name]) for name, layer in layout.layers.items()], dim=1
        )
        total = total + per_example.T @ per_example
    return {"dense": total}


def _split_layers(layout: ParameterLayout) -> tuple[dict[str, KroneckerLayer], dict[str, Layer]]:
    kronecker = {name: layer for name, layer in layout.layers.items() if isinstance(layer, KroneckerLayer)}
    return kronecker, {name: layer for name, layer in layout.layers.items() if name not in kronecker}


def _kfac_blocks(layout: ParameterLayout, batches: Iterable[CapturedBatch]) -> dict[str, Block]:
    kronecker, others = _split_layers(layout)

    def statistics(batch: CapturedBatch) -> dict:
        inputs = {("A", name): batch.inputs[name].flatten(0, 1).T @ batch.inputs[name].flatten(0, 1) for name in kronecker}
        return {
            **inputs,
            **_sum_over_draws(batch, kronecker, _output_factor, "G"),
            **_sum_over_draws(batch, others, _diagonal, "diagonal"),
        }

    averages = _average(batches, statistics)
    return {
        name: KroneckerBlock(layer, averages["G", name], averages["A", name])
        if name in kronecker
        else DiagonalBlock(averages["diagonal", name])
        for name, layer in layout.layers.items()
    }


def _ekfac_blocks(kfac_blocks: dict[str, Block], batches: Iterable[CapturedBatch]) -> dict[str, Block]:
    eigen = {name: block.eigen for name, block in kfac_blocks.items() if isinstance(block, KroneckerBlock)}

    def projected_second_moment(layer: Layer, inputs: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return second_moment(inputs @ eigen[layer.name].q_a, gradients @ eigen[layer.name].q_g)

    layers = {name: block.layer for name, block in eigen.items()}
    scalings = _average(batches, lambda batch: _sum_over_draws(batch, layers, projected_second_moment, "scaling"))
    rescaled = {name: EigenBlock(basis.layer, basis.q_g, basis.q_a, scalings["scaling", name]) for name, basis in eigen.items()}
    return {name: rescaled.get(name, block) for name, block in kfac_blocks.items()}


def _implicit_batches(
    model: nn.Module, data: Iterable, fisher_type: str, task: str, samples: int, generator: torch.Generator | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stored = []
    for batch in data:
        inputs, targets = _split(batch)
        with torch.no_grad():
            outputs = model(inputs)
        stored.append((inputs, output_gradient_draws(outputs, targets, fisher_type, task, samples, generator)))
    _check_not_empty(len(stored))
    return stored


def fisher(
    model: nn.Module,
    data: Iterable,
    representation: str = "kfac",
    fisher_type: str = "exact",
    task: str = "classification",
    samples: int = 1,
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
    rank: int | None = None,
) -> FisherRepresentation:
    """The Fisher F = (1/N) sum_n E_{y ~ p(y|x_n)}[g g^T] of ``model`` on ``data`` (see
    :mod:`callbacks.curvature.targets` for the types), in the chosen representation.

    Args:
        data: a re-iterable of batches: ``(inputs, targets, ...)`` or bare inputs (targets are
            needed by ``empirical`` only), e.g. a DataLoader or a list.
        representation: one of ``REPRESENTATIONS``; ``lowrank`` takes the top-``rank``
            eigenpairs of the dense Fisher (use :meth:`LowRank.from_representation` on an
            Implicit Fisher to avoid forming it).
        fisher_type: ``exact``, ``mc`` (``samples`` targets per example from ``generator``) or
            ``empirical``.
        task: ``classification`` (softmax cross-entropy) or ``regression`` (unit Gaussian).
        layers: names of the modules to cover (default: every module owning trainable parameters).

    The model is evaluated in its current mode (BatchNorm must be in eval mode); no ``.grad`` is
    written and the mode is not changed.
    """
    check_choice("representation", representation, REPRESENTATIONS)
    check_choice("fisher_type", fisher_type, FISHER_TYPES)
    check_choice("task", task, TASKS)
    check_positive("samples", samples)
    if representation == "lowrank" and rank is None:
        raise UserInputError("representation='lowrank' needs rank=<number of eigenpairs>")
    if iter(data) is data:
        raise UserInputError("data must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    layout = ParameterLayout(model, layers)
    layout.check_examples_independent()
    if representation == "implicit":
        return Implicit(layout, _implicit_batches(model, data, fisher_type, task, samples, generator))

    def batches() -> Iterator[CapturedBatch]:
        return _captured_batches(layout, data, fisher_type, task, samples, generator)

    if representation in ("dense", "lowrank"):
        dense = Dense(layout, _average(batches(), lambda batch: _dense_statistics(layout, batch))["dense"])
        return dense if representation == "dense" else LowRank.from_representation(dense, rank)
    if representation == "diagonal":
        averages = _average(batches(), lambda batch: _sum_over_draws(batch, layout.layers, _diagonal, "diagonal"))
        return Diagonal(layout, {name: DiagonalBlock(averages["diagonal", name]) for name in layout.layers})
    if representation == "block_diagonal":
        averages = _average(batches(), lambda batch: _sum_over_draws(batch, layout.layers, _block, "block"))
        return BlockDiagonal(layout, {name: DenseBlock(averages["block", name]) for name in layout.layers})
    kfac_blocks = _kfac_blocks(layout, batches())
    return KFAC(layout, kfac_blocks) if representation == "kfac" else EKFAC(layout, _ekfac_blocks(kfac_blocks, batches()))
