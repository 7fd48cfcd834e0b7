"""Kernel alignment: how much a kernel's geometry matches the labels, or another kernel.

All kernels here are centred over examples before comparing (Cortes et al. 2012's centred
alignment, as used by Baratin et al. 2021), so a constant offset shared by all examples does not
count as alignment.
"""

import torch
import torch.nn.functional as F

from framework.errors import UserInputError


def center_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """``H1 K H2`` on the two example dimensions (0 and 1) of ``kernel``, with ``H = I - 11^T / n``;
    any trailing output dimensions are kept. For ``K = J1 J2^T`` this is the kernel of the
    gradients minus their mean over each set of examples."""
    return (
        kernel
        - kernel.mean(dim=0, keepdim=True)
        - kernel.mean(dim=1, keepdim=True)
        + kernel.mean(dim=(0, 1), keepdim=True)
    )


def target_kernel(targets: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """``Y Y^T`` of shape (N, N) from class indices (N,) (one-hot encoded, ``num_classes``
    defaulting to the largest index + 1) or from a target matrix (N, C) such as soft labels."""
    if targets.ndim == 1:
        targets = F.one_hot(targets.long(), num_classes if num_classes is not None else -1)
    elif targets.ndim != 2:
        raise UserInputError(f"targets must be class indices (N,) or a matrix (N, C), got shape {tuple(targets.shape)}")
    targets = targets.double()
    return targets @ targets.T


class CenteredKernel:
    """A reference kernel centred once, with its norm, for aligning many kernels with it (as a
    callback does at every evaluation with the targets' kernel and the kernel at initialisation)."""

    def __init__(self, kernel: torch.Tensor) -> None:
        self.shape = kernel.shape
        self.centred = center_kernel(kernel.double())
        self.norm = self.centred.norm()

    def alignment(self, kernel: torch.Tensor) -> torch.Tensor:
        """:func:`kernel_alignment` of ``kernel`` with this reference."""
        if kernel.shape != self.shape:
            raise UserInputError(f"kernels to align must have the same shape, got {tuple(kernel.shape)} and {tuple(self.shape)}")
        centred = center_kernel(kernel.double())
        return (centred * self.centred).sum() / (centred.norm() * self.norm)


def kernel_alignment(kernel_1: torch.Tensor, kernel_2: torch.Tensor) -> torch.Tensor:
    """Centred alignment ``<K1_c, K2_c>_F / (||K1_c||_F ||K2_c||_F)`` in [-1, 1] of two kernels of
    the same shape (examples on dimensions 0 and 1, e.g. the NTK now and at initialisation: 1
    means the same geometry up to scale, as in the lazy regime). NaN if either centred kernel is 0."""
    return CenteredKernel(kernel_2).alignment(kernel_1)


def kernel_target_alignment(kernel: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Centred kernel-target alignment ``<K_c, Y_c Y_c^T>_F / (||K_c||_F ||Y_c Y_c^T||_F)`` of an
    (N, N) kernel (e.g. the NTK traced over outputs) with the targets (see :func:`target_kernel`)."""
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise UserInputError(f"kernel-target alignment needs a square (N, N) kernel (use mode='trace'), got shape {tuple(kernel.shape)}")
    if targets.shape[0] != kernel.shape[0]:
        raise UserInputError(f"targets have {targets.shape[0]} examples but the kernel has {kernel.shape[0]}")
    return kernel_alignment(kernel, target_kernel(targets, num_classes).to(kernel.device))


def layerwise_target_alignment(
    kernels: dict[str, torch.Tensor], targets: torch.Tensor, num_classes: int | None = None
) -> dict[str, torch.Tensor]:
    """:func:`kernel_target_alignment` of each per-layer kernel (from ``layerwise_ntk``)."""
    return {layer: kernel_target_alignment(kernel, targets, num_classes) for layer, kernel in kernels.items()}
