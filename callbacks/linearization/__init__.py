"""Linearisation of networks: empirical neural tangent kernels, kernel alignment, and linearised
or alpha-scaled twins of a model (Baratin et al. 2021; George et al. 2022). Plain functions and
modules, no Lightning, and the Lightning callbacks built on them (:class:`NTKAlignment`)."""

from callbacks.linearization.alignment import (
    center_kernel,
    kernel_alignment,
    kernel_target_alignment,
    layerwise_target_alignment,
    target_kernel,
)
from callbacks.linearization.callback import SCHEDULES, NTKAlignment, kernel_heatmap, next_scheduled_step, scheduled_steps
from callbacks.linearization.linearized import AlphaScaledModel, LinearizedModel, alpha_scaled_learning_rate
from callbacks.linearization.ntk import EmpiricalNTK, parameter_groups

__all__ = [
    "AlphaScaledModel",
    "EmpiricalNTK",
    "LinearizedModel",
    "NTKAlignment",
    "SCHEDULES",
    "alpha_scaled_learning_rate",
    "center_kernel",
    "kernel_alignment",
    "kernel_heatmap",
    "kernel_target_alignment",
    "layerwise_target_alignment",
    "next_scheduled_step",
    "parameter_groups",
    "scheduled_steps",
    "target_kernel",
]
