"""Exact population statistics for batch normalisation ("precise BN").

A batch-norm layer normalises with the statistics of the current batch in training and with
running averages (an exponential moving average, momentum 0.1 by default) in evaluation. The
running averages mix statistics of past weights and are noisy when one batch's statistics vary a
lot, e.g. BN-LSTM's per-time-step statistics on pixels that are blank in most images: on the
sequential digits the BN-LSTM's evaluation-mode accuracy with its running averages is far below
what the same weights reach with exact population statistics (docs/results.md). Recomputing them
with the weights frozen, over a fixed set of training batches (Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm"), removes both the staleness and most of the noise.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def population_statistics_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that keep population statistics: the ``torch.nn`` batch norms
    that track running statistics and :class:`~framework.models.rnn_batchnorm.StepwiseBatchNorm`,
    or anything else with ``running_mean``/``running_var`` tensors, a ``momentum`` that accepts
    ``None`` (cumulative average), ``reset_running_stats()``, ``num_batches_tracked`` and ``eps``."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "running_mean", None), torch.Tensor)
        and isinstance(getattr(module, "running_var", None), torch.Tensor)
        and isinstance(getattr(module, "num_batches_tracked", None), torch.Tensor)
        and all(hasattr(module, attribute) for attribute in ("momentum", "eps", "reset_running_stats"))
    }


@torch.no_grad()
def recompute_population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] = lambda model, batch: model(batch),
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Replace the running statistics of every batch norm in ``model`` by their average over
    ``batches`` (each batch's mean and unbiased variance, as the running averages store them).

    The forward passes run in train mode (so that every layer normalises with batch statistics,
    as in training) with gradients off; the weights, each module's mode, momentum and
    ``num_batches_tracked`` are restored. With ``all_reduce`` (a sum over processes, e.g. DDP
    ranks each given their own batches) the averages are pooled over processes, weighted by the
    batches each one saw, so every process ends with the same statistics. A statistic that no
    batch reached (a time step beyond the batches' length) keeps its old value.

    Returns, per module, how far the old statistics were from the new ones: ``mean_shift``, the
    root mean square of ``(old_mean - new_mean) / new_std``, and ``std_log_ratio``, that of
    ``log(old_std / new_std)`` (0 and 0 when they agree).
    """
    modules = population_statistics_modules(model)
    saved = {name: (m.momentum, m.num_batches_tracked.clone(), m.running_mean.clone(), m.running_var.clone()) for name, m in modules.items()}
    modes = {module: module.training for module in model.modules()}
    try:
        for module in modules.values():
            module.reset_running_stats()
            module.momentum = None
        model.train()
        for batch in batches:
            forward(model, batch)
        changes = {}
        for name, module in modules.items():
            momentum, tracked, old_mean, old_var = saved[name]
            counts = module.num_batches_tracked.to(module.running_mean.dtype).expand_as(module.running_mean)
            mean, var = module.running_mean * counts, module.running_var * counts
            if all_reduce is not None:
                mean, var, counts = all_reduce(mean), all_reduce(var), all_reduce(counts.clone())
            reached = counts > 0
            new_mean = torch.where(reached, mean / counts.clamp_min(1), old_mean)
            new_var = torch.where(reached, var / counts.clamp_min(1), old_var)
            module.running_mean.copy_(new_mean)
            module.running_var.copy_(new_var)
            new_std = (new_var + module.eps).sqrt()
            changes[name] = {
                "mean_shift": ((old_mean - new_mean) / new_std).square().mean().sqrt().item(),
                "std_log_ratio": ((old_var + module.eps).sqrt() / new_std).log().square().mean().sqrt().item(),
            }
    except BaseException:
        for name, module in modules.items():
            module.running_mean.copy_(saved[name][2])
            module.running_var.copy_(saved[name][3])
        raise
    finally:
        for name, module in modules.items():
            module.momentum = saved[name][0]
            module.num_batches_tracked.copy_(saved[name][1])
        for module, training in modes.items():
            module.training = training
    return changes
