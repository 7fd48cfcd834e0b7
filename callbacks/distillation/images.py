"""Pictures of attention transfer: a grid showing, for a few probe examples, the input next to the
teacher's and the student's attention maps of one layer, so W&B shows whether the student
attends where the teacher does."""

import numpy as np
import torch
import torch.nn.functional as F

from callbacks.distillation.losses import attention_map

# Colours: black for a map's (or an input's) smallest value to white for its largest; white
# lines between cells.
SEPARATOR = 255
SEPARATOR_PIXELS = 2


def spatial_attention(activation: torch.Tensor) -> torch.Tensor:
    """:func:`attention_map` of activations (N, C, H, W) in its spatial shape, (N, H, W)."""
    return attention_map(activation).view(activation.shape[0], *activation.shape[-2:])


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Each image of (N, H, W) scaled from its own minimum (0) to its maximum (1); a constant
    image becomes 0."""
    flat = images.double().flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(torch.finfo(torch.float64).tiny)).view_as(images)


def attention_grid(inputs: torch.Tensor, teacher_maps: torch.Tensor, student_maps: torch.Tensor, cell: int = 64) -> np.ndarray:
    """A greyscale image (uint8, H x W): one row per example, the columns the input (channel
    mean), the teacher's map and the student's map, each scaled to its own range and resized
    (nearest) to ``cell`` x ``cell`` pixels, separated by white lines.

    Args:
        inputs: images (N, C, H, W).
        teacher_maps: attention maps (N, h, w), e.g. from :func:`spatial_attention`.
        student_maps: attention maps (N, h', w').
        cell: side in pixels of every cell.
    """
    columns = [inputs.double().mean(dim=1), teacher_maps, student_maps]
    cells = [F.interpolate(to_unit_range(column)[:, None], size=(cell, cell), mode="nearest")[:, 0] for column in columns]
    rows = len(inputs)
    step = cell + SEPARATOR_PIXELS
    grid = np.full((rows * step - SEPARATOR_PIXELS, len(cells) * step - SEPARATOR_PIXELS), SEPARATOR, dtype=np.uint8)
    for c, column in enumerate(cells):
        pixels = (column * 255).round().to(torch.uint8).cpu().numpy()
        for r in range(rows):
            grid[r * step : r * step + cell, c * step : c * step + cell] = pixels[r]
    return grid
