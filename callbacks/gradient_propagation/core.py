"""How gradients propagate back in time through a recurrent network, and the spectrum of its
recurrent matrix: plain functions on a :class:`~framework.models.rnn_base.RecurrentNetwork` and on
matrices, no Lightning.

``||dL/dh_t||`` against t shows whether the loss still reaches early hidden states (vanishing:
it decays geometrically with the distance to the loss; exploding: it grows). The eigenvalues of
the recurrent matrix W set the asymptotic rate; for a non-normal W (Kerg et al. 2019) the
transient differs from what the eigenvalues say, which Henrici's departure from normality
measures: ``sqrt(||W||_F^2 - sum_i |lambda_i|^2)``, zero exactly when W is normal.
"""

import torch

from framework.models.rnn_base import RecurrentNetwork
from framework.tasks.sequence import sequence_loss

GATES = ("forget", "input", "output", "candidate")
"""Names of the H x H blocks of an LSTM's recurrent matrix (4H x H), in the framework's order."""


def hidden_state_gradient_norms(model: RecurrentNetwork, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, loss: str = "cross_entropy") -> torch.Tensor:
    """``||dL/dh_t||`` for t = 1..L, (L,) float64: L is the loss of :class:`SequenceTask` on the
    batch ``(inputs, targets, mask)`` (the mean over the masked steps), h_t the hidden states of
    the whole batch (N, H) and the norm the Frobenius norm. The derivative is the total one,
    through the readout of step t and through every later step
    (:meth:`RecurrentNetwork.recording_hidden_states`). Runs in the model's current mode and
    leaves every ``.grad`` alone."""
    with model.recording_hidden_states() as hidden:
        outputs = model(inputs)
    value = sequence_loss(outputs[mask], targets[mask], loss)
    gradients = torch.autograd.grad(value, hidden, allow_unused=True)
    return torch.stack([torch.zeros((), dtype=torch.float64) if g is None else g.detach().double().norm().cpu() for g in gradients])


def recurrent_matrices(model: RecurrentNetwork) -> dict[str, torch.Tensor]:
    """The square recurrent matrices of ``model``, detached, float64, on CPU: ``{"W": W}`` for
    an H x H matrix, and one H x H block per gate (:data:`GATES`) for an LSTM's 4H x H."""
    with torch.no_grad():
        weight = model.recurrent_weight().detach().double().cpu()
    rows, columns = weight.shape
    if rows == columns:
        return {"W": weight}
    if rows == len(GATES) * columns:
        return dict(zip(GATES, weight.chunk(len(GATES), dim=0)))
    raise ValueError(f"a recurrent matrix of shape {tuple(weight.shape)} is neither H x H nor 4H x H")


def henrici_departure(matrix: torch.Tensor, eigenvalues: torch.Tensor | None = None) -> torch.Tensor:
    """Henrici's departure from normality ``sqrt(||W||_F^2 - sum_i |lambda_i|^2)`` (0 for a
    normal matrix, e.g. orthogonal or symmetric), clamped at 0 against round-off."""
    if eigenvalues is None:
        eigenvalues = torch.linalg.eigvals(matrix)
    return (matrix.square().sum() - eigenvalues.abs().square().sum()).clamp_min(0.0).sqrt()


def spectrum_summary(matrix: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Scalars describing a square matrix, with its eigenvalue moduli and its singular values
    (both sorted in decreasing order).

    The scalars: ``spectral_radius`` (largest eigenvalue modulus), ``min_eigenvalue_modulus``,
    ``max_singular_value`` (the spectral norm) and ``min_singular_value``, ``henrici``
    (:func:`henrici_departure`) and ``henrici_relative`` (divided by ``||W||_F``, in [0, 1]),
    and ``commutator`` ``||W W^T - W^T W||_F``, another measure of non-normality."""
    eigenvalues = torch.linalg.eigvals(matrix)
    moduli = eigenvalues.abs().sort(descending=True).values
    singular_values = torch.linalg.svdvals(matrix)
    frobenius = matrix.norm()
    henrici = henrici_departure(matrix, eigenvalues)
    scalars = {
        "spectral_radius": moduli[0].item(),
        "min_eigenvalue_modulus": moduli[-1].item(),
        "max_singular_value": singular_values[0].item(),
        "min_singular_value": singular_values[-1].item(),
        "henrici": henrici.item(),
        "henrici_relative": (henrici / frobenius).item() if frobenius > 0 else 0.0,
        "commutator": (matrix @ matrix.T - matrix.T @ matrix).norm().item(),
    }
    return scalars, moduli, singular_values
