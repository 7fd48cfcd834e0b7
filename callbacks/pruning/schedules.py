"""Sparsity schedules: the target sparsity after each of ``steps`` pruning steps, and when they
happen: at the start of epochs (:func:`step_epochs`) or before given optimizer steps
(:func:`step_global_steps`).

With final sparsity s and step k = 1..n (t = k/n):

* ``one_shot``: one step (n = 1) to s.
* ``linear``: s_k = s t.
* ``exponential``: s_k = 1 - (1 - s)^t, i.e. each step prunes the same fraction
  1 - (1 - s)^(1/n) of the weights that remain (up to rounding to whole weights).
* ``cubic`` (Zhu & Gupta 2017, from 0): s_k = s (1 - (1 - t)^3), fast first, slow last.

Every schedule ends at s exactly (s_n = s). Targets are fractions of *all* prunable units (see
:mod:`callbacks.pruning.masks`); the fraction of the *remaining* units pruned by step k, the
``amount`` of ``torch.nn.utils.prune``, is (c_k - c_{k-1}) / (N - c_{k-1}) with c_k = round(s_k N).
"""

from collections.abc import Sequence

from framework.errors import UserInputError, check_choice, check_positive

SCHEDULES = ("one_shot", "linear", "exponential", "cubic")


def target_sparsity(schedule: str, final: float, step: int, steps: int) -> float:
    """The sparsity to reach at ``step`` (1-based) of ``steps``."""
    check_choice("schedule", schedule, SCHEDULES)
    if not 1 <= step <= steps:
        raise ValueError(f"step={step} must be between 1 and steps={steps}")
    if step == steps:
        return final
    t = step / steps
    if schedule == "linear":
        return final * t
    if schedule == "exponential":
        return 1.0 - (1.0 - final) ** t
    return final * (1.0 - (1.0 - t) ** 3)


def step_epochs(steps: int, start_epoch: int, end_epoch: int | None, fine_tune: bool) -> list[int]:
    """The epoch at whose start each step happens: all at ``start_epoch`` without fine-tuning in
    between, else spread evenly from ``start_epoch`` to ``end_epoch`` (default: one per epoch)."""
    if not fine_tune or steps == 1:
        if end_epoch not in (None, start_epoch):
            raise UserInputError(f"end_epoch={end_epoch} needs several steps with fine_tune=True; leave it unset")
        return [start_epoch] * steps
    end = start_epoch + steps - 1 if end_epoch is None else end_epoch
    if end - start_epoch < steps - 1:
        raise UserInputError(
            f"{steps} steps with fine-tuning in between need {steps} epochs, but start_epoch={start_epoch}, end_epoch={end}"
        )
    return [start_epoch + round(k * (end - start_epoch) / (steps - 1)) for k in range(steps)]


def step_global_steps(
    steps: int, start_step: int | None, every_n_steps: int | None, at_steps: Sequence[int] | None, fine_tune: bool
) -> list[int]:
    """The global step (number of optimizer steps done, so with gradient accumulation a whole
    accumulation window) before which each pruning step happens: ``at_steps`` as given (one per
    step, non-decreasing), else ``start_step + k * every_n_steps``; without fine-tuning in
    between, all at ``start_step``."""
    if at_steps is not None:
        if every_n_steps is not None or start_step is not None:
            raise UserInputError("at_steps lists every step: leave every_n_steps and start_step unset")
        positions = [int(s) for s in at_steps]
        if len(positions) != steps:
            raise UserInputError(f"at_steps={positions} must list one global step per pruning step (steps={steps})")
        if any(s < 0 for s in positions) or positions != sorted(positions):
            raise UserInputError(f"at_steps={positions} must be non-negative and non-decreasing")
        if not fine_tune and len(set(positions)) > 1:
            raise UserInputError(f"at_steps={positions} spreads the steps but fine_tune=False puts them back to back; give one value")
        return positions
    start = 0 if start_step is None else start_step
    check_positive("start_step", start, allow_zero=True)
    if not fine_tune or steps == 1:
        if every_n_steps is not None:
            raise UserInputError(f"every_n_steps={every_n_steps} needs several steps with fine_tune=True; leave it unset")
        return [start] * steps
    if every_n_steps is None:
        raise UserInputError(f"{steps} steps with fine-tuning in between need every_n_steps or at_steps")
    check_positive("every_n_steps", every_n_steps)
    return [start + k * every_n_steps for k in range(steps)]
