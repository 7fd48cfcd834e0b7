"""Fisher representations behind one interface: ``mv``, ``vTMv``, ``solve(v, damping)``,
``inverse(damping)``, ``trace``, ``frobenius_norm``, ``to_dense``. Vectors are :class:`PVector`;
dense matrices are indexed in the layout order of :mod:`callbacks.curvature.layers`. Damping is
exact everywhere: ``solve(v, damping)`` solves (F + damping I) x = v."""

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch.func import functional_call, jvp, vjp

from callbacks.curvature.blocks import Block, DenseBlock
from callbacks.curvature.layers import ParameterLayout, restored_pruned_tensors
from callbacks.curvature.pvector import PVector
from framework.errors import UserInputError, check_positive


class FisherRepresentation(ABC):
    """A symmetric positive semi-definite matrix over the parameters of ``layout``."""

    def __init__(self, layout: ParameterLayout) -> None:
        self.layout = layout

    @abstractmethod
    def mv(self, v: PVector) -> PVector:
        """The product F v."""

    def vTMv(self, v: PVector) -> torch.Tensor:
        """The quadratic form v^T F v."""
        return v.dot(self.mv(v))

    def solve(self, v: PVector, damping: float = 0.0) -> PVector:
        """x with (F + damping I) x = v."""
        check_positive("damping", damping, allow_zero=True)
        return self._solve(v, damping)

    def inverse(self, damping: float = 0.0) -> "FisherRepresentation":
        """(F + damping I)^-1, in the cheapest representation that holds it exactly."""
        check_positive("damping", damping, allow_zero=True)
        return self._inverse(damping)

    @abstractmethod
    def _solve(self, v: PVector, damping: float) -> PVector: ...

    @abstractmethod
    def _inverse(self, damping: float) -> "FisherRepresentation": ...

    @abstractmethod
    def trace(self) -> torch.Tensor: ...

    @abstractmethod
    def frobenius_norm(self) -> torch.Tensor: ...

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The (P, P) matrix in layout order."""


class Dense(FisherRepresentation):
    """The full (P, P) matrix."""

    def __init__(self, layout: ParameterLayout, matrix: torch.Tensor) -> None:
        super().__init__(layout)
        self.block = DenseBlock(matrix)

    def mv(self, v: PVector) -> PVector:
        return PVector.from_flat(self.layout, self.block.mv(v.flatten()))

    def _solve(self, v: PVector, damping: float) -> PVector:
        return PVector.from_flat(self.layout, self.block.solve(v.flatten(), damping))

    def _inverse(self, damping: float) -> "Dense":
        return Dense(self.layout, self.block.inverse(damping).matrix)

    def trace(self) -> torch.Tensor:
        return self.block.trace()

    def frobenius_norm(self) -> torch.Tensor:
        return self.block.frobenius_squared().sqrt()

    def to_dense(self) -> torch.Tensor:
        return self.block.matrix


class Layerwise(FisherRepresentation):
    """Block diagonal over layers: ``blocks[layer_name]`` acts on that layer's flat part."""

    def __init__(self, layout: ParameterLayout, blocks: dict[str, Block]) -> None:
        super().__init__(layout)
        self.blocks = blocks

    def _map(self, v: PVector, operation) -> PVector:
        return PVector(self.layout, {name: operation(block, v.tensors[name]) for name, block in self.blocks.items()})

    def mv(self, v: PVector) -> PVector:
        return self._map(v, lambda block, x: block.mv(x))

    def _solve(self, v: PVector, damping: float) -> PVector:
        return self._map(v, lambda block, x: block.solve(x, damping))

    def _inverse(self, damping: float) -> "Layerwise":
        return self._inverse_type(self.layout, {name: block.inverse(damping) for name, block in self.blocks.items()})

    @property
    def _inverse_type(self) -> type["Layerwise"]:
        return type(self)

    def trace(self) -> torch.Tensor:
        return sum(block.trace() for block in self.blocks.values())

    def frobenius_norm(self) -> torch.Tensor:
        return sum(block.frobenius_squared() for block in self.blocks.values()).sqrt()

    def to_dense(self) -> torch.Tensor:
        return torch.block_diag(*(block.to_dense() for block in self.blocks.values()))


class Diagonal(Layerwise):
    """The diagonal of F (a DiagonalBlock per layer)."""


