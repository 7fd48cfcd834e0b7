"""Knowledge transfer from a frozen teacher: knowledge distillation (Hinton et al. 2015) and
activation-based attention transfer (Zagoruyko & Komodakis 2017), as a functional core
(:mod:`callbacks.distillation.losses`) and one Lightning callback."""

from callbacks.distillation.callback import Distillation, ForwardCapture, load_backbone_weights
from callbacks.distillation.losses import at_loss, attention_map, kd_loss

__all__ = ["Distillation", "ForwardCapture", "at_loss", "attention_map", "kd_loss", "load_backbone_weights"]
