"""Linearisation of networks: empirical neural tangent kernels, kernel alignment, and linearised
or alpha-scaled twins of a model, per-example difficulty (Baratin et al. 2021; George et al.
2022). Plain functions and modules, no Lightning, and the Lightning callbacks built on them
(:class:`NTKAlignment`, :class:`LazyVsReal`)."""

from callbacks.linearization.alignment import (
    CenteredKernel,
    center_kernel,
    kernel_alignment,
    kernel_target_alignment,
    layerwise_target_alignment,
    target_kernel,
)
from callbacks.linearization.callback import SCHEDULES, NTKAlignment, kernel_heatmap, next_scheduled_step, scheduled_steps
from callbacks.linearization.difficulty import (
    DifficultyScore,
    FileScores,
    ForgettingEvents,
    LabelNoise,
    LearningSpeed,
    NoisyLabels,
    flip_labels,
    forgetting_events,
    group_means,
    learning_speed,
    quantile_groups,
    read_scores,
    write_scores,
)
from callbacks.linearization.lazy_vs_real import LazyVsReal
from callbacks.linearization.linearized import AlphaScaledModel, LinearizedModel, alpha_scaled_learning_rate
from callbacks.linearization.ntk import EmpiricalNTK, parameter_groups

__all__ = [
    "AlphaScaledModel",
    "CenteredKernel",
    "DifficultyScore",
    "EmpiricalNTK",
    "FileScores",
    "ForgettingEvents",
    "LabelNoise",
    "LazyVsReal",
    "LearningSpeed",
    "LinearizedModel",
    "NTKAlignment",
    "NoisyLabels",
    "SCHEDULES",
    "alpha_scaled_learning_rate",
    "center_kernel",
    "flip_labels",
    "forgetting_events",
    "group_means",
    "kernel_alignment",
    "kernel_heatmap",
    "kernel_target_alignment",
    "layerwise_target_alignment",
    "learning_speed",
    "next_scheduled_step",
    "parameter_groups",
    "quantile_groups",
    "read_scores",
    "scheduled_steps",
    "target_kernel",
    "write_scores",
]
