"""The functional core of knowledge transfer: Hinton et al.'s knowledge distillation (KD) and
Zagoruyko & Komodakis's activation-based attention transfer (AT), on plain tensors."""

import torch
import torch.nn.functional as F

from framework.errors import UserInputError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch. The
    ``T^2`` keeps the gradient's scale independent of T (Hinton et al. 2015)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def attention_map(activation: torch.Tensor) -> torch.Tensor:
    """The spatial attention of activations (N, C, H, W): the channel mean of the squared
    activations, flattened and L2-normalised per sample, (N, H*W)."""
    if activation.dim() != 4:
        raise UserInputError(f"attention transfer needs activations (N, C, H, W), got shape {tuple(activation.shape)}")
    return F.normalize(activation.float().square().mean(dim=1).flatten(1), dim=1)


def at_loss(student_activation: torch.Tensor, teacher_activation: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the student's and the teacher's attention maps (the authors'
    reduction, to be weighted by beta / 2); the two must share their spatial size."""
    if student_activation.shape[-2:] != teacher_activation.shape[-2:]:
        raise UserInputError(
            f"attention transfer compares maps of the same size; student {tuple(student_activation.shape[-2:])} "
            f"vs teacher {tuple(teacher_activation.shape[-2:])}"
        )
    return (attention_map(student_activation) - attention_map(teacher_activation)).square().mean()