class BlockDiagonal(Layerwise):
    """The diagonal blocks of F, one dense block per layer."""


class EKFAC(Layerwise):
    """KFAC's eigenbasis with the diagonal re-estimated in it (EigenBlock per Kronecker layer,
    DiagonalBlock for the rest). Also the exact damped inverse of a KFAC."""


class KFAC(Layerwise):
    """G (x) A per Kronecker layer (KroneckerBlock), the diagonal of F for the rest. Its exact
    damped inverse is diagonal in the factors' eigenbases, so ``inverse`` returns an EKFAC."""

    @property
    def _inverse_type(self) -> type[Layerwise]:
        return EKFAC


class LowRank(FisherRepresentation):
    """``U diag(eigenvalues) U^T + shift I`` with orthonormal columns U (P, k): the top-k
    eigenpairs of a Fisher (shift 0), and also the exact damped inverse of one."""

    def __init__(
        self, layout: ParameterLayout, eigenvectors: torch.Tensor, eigenvalues: torch.Tensor, shift: float = 0.0
    ) -> None:
        super().__init__(layout)
        self.eigenvectors, self.eigenvalues, self.shift = eigenvectors, eigenvalues, shift

    @classmethod
    def from_representation(
        cls,
        fisher: FisherRepresentation,
        rank: int,
        iterations: int = 50,
        generator: torch.Generator | None = None,
    ) -> "LowRank":
        """Top-``rank`` eigenpairs: exact (``eigh``) from a Dense Fisher; otherwise by subspace
        iteration on ``fisher.mv`` (``iterations`` rounds on ``rank + 5`` vectors, then
        Rayleigh-Ritz), which needs only matrix-vector products."""
        check_positive("rank", rank)
        size = fisher.layout.size
        if rank > size:
            raise UserInputError(f"rank={rank} exceeds the number of parameters {size}")
        if isinstance(fisher, Dense):
            values, vectors = torch.linalg.eigh(fisher.to_dense())
        else:
            reference = next(iter(fisher.layout.parameters().values()))
            start = torch.randn(size, min(rank + 5, size), generator=generator, dtype=reference.dtype, device=reference.device)
            basis = torch.linalg.qr(start).Q
            for _ in range(iterations):
                basis = torch.linalg.qr(_apply_to_columns(fisher, basis)).Q
            values, rotation = torch.linalg.eigh(basis.T @ _apply_to_columns(fisher, basis))
            vectors = basis @ rotation
        return cls(fisher.layout, vectors[:, -rank:].flip(1), values[-rank:].flip(0))

    def _apply(self, v: PVector, eigenvalue_map, shift: float) -> PVector:
        x = v.flatten()
        coefficients = self.eigenvectors.T @ x
        return PVector.from_flat(self.layout, self.eigenvectors @ (eigenvalue_map * coefficients) + shift * x)

    def mv(self, v: PVector) -> PVector:
        return self._apply(v, self.eigenvalues, self.shift)

    def _inverse(self, damping: float) -> "LowRank":
        if self.shift + damping == 0:
            raise UserInputError("a low-rank Fisher is singular: inverse and solve need damping > 0")
        outside = 1 / (self.shift + damping)
        return LowRank(self.layout, self.eigenvectors, 1 / (self.eigenvalues + self.shift + damping) - outside, outside)

    def _solve(self, v: PVector, damping: float) -> PVector:
        return self._inverse(damping).mv(v)

    def trace(self) -> torch.Tensor:
        return self.eigenvalues.sum() + self.shift * self.layout.size

    def frobenius_norm(self) -> torch.Tensor:
        outside = self.shift**2 * (self.layout.size - len(self.eigenvalues))
        return ((self.eigenvalues + self.shift).square().sum() + outside).sqrt()

    def to_dense(self) -> torch.Tensor:
        identity = torch.eye(self.layout.size, dtype=self.eigenvectors.dtype, device=self.eigenvectors.device)
        return self.eigenvectors @ torch.diag(self.eigenvalues) @ self.eigenvectors.T + self.shift * identity


def _apply_to_columns(fisher: FisherRepresentation, matrix: torch.Tensor) -> torch.Tensor:
    return torch.stack([fisher.mv(PVector.from_flat(fisher.layout, column)).flatten() for column in matrix.T], dim=1)


