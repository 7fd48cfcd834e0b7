"""LightningModules that add a loss, metrics and logging to a plain ``nn.Module`` backbone."""

from framework.tasks.base import Task
from framework.tasks.classification import ClassificationTask
from framework.tasks.patch_matching import PatchMatchingTask
from framework.tasks.sequence import SequenceTask

__all__ = ["ClassificationTask", "PatchMatchingTask", "SequenceTask", "Task"]
