"""Architectures: plain ``nn.Module``s, usable without Lightning. Tasks add loss and metrics."""

from framework.models.cnn import SmallCNN
from framework.models.mlp import MLP
from framework.models.wrn import WideResNet

__all__ = ["MLP", "SmallCNN", "WideResNet"]
