"""Fisher types as draws of output gradients.

The Fisher of a model p(y|x) on inputs x_1..x_N is

    F = (1/N) sum_n E_{y ~ p(y|x_n)} [g g^T],   g = d(-log p(y|x_n))/d theta  (one example),

``exact`` takes the expectation in closed form (all classes weighted by the model's softmax, as
C - 1 draws spanning the same covariance; for
regression a Gaussian with identity covariance, where F is the Gauss-Newton matrix J^T J / N),
``mc`` replaces it by the mean over ``samples`` targets drawn from the model, and ``empirical``
uses the observed label (the "empirical Fisher", not a Fisher of the model).

Each type is written as D draws u_d of the gradient of -log p with respect to the model's output,
scaled by the square root of their weight, so that every type is

    F = (1/N) sum_n sum_d J_n^T u_dn u_dn^T J_n.
"""

import torch
import torch.nn.functional as F

from framework.errors import UserInputError, check_choice, check_positive

FISHER_TYPES = ("exact", "mc", "empirical")
TASKS = ("classification", "regression")


def _softmax_covariance_factor(p: torch.Tensor) -> torch.Tensor:
    """Draws (C - 1, N, C) with sum_d u_dn u_dn^T = diag(p_n) - p_n p_n^T, the exact expectation.

    The C vectors u_c = sqrt(p_c) (p - e_c) (class c weighted by its probability) satisfy
    sum_c sqrt(p_c) u_c = 0, so they span C - 1 dimensions. With s = sqrt(p), a unit vector, and the
    Householder reflection H mapping s to e_k, U U^T = (U H)(I - e_k e_k^T)(U H)^T, so the columns
    c != k of U H, u_c + u_k s_c / (1 - s_k) = s_c (w - e_c) with w = (1 + b) p - b e_k and
    b = s_k / (1 - s_k), are C - 1 draws giving the same sum: one backward draw fewer than the
    classes. k is each example's least likely class (s_k <= 1/sqrt(C), so b <= 1/(sqrt(C) - 1)).
    Built in the (C - 1, N, C) output layout directly: no (N, C, C) tensor, no boolean indexing."""
    n, classes = p.shape
    if classes == 1:  # one class: the Fisher is zero
        return p.new_zeros(1, *p.shape)
    s = p.sqrt()
    k = p.argmin(dim=1, keepdim=True)  # (N, 1)
    s_k = s.gather(1, k)
    b = s_k / (1 - s_k)
    w = ((1 + b) * p).scatter_add_(1, k, -b)  # (N, C)
    rows = torch.arange(classes - 1, device=p.device)
    kept = (rows + (rows >= k)).T  # (C - 1, N): the classes c != k, in order
    s_kept = s.T.gather(0, kept)  # (C - 1, N)
    draws = s_kept[:, :, None] * w  # (C - 1, N, C): s_c w
    return draws.scatter_add_(2, kept[:, :, None], -s_kept[:, :, None])  # minus s_c e_c


def output_gradient_draws(
    outputs: torch.Tensor,
    targets: torch.Tensor | None,
    fisher_type: str,
    task: str,
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The draws u of shape (D, N, O) for a batch of model ``outputs`` (N, ...) flattened to O.

    Classification is softmax cross-entropy on (N, C) logits, regression a unit Gaussian on any
    output shape. ``samples`` and ``generator`` are used by ``mc`` only, ``targets`` by ``empirical``.
    """
    check_choice("fisher_type", fisher_type, FISHER_TYPES)
    check_choice("task", task, TASKS)
    check_positive("samples", samples)
    z = outputs.detach().flatten(1)
    if fisher_type == "empirical" and targets is None:
        raise UserInputError("fisher_type='empirical' needs batches of (inputs, targets)")
    if task == "regression":
        if fisher_type == "exact":
            return torch.eye(z.shape[1], dtype=z.dtype, device=z.device)[:, None, :].expand(-1, z.shape[0], -1)
        if fisher_type == "mc":
            noise = torch.randn((samples, *z.shape), generator=generator, dtype=z.dtype, device=z.device)
            return noise / samples**0.5
        return (z - targets.reshape(z.shape))[None]
    if outputs.dim() != 2:
        raise UserInputError(f"classification needs logits of shape (N, classes), got {tuple(outputs.shape)}")
    probabilities = z.softmax(dim=1)
    if fisher_type == "exact":
        return _softmax_covariance_factor(probabilities)
    if fisher_type == "empirical":
        labels = targets[None]
    else:
        labels = torch.multinomial(probabilities, samples, replacement=True, generator=generator).T
    return (probabilities[None] - F.one_hot(labels, z.shape[1]).to(z.dtype)) / labels.shape[0] ** 0.5
