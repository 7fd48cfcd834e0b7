"""How signals cross the depth of a network: the root-mean-square of the activations at chosen
modules (forward) and of the loss gradient with respect to them (backward), as a functional core
(:mod:`callbacks.activations.signals`) and one Lightning callback that logs them during real
training steps (at initialisation, then on a schedule)."""

from callbacks.activations.callback import ActivationNorms
from callbacks.activations.signals import SignalCapture, default_modules, signal_norms

__all__ = ["ActivationNorms", "SignalCapture", "default_modules", "signal_norms"]
