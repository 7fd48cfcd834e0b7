"""The cost of effort (Kamanda): ``lambda * expected compute`` added to the training loss of an
adaptive network, as a functional core (:mod:`callbacks.effort.core`) and one Lightning
callback (:class:`Effort`)."""

from callbacks.effort.callback import Effort, gather_rows
from callbacks.effort.core import ComputeRecord, LambdaSchedule, accuracy_by_steps, check_adaptive, effort_penalty, summarize

__all__ = ["ComputeRecord", "Effort", "LambdaSchedule", "accuracy_by_steps", "check_adaptive", "effort_penalty", "gather_rows", "summarize"]
