"""Empirical neural tangent kernels ``K(x, x') = J(x) J(x')^T`` of any model, where ``J(x)`` is the
Jacobian of the model's outputs for one example with respect to its trainable parameters.

Shapes, with ``O`` the number of outputs per example (the output flattened after the batch
dimension): ``mode="full"`` gives (N1, N2, O, O), ``"diagonal"`` the output-diagonal (N1, N2, O),
``"trace"`` (N1, N2) reduced over outputs by ``trace_reduction``: ``"mean"`` (the default, as
neural-tangents does: ``sum_a K_aa / O``) or ``"sum"`` (as the torch.func tutorial does).

:class:`EmpiricalNTK` holds these options and computes kernels. Three implementations, chosen
by ``implementation="auto"`` or by name:

- ``"jacobian"``: per-example Jacobians with ``vmap(jacrev)``, contracted chunk by chunk.
- ``"ntk_vector"``: NTK-vector products: ``vjp`` at the second inputs gives ``J(x')^T e`` for each
  output basis vector, ``jvp`` at the first inputs applies ``J(x)`` to them.
- ``"structured"``: for ``nn.Linear`` and ``nn.Conv2d`` layers, the kernel factorises into the Gram
  matrix of the layer inputs (convolution patches; with a 1 appended for the bias) times the Gram
  matrix of the output's gradients with respect to the layer outputs, summed over pairs of
  positions (spatial positions, and repeated calls of the same layer). One forward and one
  batched backward pass per chunk give both factors; the Jacobian of the model is never formed.
  Each layer is contracted in the order expected to be faster: over pairs of positions (always
  for Linear layers), or, when a convolution has few weights for its number of pairs of
  positions, through its per-example gradients assembled from the factors (O x its weights,
  formed once per chunk). Blocks on the diagonal of ``K(X, X)`` compute only half of their
  symmetric Gram matrices.
  Other parameter-owning modules (BatchNorm, grouped convolutions, ...) fall back to Jacobian
  contraction for their own parameters, so the kernel is still exact. It assumes each layer sees
  the examples along its input's first dimension and that its parameters are used only through
  its own forward (a layer that is never called is refused).

Traced kernels are summed over outputs inside each contraction (one Gram matrix of the
gradients flattened over outputs and parameters, or of the output gradients flattened over
outputs and channels), never formed per output and reduced afterwards.

``"auto"`` picks ``"structured"`` when at least half of the trainable parameters are in layers
it factorises and no parameter is shared between modules, else ``"jacobian"``.

Memory: ``chunk_size`` examples are processed at once, so the working memory of a block is that
of ``chunk_size`` examples against ``chunk_size`` examples; the features of chunks (Jacobians,
or layer factors) are kept up to ``FEATURE_CACHE_BYTES`` rather than recomputed.

The model is evaluated in its current mode, which is never changed, nor are parameters or
``.grad``. A kernel needs each example's outputs to be a deterministic function of that example,
so BatchNorm and Dropout in training mode are refused: call ``model.eval()`` first.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from callbacks.linearization.alignment import center_kernel
from framework.errors import UserInputError, check_choice, check_positive

MODES = ("full", "trace", "diagonal")
TRACE_REDUCTIONS = ("mean", "sum")
IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vector", "structured")
ROOT_GROUP = "(root)"
FEATURE_CACHE_BYTES = 512 * 2**20
# The contraction over pairs of positions is a chain of small batched products and permutations,
# measured at about a quarter of the speed of one large matrix product (CPU, SmallCNN on 8x8).
POSITION_PAIRS_SLOWDOWN = 4
# Below this many rows a Gram matrix is one matrix product: splitting further costs more in small
# products than symmetry saves.
SYMMETRIC_GRAM_LEAF = 128


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Names of the trainable parameters grouped by the module that owns them directly (the
    "layers" of per-layer kernels), keyed by module name (``"(root)"`` for the model itself)."""
    groups: dict[str, list[str]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            module_name, _, _ = name.rpartition(".")
            groups.setdefault(module_name or ROOT_GROUP, []).append(name)
    return groups


@dataclass(frozen=True)
class EmpiricalNTK:
    """How to compute empirical NTKs (options checked at construction, so a bad config fails
    early); call it for the kernel, :meth:`layerwise` for the kernel of each parameter group.

    Args:
        mode: ``"full"`` (N1, N2, O, O), ``"diagonal"`` (N1, N2, O) or ``"trace"`` (N1, N2).
        trace_reduction: ``"mean"`` (neural-tangents) or ``"sum"`` (torch.func tutorial) over
            outputs, for ``mode="trace"``.
        centered: subtract from the gradients their mean over each set of examples (``H K H``).
        implementation: ``"auto"``, ``"jacobian"``, ``"ntk_vector"`` or ``"structured"``.
        chunk_size: examples processed at once, which bounds working memory (see the module).
    """

    mode: str = "full"
    trace_reduction: str = "mean"
    centered: bool = False
    implementation: str = "auto"
    chunk_size: int = 64

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("trace_reduction", self.trace_reduction, TRACE_REDUCTIONS)
        check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        check_positive("chunk_size", self.chunk_size)

    def __call__(self, model: nn.Module, inputs_1: torch.Tensor, inputs_2: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel ``K(inputs_1, inputs_2)``; ``inputs_2`` defaults to ``inputs_1``."""
        return self._kernels(model, inputs_1, inputs_2, per_layer=False)["total"]

    def layerwise(self, model: nn.Module, inputs_1: torch.Tensor, inputs_2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The kernel of each group of :func:`parameter_groups` (of that module's own
        parameters), in model order; they sum to the kernel."""
        return self._kernels(model, inputs_1, inputs_2, per_layer=True)

    def _kernels(self, model: nn.Module, inputs_1: torch.Tensor, inputs_2: torch.Tensor | None, per_layer: bool) -> dict[str, torch.Tensor]:
        _check_examples_independent(model)
        groups = parameter_groups(model)
        if not groups:
            raise UserInputError("the model has no trainable parameters, so its NTK is empty")
        implementation = self.implementation
        if implementation == "auto":
            implementation = "structured" if _prefers_structured(model, groups) else "jacobian"
        function = _ModelFunction(model)
        if implementation == "structured":
            _check_no_shared_parameters(model)
            kernels_of = _StructuredKernels(function, model, groups, self.mode)
        else:
            if not per_layer:  # one group: a single contraction, and one NTK-vector product pass
                groups = {"total": [name for names in groups.values() for name in names]}
            kernels_of = _JacobianKernels(function, groups) if implementation == "jacobian" else _NTKVectorKernels(function, groups)
        kernels = _assemble(kernels_of, inputs_1, inputs_2, self.chunk_size, self.mode, per_layer)
        if self.mode == "trace" and self.trace_reduction == "mean":
            kernels = {g: k / function.num_outputs for g, k in kernels.items()}
        return {g: center_kernel(k) for g, k in kernels.items()} if self.centered else kernels


def _check_examples_independent(model: nn.Module) -> None:
    for name, module in model.named_modules():
        couples = isinstance(module, nn.modules.batchnorm._BatchNorm)
        random = isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
        if module.training and (couples or random):
            raise UserInputError(
                f"module {name or ROOT_GROUP!r} ({type(module).__name__}) is in training mode, where an example's "
                "output depends on the other examples or on random draws; call model.eval() before computing the NTK"
            )


def _has_shared_parameters(model: nn.Module) -> bool:
    return len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.parameters()))


