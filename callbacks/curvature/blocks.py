"""Per-layer curvature blocks: the algebra on one layer's flat vectors (layout order).

Damping is always exact: ``solve(x, damping)`` solves (M + damping I) y = x. For a Kronecker
block this goes through the eigenbases of both factors,
(G (x) A + damping I)^-1 = (Q_G (x) Q_A) diag(1 / (l_G (x) l_A + damping)) (Q_G (x) Q_A)^T,
not through the factored (pi-damping) approximation (G + c I) (x) (A + damping / c I).
"""

from abc import ABC, abstractmethod
from functools import cached_property

import torch

from callbacks.curvature.layers import KroneckerLayer


class Block(ABC):
    """One symmetric positive semi-definite block acting on flat vectors of one layer."""

    @abstractmethod
    def mv(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def solve(self, x: torch.Tensor, damping: float) -> torch.Tensor: ...

    @abstractmethod
    def inverse(self, damping: float) -> "Block": ...

    @abstractmethod
    def trace(self) -> torch.Tensor: ...

    @abstractmethod
    def frobenius_squared(self) -> torch.Tensor: ...

    @abstractmethod
    def to_dense(self) -> torch.Tensor: ...


class DenseBlock(Block):
    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    def _damped(self, damping: float) -> torch.Tensor:
        return self.matrix + damping * torch.eye(len(self.matrix), dtype=self.matrix.dtype, device=self.matrix.device)

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix @ x

    def solve(self, x: torch.Tensor, damping: float) -> torch.Tensor:
        return torch.linalg.solve(self._damped(damping), x)

    def inverse(self, damping: float) -> "DenseBlock":
        return DenseBlock(torch.linalg.inv(self._damped(damping)))

    def trace(self) -> torch.Tensor:
        return self.matrix.trace()

    def frobenius_squared(self) -> torch.Tensor:
        return self.matrix.square().sum()

    def to_dense(self) -> torch.Tensor:
        return self.matrix


class DiagonalBlock(Block):
    def __init__(self, diagonal: torch.Tensor) -> None:
        self.diagonal = diagonal

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return self.diagonal * x

    def solve(self, x: torch.Tensor, damping: float) -> torch.Tensor:
        return x / (self.diagonal + damping)

    def inverse(self, damping: float) -> "DiagonalBlock":
        return DiagonalBlock(1 / (self.diagonal + damping))

    def trace(self) -> torch.Tensor:
        return self.diagonal.sum()

    def frobenius_squared(self) -> torch.Tensor:
        return self.diagonal.square().sum()

    def to_dense(self) -> torch.Tensor:
        return torch.diag(self.diagonal)


def _to_layout_order(layer: KroneckerLayer, matrix_ordered: torch.Tensor) -> torch.Tensor:
    """A dense block indexed by the (out, in [+1]) matrix row-major, re-indexed in layout order."""
    order = layer.matrix_positions().to(matrix_ordered.device)
    return matrix_ordered[order][:, order]


class EigenBlock(Block):
    """``(Q_G (x) Q_A) diag(scaling) (Q_G (x) Q_A)^T`` with ``scaling`` of shape (out, in [+1]):
    the EKFAC block, and the exact damped inverse of a KFAC block."""

    def __init__(self, layer: KroneckerLayer, q_g: torch.Tensor, q_a: torch.Tensor, scaling: torch.Tensor) -> None:
        self.layer, self.q_g, self.q_a, self.scaling = layer, q_g, q_a, scaling

    def _apply(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        projected = self.q_g.T @ self.layer.to_matrix(x) @ self.q_a
        return self.layer.from_matrix(self.q_g @ (projected * scale) @ self.q_a.T)

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self.scaling)

    def solve(self, x: torch.Tensor, damping: float) -> torch.Tensor:
        return self._apply(x, 1 / (self.scaling + damping))

    def inverse(self, damping: float) -> "EigenBlock":
        return EigenBlock(self.layer, self.q_g, self.q_a, 1 / (self.scaling + damping))

    def trace(self) -> torch.Tensor:
        return self.scaling.sum()

    def frobenius_squared(self) -> torch.Tensor:
        return self.scaling.square().sum()

    def to_dense(self) -> torch.Tensor:
        basis = torch.kron(self.q_g, self.q_a)
        return _to_layout_order(self.layer, basis @ torch.diag(self.scaling.flatten()) @ basis.T)


class KroneckerBlock(Block):
    """``G (x) A`` on the (out, in [+1]) weight-and-bias matrix: ``mv`` is ``G X A``."""

    def __init__(self, layer: KroneckerLayer, g: torch.Tensor, a: torch.Tensor) -> None:
        self.layer, self.g, self.a = layer, g, a

    @cached_property
    def eigen(self) -> EigenBlock:
        """The same matrix in the eigenbases of its factors, scaling ``l_G l_A^T``."""
        values_g, q_g = torch.linalg.eigh(self.g)
        values_a, q_a = torch.linalg.eigh(self.a)
        return EigenBlock(self.layer, q_g, q_a, torch.outer(values_g, values_a))

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.from_matrix(self.g @ self.layer.to_matrix(x) @ self.a)

    def solve(self, x: torch.Tensor, damping: float) -> torch.Tensor:
        return self.eigen.solve(x, damping)

    def inverse(self, damping: float) -> EigenBlock:
        return self.eigen.inverse(damping)

    def trace(self) -> torch.Tensor:
        return self.g.trace() * self.a.trace()

    def frobenius_squared(self) -> torch.Tensor:
        return self.g.square().sum() * self.a.square().sum()

    def to_dense(self) -> torch.Tensor:
        return _to_layout_order(self.layer, torch.kron(self.g, self.a))
