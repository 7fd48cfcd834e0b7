"""LightningDataModules. No downloads: bundled or generated data, or standard files on disk."""

from framework.data.base import EpochRandomSampler, SplitDataModule
from framework.data.cifar import CIFARDataModule
from framework.data.images import DigitsDataModule, ImageDataModule
from framework.data.mnist import MNISTDataModule
from framework.data.patches import BrownPatchesDataModule, DigitPairsDataModule
from framework.data.relational import SameDifferentDataModule
from framework.data.stroop import StroopDigitsDataModule
from framework.data.sequences import AddingTaskDataModule, CopyTaskDataModule

__all__ = [
    "AddingTaskDataModule",
    "BrownPatchesDataModule",
    "CIFARDataModule",
    "CopyTaskDataModule",
    "DigitPairsDataModule",
    "DigitsDataModule",
    "EpochRandomSampler",
    "ImageDataModule",
    "MNISTDataModule",
    "SameDifferentDataModule",
    "SplitDataModule",
    "StroopDigitsDataModule",
]