def _check_no_shared_parameters(model: nn.Module) -> None:
    if _has_shared_parameters(model):
        raise UserInputError("implementation='structured' does not support parameters shared between modules; use 'jacobian'")


class _ModelFunction:
    """The model as a function of its trainable parameters (detached, at their current values)
    and of a batch of inputs, with outputs flattened to (n, O); ``num_outputs`` is O, known after
    the first call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.parameters = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        self.num_outputs = 0

    def __call__(self, inputs: torch.Tensor, overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        parameters = self.parameters if overrides is None else {**self.parameters, **overrides}
        outputs = functional_call(self.model, parameters, (inputs,)).reshape(inputs.shape[0], -1)
        self.num_outputs = outputs.shape[1]
        return outputs

    def subset(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.parameters[name] for name in names}


class _Implementation(Protocol):
    """Features of a chunk of examples (Jacobians, layer factors, or the inputs themselves), and
    the kernel block of each group between the features of two chunks, in a ``mode`` of
    :data:`MODES` (``"trace"`` summed over outputs)."""

    def features(self, inputs: torch.Tensor) -> Any: ...

    def blocks(self, features_1: Any, features_2: Any, mode: str) -> dict[str, torch.Tensor]: ...


def _assemble(
    kernels_of: _Implementation, inputs_1: torch.Tensor, inputs_2: torch.Tensor | None, chunk_size: int, mode: str, per_layer: bool
) -> dict[str, torch.Tensor]:
    """Fill the kernels (one per group, or their sum as ``"total"``) block by block over chunks of
    examples; for ``K(X, X)`` only blocks on or above the diagonal are computed, the others mirrored.
    In ``"trace"`` mode the blocks are already summed over outputs, never formed per output."""
    symmetric = inputs_2 is None
    inputs_2 = inputs_1 if symmetric else inputs_2
    column_features = _FeatureCache(kernels_of)
    kernels: dict[str, torch.Tensor] = {}
    for rows, chunk_1 in _chunks(inputs_1, chunk_size):
        features_1 = column_features.get(rows, chunk_1) if symmetric else kernels_of.features(chunk_1)
        for columns, chunk_2 in _chunks(inputs_2, chunk_size):
            if symmetric and columns.start < rows.start:
                continue
            # On the diagonal of K(X, X) both sides are the same features: contractions see it and
            # compute only half of the symmetric block.
            features_2 = features_1 if symmetric and columns == rows else column_features.get(columns, chunk_2)
            blocks = kernels_of.blocks(features_1, features_2, mode)
            if not per_layer:
                blocks = {"total": sum(blocks.values())}
            for group, block in blocks.items():
                if group not in kernels:
                    kernels[group] = block.new_zeros(len(inputs_1), len(inputs_2), *block.shape[2:])
                kernels[group][rows, columns] = block
                if symmetric and columns != rows:
                    kernels[group][columns, rows] = block.permute(1, 0, 3, 2) if mode == "full" else block.transpose(0, 1)
    return kernels


class _FeatureCache:
    """Features of the chunks of the second inputs, kept while they total at most
    ``FEATURE_CACHE_BYTES`` (beyond, recomputed when needed again), so that usually each chunk's
    features are computed once."""

    def __init__(self, kernels_of: _Implementation) -> None:
        self.kernels_of = kernels_of
        self.kept: dict[int, Any] = {}
        self.kept_bytes = 0

    def get(self, chunk: slice, inputs: torch.Tensor) -> Any:
        if chunk.start in self.kept:
            return self.kept[chunk.start]
        features = self.kernels_of.features(inputs)
        size = _nbytes(features)
        if self.kept_bytes + size <= FEATURE_CACHE_BYTES:
            self.kept[chunk.start] = features
            self.kept_bytes += size
        return features


def _nbytes(features: Any) -> int:
    if isinstance(features, torch.Tensor):
        return features.nbytes
    if isinstance(features, _LayerFactors):
        return features.inputs.nbytes + features.output_gradients.nbytes
    return sum(_nbytes(value) for value in features.values())


def _chunks(inputs: torch.Tensor, chunk_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    for start in range(0, len(inputs), chunk_size):
        yield slice(start, min(start + chunk_size, len(inputs))), inputs[start : start + chunk_size]


def _contract_jacobians(jacobians_1: torch.Tensor, jacobians_2: torch.Tensor, mode: str) -> torch.Tensor:
    """Kernel block from per-example Jacobians (n1, O, P) and (n2, O, P); half the work when
    both are the same tensor (a block on the diagonal of K(X, X)). Traced, one product of the
    Jacobians flattened over outputs and parameters, in whatever per-example order both sides
    share (the traced layer gradients of :func:`_layer_gradients` are already flat)."""
    same = jacobians_1 is jacobians_2
    if mode == "trace":
        rows_1, rows_2 = jacobians_1.flatten(start_dim=1), jacobians_2.flatten(start_dim=1)
        return _symmetric_gram(rows_1) if same else rows_1 @ rows_2.T
    if not same:
        return torch.einsum("iap,jap->ija" if mode == "diagonal" else "iap,jbp->ijab", jacobians_1, jacobians_2)
    n, num_outputs, _ = jacobians_1.shape
    if mode == "diagonal":
        return _symmetric_gram(jacobians_1.transpose(0, 1)).permute(1, 2, 0)
    return _symmetric_gram(jacobians_1.reshape(n * num_outputs, -1)).reshape(n, num_outputs, n, num_outputs).transpose(1, 2)


def _symmetric_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rows^T`` over the last two dimensions, (..., m, P) -> (..., m, m), computing the
    two diagonal quarters recursively and one off-diagonal quarter, so about half the products
    of a plain matrix product (a symmetric rank-k update, which torch does not expose)."""
    m = rows.shape[-2]
    if m <= SYMMETRIC_GRAM_LEAF:
        return rows @ rows.transpose(-1, -2)
    half = m // 2
    top, bottom = rows[..., :half, :], rows[..., half:, :]
    gram = rows.new_empty(*rows.shape[:-2], m, m)
    gram[..., :half, :half] = _symmetric_gram(top)
    gram[..., half:, half:] = _symmetric_gram(bottom)
    off_diagonal = top @ bottom.transpose(-1, -2)
    gram[..., :half, half:] = off_diagonal
    gram[..., half:, :half] = off_diagonal.transpose(-1, -2)
    return gram


