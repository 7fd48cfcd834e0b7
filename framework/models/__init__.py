"""Architectures: plain ``nn.Module``s, usable without Lightning. Tasks add loss and metrics."""

from framework.models.adaptive import (
    ACTSteps,
    AdaptiveComputationTime,
    EarlyExitCNN,
    HabitualControlledNet,
    HaltingSteps,
    PonderNet,
    PonderSteps,
)
from framework.models.cnn import SmallCNN
from framework.models.dirac import DiracConv2d, DiracNet, PlainNet
from framework.models.mlp import MLP
from framework.models.patch_matching import PseudoSiameseNet, SiameseNet, TwoChannelNet, TwoChannelTwoStreamNet
from framework.models.relational import ConcatMLP, ContextNorm, CoRelNet, RelationNetwork
from framework.models.rnn_base import PlainLSTM, PlainRNN, RecurrentNetwork
from framework.models.rnn_batchnorm import BNLSTM, BNRNN, StepwiseBatchNorm
from framework.models.rnn_memory import RelevancyMemoryRNN
from framework.models.rnn_nonnormal import NNRNN, ModReLU, OrthogonalRNN
from framework.models.wrn import WideResNet

__all__ = [
    "ACTSteps",
    "AdaptiveComputationTime",
    "BNLSTM",
    "BNRNN",
    "ConcatMLP",
    "ContextNorm",
    "CoRelNet",
    "DiracConv2d",
    "DiracNet",
    "EarlyExitCNN",
    "HabitualControlledNet",
    "HaltingSteps",
    "MLP",
    "ModReLU",
    "NNRNN",
    "OrthogonalRNN",
    "PlainLSTM",
    "PlainNet",
    "PlainRNN",
    "PonderNet",
    "PonderSteps",
    "PseudoSiameseNet",
    "RecurrentNetwork",
    "RelationNetwork",
    "RelevancyMemoryRNN",
    "SiameseNet",
    "SmallCNN",
    "StepwiseBatchNorm",
    "TwoChannelNet",
    "TwoChannelTwoStreamNet",
    "WideResNet",
]
