"""``fisher(model, data, representation=..., fisher_type=...)``: the one builder.

Statistics are sums over examples divided by the total number of examples N, so the result does
not depend on how the data is batched. KFAC factors follow KFC (Grosse & Martens 2016) for
positions t = 1..T of a layer (T = 1 for a plain Linear layer):

    A = (1/N) sum_n sum_t a_nt a_nt^T,   G = (1/N) sum_n sum_d (1/T) sum_t g_ndt g_ndt^T,

so the block is G (x) A. EKFAC keeps the eigenbases Q_G, Q_A of these factors and replaces the
scaling l_G l_A^T by the second moment of projected per-example gradients (a second pass over
the data; for ``mc`` with fresh samples), s = (1/N) sum_n sum_d (Q_G^T DW_nd Q_A)^2, computed
by :func:`callbacks.curvature.layers.projected_second_moment` (shared with the optimiser).
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import torch
from torch import nn

from callbacks.curvature.blocks import Block, DenseBlock, DiagonalBlock, EigenBlock, KroneckerBlock
from callbacks.curvature.capture import LayerCapture
from callbacks.curvature.layers import (
    KroneckerLayer,
    Layer,
    LinearLayer,
    ParameterLayout,
    gram,
    input_factor,
    output_factor,
    projected_second_moment,
    second_moment,
)
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


def _split(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if torch.is_tensor(batch):
        return batch, None
    if not isinstance(batch, (tuple, list)):
        raise UserInputError(f"a batch must be an inputs tensor or an (inputs, targets, ...) tuple, got {type(batch).__name__}")
    return batch[0], batch[1] if len(batch) > 1 else None


GROUP_BYTES = 2**28
"""A memory bound: draws are differentiated together, in one vmapped backward, as many as keep
their output gradients of all layers within this many bytes (at least one draw), so that the
backward's memory does not grow with the number of draws (C - 1 for ``exact``: 99 on CIFAR-100,
where a WRN's layer outputs take hundreds of MB per draw at batch 128). Below it, all draws at
once is the faster choice: one draw at a time took 1.4-1.7x as long for the digits MLP's KFAC,
and 1.3-2x for the digits CNN's diagonal, EKFAC and Dense Fishers (its KFAC: the same within
noise)."""

KFAC_GROUP_BYTES = 2**20
"""KFAC's statistics of a group of draws are one product per layer (G), as cheap for one draw as
for many, so its draws go in groups whose output gradients fit in about 1 MiB (a core's L2
cache) rather than ``GROUP_BYTES``: the backward and the products then work on data still in the
cache. Measured on the digits CNN (one draw per group) in alternating fresh processes, against
all draws at once: 0.62-0.66x of NNGeometry's time instead of 0.80-0.86 with 2 threads, 0.65-0.70
instead of 0.92-0.96 with 1; the digits MLP's 9 draws fit in one group either way."""

Statistics = dict[tuple[str, str], torch.Tensor]
Gradients = dict[str, torch.Tensor]
CapturedBatches = Iterable[tuple[int, dict[str, object], Iterator[Gradients]]]