class _JacobianKernels:
    """Jacobian contraction: features are per-example Jacobians of each group, (n, O, P_group)."""

    def __init__(self, function: _ModelFunction, groups: dict[str, list[str]]) -> None:
        self.function = function
        self.groups = groups

    def features(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        def example_outputs(parameters: dict[str, torch.Tensor], example: torch.Tensor) -> torch.Tensor:
            return self.function(example.unsqueeze(0), parameters).squeeze(0)

        names = [name for names in self.groups.values() for name in names]
        jacobians = vmap(jacrev(example_outputs), in_dims=(None, 0))(self.function.subset(names), inputs)
        return {
            group: torch.cat([jacobians[name].flatten(start_dim=2) for name in names], dim=2)
            for group, names in self.groups.items()
        }

    def blocks(self, features_1: dict, features_2: dict, mode: str) -> dict[str, torch.Tensor]:
        return {group: _contract_jacobians(features_1[group], features_2[group], mode) for group in self.groups}


class _NTKVectorKernels:
    """NTK-vector products: for each group, ``vjp`` at the second chunk with every output basis
    vector, then ``jvp`` at the first chunk along each resulting parameter-space vector."""

    def __init__(self, function: _ModelFunction, groups: dict[str, list[str]]) -> None:
        self.function = function
        self.groups = groups

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs

    def blocks(self, inputs_1: torch.Tensor, inputs_2: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        return {group: self._block(inputs_1, inputs_2, names, mode) for group, names in self.groups.items()}

    def _block(self, inputs_1: torch.Tensor, inputs_2: torch.Tensor, names: list[str], mode: str) -> torch.Tensor:
        primals = self.function.subset(names)
        outputs_2, pullback = vjp(lambda parameters: self.function(inputs_2, parameters), primals)
        n2, num_outputs = outputs_2.shape
        basis = torch.eye(n2 * num_outputs, dtype=outputs_2.dtype, device=outputs_2.device).reshape(-1, n2, num_outputs)
        (directions,) = vmap(pullback)(basis)  # J(x'_j)^T e_b for every (j, b)

        def push_forward(direction: dict[str, torch.Tensor]) -> torch.Tensor:
            return jvp(lambda parameters: self.function(inputs_1, parameters), (primals,), (direction,))[1]

        products = vmap(push_forward)(directions)  # (n2 * O, n1, O): K[i, j, a, b] at [(j, b), i, a]
        kernel = products.reshape(n2, num_outputs, len(inputs_1), num_outputs).permute(2, 0, 3, 1)
        if mode == "full":
            return kernel
        diagonal = torch.diagonal(kernel, dim1=2, dim2=3)
        return diagonal.sum(-1) if mode == "trace" else diagonal


@dataclass
class _LayerFactors:
    """What the structured kernel of a Linear or Conv2d layer needs for a chunk of n examples."""

    inputs: torch.Tensor  # (n, L, p): layer inputs (conv patches) at L positions, with a 1 for the bias
    output_gradients: torch.Tensor  # (O, n, L, c): d output_a / d layer output, per position


def _factorizable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _prefers_structured(model: nn.Module, groups: dict[str, list[str]]) -> bool:
    if _has_shared_parameters(model):
        return False
    sizes = {group: sum(model.get_parameter(name).numel() for name in names) for group, names in groups.items()}
    factorized = sum(size for group, size in sizes.items() if _factorizable(_owner(model, group)))
    return 2 * factorized >= sum(sizes.values())


def _owner(model: nn.Module, group: str) -> nn.Module:
    return model if group == ROOT_GROUP else model.get_submodule(group)


class _StructuredKernels:
    """Factorised kernels for Linear and Conv2d layers, Jacobian contraction for the rest."""

    def __init__(self, function: _ModelFunction, model: nn.Module, groups: dict[str, list[str]], mode: str) -> None:
        self.function = function
        self.mode = mode
        self.order = list(groups)
        self.layers = {group: _owner(model, group) for group in groups if _factorizable(_owner(model, group))}
        # Which of weight and bias are trainable, read now: inside functional_call they are detached.
        self.trainable = {
            group: (layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad)
            for group, layer in self.layers.items()
        }
        self.fallback = _JacobianKernels(function, {g: names for g, names in groups.items() if g not in self.layers})

    def features(self, inputs: torch.Tensor) -> dict[str, _LayerFactors | torch.Tensor]:
        """Layer factors, or for the layers cheaper to contract through per-example gradients,
        those gradients (formed once per chunk, not once per block); Jacobians of the rest."""
        features: dict[str, _LayerFactors | torch.Tensor] = {}
        for group, factors in (self._layer_factors(inputs) if self.layers else {}).items():
            through_gradients = _cheaper_through_gradients(factors, factors, self.mode)
            features[group] = _layer_gradients(factors, self.mode) if through_gradients else factors
        if self.fallback.groups:
            features.update(self.fallback.features(inputs))
        return features

    def blocks(self, features_1: dict, features_2: dict, mode: str) -> dict[str, torch.Tensor]:
        blocks = self.fallback.blocks(features_1, features_2, mode) if self.fallback.groups else {}
        blocks.update({group: _factorized_block(features_1[group], features_2[group], mode) for group in self.layers})
        return {group: blocks[group] for group in self.order}

    def _layer_factors(self, inputs: torch.Tensor) -> dict[str, _LayerFactors]:
        """Layer inputs from one forward pass; output gradients from one backward pass per output
        (batched) to zero probes added to the layer outputs. Summing an output over the chunk
        before differentiating is exact because examples do not interact."""
        n = len(inputs)
        outputs, layer_inputs, probes = self._forward_with_probes(inputs)
        all_probes = [probe for group in self.layers for probe in probes[group]]
        num_outputs = outputs.shape[1]
        basis = torch.eye(num_outputs, dtype=outputs.dtype, device=outputs.device).unsqueeze(1).repeat(1, n, 1)
        gradients = torch.autograd.grad(outputs, all_probes, basis, is_grads_batched=True, allow_unused=True)
        gradients_by_probe = iter(
            probe.new_zeros(num_outputs, *probe.shape) if gradient is None else gradient
            for probe, gradient in zip(all_probes, gradients)
        )
        factors = {}
        for group, layer in self.layers.items():
            per_call = [_output_gradient_factor(layer, next(gradients_by_probe), n) for _ in probes[group]]
            factors[group] = _LayerFactors(_concatenate(layer_inputs[group], dim=1), _concatenate(per_call, dim=2))
        return factors

    def _forward_with_probes(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """The outputs (n, O), and for each layer and each of its calls, its input factor and the
        zero probe added to its output."""
        layer_inputs: dict[str, list[torch.Tensor]] = {group: [] for group in self.layers}
        probes: dict[str, list[torch.Tensor]] = {group: [] for group in self.layers}

        def capture(group: str):
            def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                layer_inputs[group].append(self._input_factor(group, layer, args[0], len(inputs)))
                probe = torch.zeros_like(output, requires_grad=True)
                probes[group].append(probe)
                return output + probe

            return hook

        handles = [layer.register_forward_hook(capture(group)) for group, layer in self.layers.items()]
        try:
            with torch.enable_grad():
                outputs = self.function(inputs)
        finally:
            for handle in handles:
                handle.remove()
        for group, calls in probes.items():
            if not calls:
                raise UserInputError(f"layer {group!r} owns parameters but was not called in forward; use implementation='jacobian'")
        return outputs, layer_inputs, probes

    def _input_factor(self, group: str, layer: nn.Module, layer_input: torch.Tensor, n: int) -> torch.Tensor:
        """Layer inputs as (n, L, p): convolution patches or the last dimension of a Linear input,
        the weight's part only if trainable, and a column of ones if the bias is trainable."""
        layer_input = layer_input.detach()
        if isinstance(layer, nn.Conv2d):
            layer_input = F.unfold(layer_input, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
        layer_input = layer_input.reshape(n, -1, layer_input.shape[-1])
        weight_trainable, bias_trainable = self.trainable[group]
        columns = [layer_input] if weight_trainable else []
        if bias_trainable:
            columns.append(layer_input.new_ones(*layer_input.shape[:2], 1))
        return torch.cat(columns, dim=2)


def _concatenate(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` without the copy when there is one tensor (a layer called once)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _output_gradient_factor(layer: nn.Module, gradient: torch.Tensor, n: int) -> torch.Tensor:
    """Gradients with respect to a layer's output, (O, n, ...), as (O, n, L, c)."""
    if isinstance(layer, nn.Conv2d):
        return gradient.flatten(start_dim=3).transpose(2, 3)
    return gradient.reshape(gradient.shape[0], n, -1, gradient.shape[-1])


def _factorized_block(features_1: _LayerFactors | torch.Tensor, features_2: _LayerFactors | torch.Tensor, mode: str) -> torch.Tensor:
    """``K[i, j, a, b] = sum_{l, m} (A1[i, l] . A2[j, m]) (G1[a, i, l] . G2[b, j, m])``, contracted
    over pairs of positions from the layer factors, or through each example's gradient of the
    layer, ``sum_l G[a, i, l] (x) A[i, l]``, when the features already are those gradients (if
    only one side is, as for inputs of two image sizes, the other side's are formed)."""
    if isinstance(features_1, _LayerFactors) and isinstance(features_2, _LayerFactors):
        return _block_through_positions(features_1, features_2, mode)
    if isinstance(features_1, _LayerFactors):
        features_1 = _layer_gradients(features_1, mode)
    if isinstance(features_2, _LayerFactors):
        features_2 = _layer_gradients(features_2, mode)
    return _contract_jacobians(features_1, features_2, mode)


def _cheaper_through_gradients(factors_1: _LayerFactors, factors_2: _LayerFactors, mode: str) -> bool:
    """Whether contracting per-example layer gradients (one large matrix product) is expected to
    be faster than contracting over pairs of positions, by multiplications per pair of examples
    with the latter weighted by ``POSITION_PAIRS_SLOWDOWN``. Layers at a single position (Linear)
    always go through positions: their Gram matrices are the cheapest."""
    num_outputs, _, positions_1, width = factors_1.output_gradients.shape
    positions_2, fan_in = factors_2.inputs.shape[1:]
    if positions_1 == positions_2 == 1:
        return False
    outputs_2 = num_outputs if mode == "full" else 1
    through_positions = positions_1 * positions_2 * (fan_in + num_outputs * width) + positions_1 * num_outputs * outputs_2 * width
    return num_outputs * outputs_2 * fan_in * width < POSITION_PAIRS_SLOWDOWN * through_positions


def _block_through_positions(factors_1: _LayerFactors, factors_2: _LayerFactors, mode: str) -> torch.Tensor:
    """The factorised kernel block over pairs of positions: input Gram times output-gradient Gram."""
    inputs_1, gradients_1 = factors_1.inputs, factors_1.output_gradients
    inputs_2, gradients_2 = factors_2.inputs, factors_2.output_gradients
    if inputs_1.shape[1] == inputs_2.shape[1] == 1:  # one position: a product of two Gram matrices
        same = factors_1 is factors_2  # a block on the diagonal of K(X, X): symmetric Grams
        gram = (lambda rows_1, rows_2: _symmetric_gram(rows_1)) if same else (lambda rows_1, rows_2: rows_1 @ rows_2.transpose(-1, -2))
        input_gram = gram(inputs_1[:, 0], inputs_2[:, 0])
        gradients_1, gradients_2 = gradients_1[:, :, 0], gradients_2[:, :, 0]  # (O, n, c)
        if mode == "diagonal":
            return input_gram.unsqueeze(2) * gram(gradients_1, gradients_2).permute(1, 2, 0)
        rows_1, rows_2 = gradients_1.transpose(0, 1).flatten(start_dim=1), gradients_2.transpose(0, 1).flatten(start_dim=1)
        if mode == "trace":  # sum over outputs: one Gram of the gradients flattened over (outputs, width)
            return input_gram * gram(rows_1, rows_2)
        rows_1, rows_2 = rows_1.reshape(-1, gradients_1.shape[2]), rows_2.reshape(-1, gradients_2.shape[2])
        gradient_gram = gram(rows_1, rows_2).reshape(len(input_gram), -1, input_gram.shape[1], gradients_2.shape[0])
        return (input_gram[:, None, :, None] * gradient_gram).permute(0, 2, 1, 3)
    input_gram = torch.einsum("ilp,jmp->ijlm", inputs_1, inputs_2)
    weighted_gradients_2 = torch.einsum("ijlm,bjmc->ijlbc", input_gram, gradients_2)
    contraction = {"full": "ailc,ijlbc->ijab", "diagonal": "ailc,ijlac->ija", "trace": "ailc,ijlac->ij"}[mode]
    return torch.einsum(contraction, gradients_1, weighted_gradients_2)


def _layer_gradients(factors: _LayerFactors, mode: str) -> torch.Tensor:
    """Per-example Jacobians of the layer output with respect to its parameters, (n, O, c p), from
    one batched product over examples of (p, L) by (L, O c); in ``"trace"`` mode, where only their
    products summed over outputs and parameters count, (n, p O c) as that product lays them out
    (no copy; this layout is also the fastest of the product's, about 1.5x on SmallCNN's convolutions)."""
    num_outputs, n, positions, width = factors.output_gradients.shape
    gradients = factors.output_gradients.permute(1, 2, 0, 3).reshape(n, positions, num_outputs * width)
    products = torch.bmm(factors.inputs.transpose(1, 2), gradients)
    if mode == "trace":
        return products.reshape(n, -1)
    return products.reshape(n, -1, num_outputs, width).permute(0, 2, 3, 1).reshape(n, num_outputs, -1)
