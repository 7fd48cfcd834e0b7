"""Gradient propagation through time in recurrent networks: ``||dL/dh_t||`` against t and the
spectrum and non-normality of the recurrent matrix (plain functions in ``core``), and the
Lightning callback that logs them over training (:class:`GradientPropagation`)."""

from callbacks.gradient_propagation.callback import GradientPropagation
from callbacks.gradient_propagation.core import GATES, henrici_departure, hidden_state_gradient_norms, recurrent_matrices, spectrum_summary

__all__ = ["GATES", "GradientPropagation", "henrici_departure", "hidden_state_gradient_norms", "recurrent_matrices", "spectrum_summary"]