class Implicit(FisherRepresentation):
    """No matrix stored: F v = (1/N) sum_n J_n^T (sum_d u_dn u_dn^T) J_n v by recomputation, a
    forward-mode and a reverse-mode pass of the model per stored batch, at the parameters it was
    built at (a snapshot). ``batches`` holds (inputs, draws) with draws (D, N, O) from
    :func:`callbacks.curvature.targets.output_gradient_draws`. ``solve`` is conjugate gradients;
    it stops at a residual of ``cg_tolerance`` relative to v, after at most ``cg_max_iterations``
    (default 10 P: rounding makes ill-conditioned Fishers need more than P), and warns if it did
    not get there. ``to_dense``, ``trace`` and ``frobenius_norm`` cost P products (streamed, no
    P x P stored except by ``to_dense`` and ``inverse``)."""

    def __init__(
        self,
        layout: ParameterLayout,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        cg_tolerance: float = 1e-10,
        cg_max_iterations: int | None = None,
    ) -> None:
        super().__init__(layout)
        check_positive("cg_tolerance", cg_tolerance)
        self.parameters = {t.name: t.value().detach().clone() for t in layout.tensors()}
        for tensor in layout.tensors():  # refuse at construction what mv cannot evaluate
            tensor.substitutes(self.parameters[tensor.name])
        self.batches = batches
        self.examples = sum(inputs.shape[0] for inputs, _ in batches)
        self.cg_tolerance = cg_tolerance
        self.cg_max_iterations = 10 * layout.size if cg_max_iterations is None else cg_max_iterations

    def mv(self, v: PVector) -> PVector:
        tangent = v.to_parameters()
        total = torch.zeros_like(v.flatten())
        tensors = self.layout.tensors()
        for inputs, draws in self.batches:

            def outputs(values: dict[str, torch.Tensor]) -> torch.Tensor:
                substituted = {
                    f"{t.module_name}.{key}" if t.module_name else key: value
                    for t in tensors
                    for key, value in t.substitutes(values[t.name]).items()
                }
                return functional_call(self.layout.model, substituted, (inputs,)).flatten(1)

            with restored_pruned_tensors(tensors):
                _, jacobian_v = jvp(outputs, (self.parameters,), (tangent,))
                cotangent = torch.einsum("dno,dn->no", draws, torch.einsum("dno,no->dn", draws, jacobian_v))
                _, pullback = vjp(outputs, self.parameters)
                total += PVector.from_parameters(self.layout, pullback(cotangent)[0]).flatten()
        return PVector.from_flat(self.layout, total / self.examples)

    def _solve(self, v: PVector, damping: float) -> PVector:
        b = v.flatten()
        x, residual = torch.zeros_like(b), b.clone()
        direction, residual_squared = residual.clone(), residual @ residual
        for _ in range(self.cg_max_iterations):
            if residual_squared.sqrt() <= self.cg_tolerance * b.norm():
                break
            product = self.mv(PVector.from_flat(self.layout, direction)).flatten() + damping * direction
            step = residual_squared / (direction @ product)
            x += step * direction
            residual -= step * product
            previous, residual_squared = residual_squared, residual @ residual
            direction = residual + (residual_squared / previous) * direction
        relative_residual = (residual_squared.sqrt() / b.norm()).item()
        if relative_residual > self.cg_tolerance:
            warnings.warn(
                f"conjugate gradients stopped after {self.cg_max_iterations} iterations at relative residual "
                f"{relative_residual:.2e} > cg_tolerance={self.cg_tolerance}; raise cg_max_iterations or the damping"
            )
        return PVector.from_flat(self.layout, x)

    def _inverse(self, damping: float) -> Dense:
        return Dense(self.layout, self.to_dense()).inverse(damping)

    def _columns(self) -> Iterator[torch.Tensor]:
        reference = next(iter(self.parameters.values()))
        identity = torch.eye(self.layout.size, dtype=reference.dtype, device=reference.device)
        for column in identity:
            yield self.mv(PVector.from_flat(self.layout, column)).flatten()

    def trace(self) -> torch.Tensor:
        return sum(column[i] for i, column in enumerate(self._columns()))

    def frobenius_norm(self) -> torch.Tensor:
        return sum(column.square().sum() for column in self._columns()).sqrt()

    def to_dense(self) -> torch.Tensor:
        return torch.stack(list(self._columns()), dim=1)