def _gradient_groups(capture: LayerCapture, outputs: torch.Tensor, draws: torch.Tensor, group_bytes: int) -> Iterator[Gradients]:
    """Each layer's output gradients for consecutive groups of ``draws`` whose gradients take at
    most ``group_bytes`` (at least one draw), stacked over the group's draws: (d, N, ...) per layer."""
    per_group = max(1, group_bytes // max(1, capture.draw_bytes()))
    for group in draws.split(per_group):
        with torch.enable_grad():
            gradients = capture.draw_gradients(outputs, group)
        yield gradients


def _captured_batches(
    layout: ParameterLayout,
    data: Iterable,
    fisher_type: str,
    task: str,
    samples: int,
    generator: torch.Generator | None,
    group_bytes: int,
) -> CapturedBatches:
    """Per batch: its number of examples, each layer's captured inputs, and its output gradients
    group by group of draws (every statistic is a sum over draws, so it is summed over groups)."""
    for batch in data:
        inputs, targets = _split(batch)
        with torch.enable_grad():
            with LayerCapture(layout) as capture:
                outputs = layout.model(inputs)
        draws = output_gradient_draws(outputs, targets, fisher_type, task, samples, generator)
        yield inputs.shape[0], capture.inputs, _gradient_groups(capture, outputs, draws, group_bytes)
        del capture, outputs  # free this batch's graph before the next forward


def _check_not_empty(count: int) -> None:
    if count == 0:
        raise UserInputError("data yielded no batches")


def _average(
    batches: CapturedBatches,
    statistics: Callable[[dict[str, object], Gradients], Statistics],
    input_statistics: Callable[[dict[str, object]], Statistics] | None = None,
) -> Statistics:
    """``statistics(inputs, gradients)`` summed over all batches and groups of draws, and
    ``input_statistics(inputs)`` over all batches, divided by the number of examples."""
    sums: Statistics = {}
    examples = 0

    def add(values: Statistics) -> None:
        for key, value in values.items():
            sums[key] = sums[key] + value if key in sums else value

    for size, inputs, groups in batches:
        examples += size
        if input_statistics is not None:
            add(input_statistics(inputs))
        for group_statistics in map(partial(statistics, inputs), groups):
            add(group_statistics)
        del inputs, groups  # nothing of this batch stays alive during the next forward
    _check_not_empty(examples)
    return {key: value / examples for key, value in sums.items()}


def _per_layer(
    inputs: dict[str, object],
    gradients: Gradients,
    layers: dict[str, Layer],
    statistic: Callable[[Layer, object, torch.Tensor], torch.Tensor],
    kind: str,
) -> Statistics:
    """``statistic(layer, inputs, gradients)`` of each layer, with its gradients stacked over draws."""
    return {(kind, name): statistic(layer, inputs[name], gradients[name]) for name, layer in layers.items()}


def _per_example(layer: Layer, inputs: object, gradients: torch.Tensor) -> torch.Tensor:
    """Per-example gradients (D, N, size) for gradients stacked over D draws."""
    if isinstance(layer, KroneckerLayer):
        return layer.per_example_gradients(inputs, gradients)
    return torch.stack([layer.per_example_gradients(inputs, draw) for draw in gradients])


def _diagonal(layer: Layer, inputs: object, gradients: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, KroneckerLayer):
        return layer.from_matrix(second_moment(inputs, gradients))
    return _per_example(layer, inputs, gradients).square_().sum((0, 1))


def _block(layer: Layer, inputs: object, gradients: torch.Tensor) -> torch.Tensor:
    return gram(_per_example(layer, inputs, gradients).flatten(0, 1))


def _is_outer_product(layer: Layer, inputs: object) -> bool:
    """A Linear layer with one position: each per-example gradient is one outer product g a^T."""
    return isinstance(layer, LinearLayer) and inputs.shape[1] == 1


Captured = tuple[KroneckerLayer, torch.Tensor, torch.Tensor]


def _outer_block(first: Captured, second: Captured) -> torch.Tensor:
    """sum_n sum_d J1_dn J2_dn^T between two outer-product layers, summed over draws first:
    sum_n (sum_d g1_dn g2_dn^T) (x) (a1_n a2_n^T), a product over N rather than D N terms (in
    chunks of examples to bound the memory), in layout order."""
    (layer_1, inputs_1, gradients_1), (layer_2, inputs_2, gradients_2) = first, second
    g_1, a_1, g_2, a_2 = gradients_1[:, :, 0], inputs_1[:, 0], gradients_2[:, :, 0], inputs_2[:, 0]
    out_1, in_1, out_2, in_2 = g_1.shape[-1], a_1.shape[-1], g_2.shape[-1], a_2.shape[-1]
    chunk = max(1, 2**22 // (out_1 * out_2 + in_1 * in_2))
    total = 0
    for start in range(0, a_1.shape[0], chunk):
        part = slice(start, start + chunk)
        outputs = torch.einsum("dno,dnp->nop", g_1[:, part], g_2[:, part]).flatten(1)
        inputs = torch.einsum("ni,nj->nij", a_1[part], a_2[part]).flatten(1)
        total = total + outputs.T @ inputs
    matrix = total.view(out_1, out_2, in_1, in_2).permute(0, 2, 1, 3).reshape(out_1 * in_1, out_2 * in_2)
    return matrix[layer_1.matrix_positions()][:, layer_2.matrix_positions()]


def _mixed_block(first: Captured, per_example: torch.Tensor) -> torch.Tensor:
    """sum_n sum_d J1_dn J2_dn^T between an outer-product layer and per-example gradients
    (D, N, P2) of another: sum_n a1_n (x) (sum_d g1_dn J2_dn^T), again over N terms."""
    layer, inputs, gradients = first
    mixed = torch.einsum("dno,dnq->noq", gradients[:, :, 0], per_example)
    matrix = (inputs[:, 0].T @ mixed.flatten(1)).unflatten(1, mixed.shape[1:]).transpose(0, 1).flatten(0, 1)
    return matrix[layer.matrix_positions()]


def _dense_statistics(layout: ParameterLayout, inputs: dict[str, object], gradients: Gradients) -> Statistics:
    """sum_n sum_d J_dn J_dn^T by blocks of layers (upper triangle, mirrored). With several draws,
    blocks involving outer-product layers sum over the draws first (:func:`_outer_block`)."""
    captured = [(layer, inputs[name], gradients[name]) for name, layer in layout.layers.items()]
    several_draws = len(captured[0][2]) > 1
    outer = [several_draws and _is_outer_product(layer, inputs) for layer, inputs, _ in captured]
    per_example = [None if is_outer else _per_example(*item) for is_outer, item in zip(outer, captured)]
    rows = [[None] * len(captured) for _ in captured]
    for i in range(len(captured)):
        for j in range(i, len(captured)):
            if outer[i] and outer[j]:
                rows[i][j] = _outer_block(captured[i], captured[j])
            elif outer[i] or outer[j]:
                k, other = (i, j) if outer[i] else (j, i)
                block = _mixed_block(captured[k], per_example[other])
                rows[i][j] = block if outer[i] else block.T
            elif i == j:
                rows[i][j] = gram(per_example[i].flatten(0, 1))
            else:
                rows[i][j] = per_example[i].flatten(0, 1).T @ per_example[j].flatten(0, 1)
            rows[j][i] = rows[i][j].T
    return {("dense", ""): torch.cat([torch.cat(row, dim=1) for row in rows], dim=0)}


def _split_layers(layout: ParameterLayout) -> tuple[dict[str, KroneckerLayer], dict[str, Layer]]:
    kronecker = {name: layer for name, layer in layout.layers.items() if isinstance(layer, KroneckerLayer)}
    return kronecker, {name: layer for name, layer in layout.layers.items() if name not in kronecker}


def _kfac_blocks(layout: ParameterLayout, batches: CapturedBatches) -> dict[str, Block]:
    kronecker, others = _split_layers(layout)

    def statistics(inputs: dict[str, object], gradients: Gradients) -> Statistics:
        return {
            **{("G", name): output_factor(gradients[name]) for name in kronecker},
            **_per_layer(inputs, gradients, others, _diagonal, "diagonal"),
        }

    averages = _average(batches, statistics, lambda inputs: {("A", name): input_factor(inputs[name]) for name in kronecker})
    return {
        name: KroneckerBlock(layer, averages["G", name], averages["A", name])
        if name in kronecker
        else DiagonalBlock(averages["diagonal", name])
        for name, layer in layout.layers.items()
    }


def _ekfac_blocks(kfac_blocks: dict[str, Block], batches: CapturedBatches) -> dict[str, Block]:
    eigen = {name: block.eigen for name, block in kfac_blocks.items() if isinstance(block, KroneckerBlock)}

    def scaling(layer: Layer, inputs: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return projected_second_moment(inputs, gradients, eigen[layer.name].q_a, eigen[layer.name].q_g)

    layers = {name: block.layer for name, block in eigen.items()}
    scalings = _average(batches, lambda inputs, gradients: _per_layer(inputs, gradients, layers, scaling, "scaling"))
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
    if isinstance(data, Iterator):
        raise UserInputError("data must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    layout = ParameterLayout(model, layers)
    layout.check_examples_independent()
    if representation == "implicit":
        return Implicit(layout, _implicit_batches(model, data, fisher_type, task, samples, generator))

    def batches(group_bytes: int = GROUP_BYTES) -> CapturedBatches:
        """The data's captured batches, draws grouped by ``group_bytes``."""
        return _captured_batches(layout, data, fisher_type, task, samples, generator, group_bytes)

    if representation in ("dense", "lowrank"):
        dense = Dense(layout, _average(batches(), partial(_dense_statistics, layout))["dense", ""])
        return dense if representation == "dense" else LowRank.from_representation(dense, rank)
    if representation == "diagonal":
        averages = _average(batches(), lambda inputs, gradients: _per_layer(inputs, gradients, layout.layers, _diagonal, "diagonal"))
        return Diagonal(layout, {name: DiagonalBlock(averages["diagonal", name]) for name in layout.layers})
    if representation == "block_diagonal":
        averages = _average(batches(), lambda inputs, gradients: _per_layer(inputs, gradients, layout.layers, _block, "block"))
        return BlockDiagonal(layout, {name: DenseBlock(averages["block", name]) for name in layout.layers})
    kfac_blocks = _kfac_blocks(layout, batches(KFAC_GROUP_BYTES))
    return KFAC(layout, kfac_blocks) if representation == "kfac" else EKFAC(layout, _ekfac_blocks(kfac_blocks, batches()))
