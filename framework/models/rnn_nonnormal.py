"""Non-normal RNN (nnRNN, Kerg et al. 2019) and its orthogonal special case, with modReLU."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import UserInputError, check_choice, check_positive
from framework.models.rnn_base import RecurrentNetwork, State

ACTIVATIONS = ("modrelu", "identity")


class ModReLU(nn.Module):
    """modReLU (Arjovsky et al. 2016) for real inputs, ``sign(z) * relu(|z| + b)``: it keeps
    the sign and shrinks the magnitude by a learned per-unit threshold, so it is close to
    norm-preserving, unlike tanh."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(features).uniform_(-0.01, 0.01))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sign(z) * F.relu(z.abs() + self.bias)


def rotation_blocks(scales: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The block-diagonal matrix with 2x2 blocks ``scales[i] * R(angles[i])`` (2n x 2n), R the
    rotation by the angle: its eigenvalues are ``scales[i] * exp(+-1j * angles[i])``."""
    cos, sin = scales * torch.cos(angles), scales * torch.sin(angles)
    zeros = torch.zeros_like(sin)
    above = torch.stack([-sin, zeros], dim=-1).flatten()[:-1]
    below = torch.stack([sin, zeros], dim=-1).flatten()[:-1]
    return torch.diag(cos.repeat_interleave(2)) + torch.diag(above, 1) + torch.diag(below, -1)


class NNRNN(RecurrentNetwork):
    """nnRNN (Kerg et al. 2019): ``h_t = modReLU(W h_{t-1} + V x_t)`` with the recurrent
    matrix in real Schur form, ``W = P (Lambda + T) P^T``:

    - P orthogonal, the exponential map of a skew-symmetric matrix (``P = expm(A - A^T)``, A
      upper triangular), initialised as random 2x2 rotations (Henaff et al. 2016);
    - Lambda block-diagonal with 2x2 blocks ``alpha_i R(theta_i)``, which set the eigenvalues
      ``alpha_i exp(+-1j theta_i)``; alpha starts at 1, theta uniform in [-pi, pi);
    - T strictly upper triangular outside Lambda's blocks (so it leaves the eigenvalues alone),
      the non-normal part that lets activity be amplified transiently; it starts at 0.

    :meth:`regularization` is the paper's penalty, to be added to the training loss:
    ``alpha_penalty * sum((alpha - 1)^2) + t_decay * sum(T^2)``.

    Args:
        activation: ``modrelu`` (the paper's) or ``identity`` (a linear RNN, for analysis).
        alpha_penalty: strength of the pull of the eigenvalue moduli towards 1.
        t_decay: L2 decay of the non-normal part T.
        non_normal: learn alpha and T; ``False`` fixes alpha = 1 and T = 0, which gives the
            orthogonal RNN (:class:`OrthogonalRNN`).
        (the rest as in :class:`RecurrentNetwork`; ``hidden_size`` must be even)
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        activation: str = "modrelu",
        alpha_penalty: float = 1e-4,
        t_decay: float = 1e-4,
        non_normal: bool = True,
    ) -> None:
        super().__init__(input_size, hidden_size, output_size, gate_blocks=None)
        if hidden_size % 2:
            raise UserInputError(f"hidden_size={hidden_size} must be even (Lambda is made of 2x2 blocks)")
        check_choice("activation", activation, ACTIVATIONS)
        check_positive("alpha_penalty", alpha_penalty, allow_zero=True)
        check_positive("t_decay", t_decay, allow_zero=True)
        self.alpha_penalty = alpha_penalty
        self.t_decay = t_decay
        blocks = hidden_size // 2
        self.input_to_hidden = nn.Linear(input_size, hidden_size, bias=False)
        self.activation = ModReLU(hidden_size) if activation == "modrelu" else nn.Identity()
        log_basis = torch.zeros(hidden_size, hidden_size)
        even = torch.arange(0, hidden_size, 2)
        log_basis[even, even + 1] = torch.empty(blocks).uniform_(-math.pi, math.pi)
        self.log_basis = nn.Parameter(log_basis)
        self.angles = nn.Parameter(torch.empty(blocks).uniform_(-math.pi, math.pi))
        if non_normal:
            self.alphas = nn.Parameter(torch.ones(blocks))
            self.upper = nn.Parameter(torch.zeros(hidden_size, hidden_size))
            upper_mask = torch.ones(hidden_size, hidden_size).triu(1)
            upper_mask[even, even + 1] = 0.0
            self.register_buffer("upper_mask", upper_mask)
        else:
            self.alphas = self.upper = self.upper_mask = None

    def orthogonal_basis(self) -> torch.Tensor:
        """P = expm(S), S the skew-symmetric matrix built from the upper triangle of A."""
        upper = self.log_basis.triu(1)
        return torch.linalg.matrix_exp(upper - upper.T)

    def schur_form(self) -> torch.Tensor:
        """``Lambda + T``, the recurrent matrix in the basis P."""
        if self.alphas is None:
            return rotation_blocks(torch.ones_like(self.angles), self.angles)
        return rotation_blocks(self.alphas, self.angles) + self.upper * self.upper_mask

    def recurrent_weight(self) -> torch.Tensor:
        basis = self.orthogonal_basis()
        return basis @ self.schur_form() @ basis.T

    def regularization(self) -> torch.Tensor:
        """The alpha penalty plus the decay of T (zero for the orthogonal RNN)."""
        if self.alphas is None:
            return self.angles.new_zeros(())
        alpha_term = (self.alphas - 1.0).square().sum()
        decay_term = (self.upper * self.upper_mask).square().sum()
        return self.alpha_penalty * alpha_term + self.t_decay * decay_term

    def step(self, input_term: torch.Tensor, state: State, t: int, recurrent_weight: torch.Tensor) -> State:
        return (self.activation(F.linear(state[0], recurrent_weight) + input_term),)


class OrthogonalRNN(NNRNN):
    """The orthogonal RNN baseline: nnRNN with T = 0 and alpha = 1, so ``W = P R(theta) P^T``
    is orthogonal and only its eigenvalue phases theta and the basis P are learned."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, activation: str = "modrelu") -> None:
        super().__init__(input_size, hidden_size, output_size, activation=activation, non_normal=False)
