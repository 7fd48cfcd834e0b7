"""Architectures: plain ``nn.Module``s, usable without Lightning. Tasks add loss and metrics."""

from framework.models.cnn import SmallCNN
from framework.models.mlp import MLP
from framework.models.relational import ConcatMLP, ContextNorm, CoRelNet, RelationNetwork
from framework.models.rnn_base import PlainLSTM, PlainRNN, RecurrentNetwork
from framework.models.rnn_batchnorm import BNLSTM, BNRNN, StepwiseBatchNorm
from framework.models.rnn_memory import RelevancyMemoryRNN
from framework.models.rnn_nonnormal import NNRNN, ModReLU, OrthogonalRNN
from framework.models.wrn import WideResNet

__all__ = [
    "BNLSTM",
    "BNRNN",
    "ConcatMLP",
    "ContextNorm",
    "CoRelNet",
    "MLP",
    "ModReLU",
    "NNRNN",
    "OrthogonalRNN",
    "PlainLSTM",
    "PlainRNN",
    "RecurrentNetwork",
    "RelationNetwork",
    "RelevancyMemoryRNN",
    "SmallCNN",
    "StepwiseBatchNorm",
    "WideResNet",
]
