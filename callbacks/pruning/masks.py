"""Which tensors are pruned, how their masks are chosen, applied, made permanent and rewound.

Masks live in the model as buffers ``<name>_mask`` (1 kept, 0 pruned) beside the unchanged
parameter ``<name>``, so they are part of the model's ``state_dict``; a pruned entry of the
parameter is set to zero when it is pruned. Nothing runs per forward pass (unlike
``torch.nn.utils.prune``, which recomputes ``weight = weight_orig * weight_mask`` before every
forward and differentiates through the product): :func:`keep_pruned_at_zero` hooks the optimizer
instead, masking the gradients before each ``step`` and zeroing the pruned entries after it, so
pruned weights are exactly zero at every forward whatever the optimizer does (momentum, Adam,
weight decay, preconditioners that mix coordinates: they only ever see masked gradients). With a
closure-based ``step`` (Lightning) or gradient clipping, call :func:`mask_gradients` after the
backward pass and before clipping; the :class:`~callbacks.pruning.Pruning` callback does.

**Amount.** A target sparsity ``s`` is a fraction of *all* prunable units of the scope (weights,
or output channels when structured), not of the remaining ones as in ``torch.nn.utils.prune``:
after selection exactly ``round(s * units)`` units are pruned (Python's ``round``), per tensor
for ``scope="layer"``, over all tensors together for ``scope="global"``.

**Ties and monotonicity.** Units already pruned stay pruned (masks only shrink); among the
others the lowest scores are pruned, ties broken by position: the unit with the lower index
(tensors in model order, each flattened row-major) is pruned first.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from framework.errors import UserInputError, check_choice

PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)
NORMALIZATION_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
PARAMETER_NAMES = ("weight", "bias")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class PrunedTensor:
    """One prunable parameter: ``module.<name>`` of the module called ``module_name``."""

    module_name: str
    module: nn.Module
    name: str

    @property
    def key(self) -> str:
        return f"{self.module_name}.{self.name}" if self.module_name else self.name

    @property
    def has_mask(self) -> bool:
        return hasattr(self.module, f"{self.name}_mask")

    def leaf(self) -> nn.Parameter:
        """The parameter the optimizer updates."""
        return getattr(self.module, self.name)

    def mask(self) -> torch.Tensor:
        """The keep-mask (1 kept, 0 pruned); all ones before :func:`add_masks`."""
        return getattr(self.module, f"{self.name}_mask") if self.has_mask else torch.ones_like(self.leaf())

    def value(self) -> torch.Tensor:
        """The effective (masked) values, detached."""
        return (self.leaf() * self.mask()).detach()


def prunable_tensors(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    parameter_names: Sequence[str] = ("weight",),
    include_normalization: bool = False,
) -> list[PrunedTensor]:
    """The tensors to prune, in model order: ``parameter_names`` of the named ``layers`` (default:
    every Linear and Conv2d module, and with ``include_normalization`` every BatchNorm1d/2d,
    LayerNorm and GroupNorm module too; modules without such a parameter, e.g. non-affine norms,
    are skipped). Unknown or unsupported names are refused listing the allowed ones."""
    for name in parameter_names:
        check_choice("parameter_names", name, PARAMETER_NAMES)
    types = PRUNABLE_TYPES + NORMALIZATION_TYPES if include_normalization else PRUNABLE_TYPES
    modules = dict(model.named_modules())
    candidates = [name for name, module in modules.items() if isinstance(module, types)]
    for name in layers or ():
        if not include_normalization and isinstance(modules.get(name), NORMALIZATION_TYPES):
            raise UserInputError(f"layers={name!r} is a normalisation layer: set include_normalization=True, or choose one of {candidates}")
        check_choice("layers", name, candidates)
    chosen = candidates if layers is None else [name for name in candidates if name in layers]
    tensors = []
    for module_name in chosen:
        module = modules[module_name]
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise UserInputError(f"layer {module_name!r}: grouped convolutions are not supported; choose among {candidates}")
        tensors += [PrunedTensor(module_name, module, name) for name in parameter_names if getattr(module, name, None) is not None]
    if not tensors:
        raise UserInputError(f"nothing to prune: no {', '.join(parameter_names)} in layers {chosen}")
    return tensors


def add_masks(tensors: Sequence[PrunedTensor]) -> None:
    """Give every tensor a mask buffer (all ones where it has none yet), so that the model's
    state_dict keys (``<name>_mask`` beside ``<name>``) are those of a pruned model from now on."""
    for tensor in tensors:
        if not tensor.has_mask:
            tensor.module.register_buffer(f"{tensor.name}_mask", torch.ones_like(tensor.leaf(), requires_grad=False))
            tensor.module._pruned_names = (*getattr(tensor.module, "_pruned_names", ()), tensor.name)


def _masked_pairs(tensors: Sequence[PrunedTensor], gradients: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(targets, masks) of the tensors that have a mask: the parameters, or their gradients."""
    targets, masks = [], []
    for tensor in tensors:
        mask = getattr(tensor.module, f"{tensor.name}_mask", None)
        target = tensor.leaf().grad if gradients else tensor.leaf()
        if mask is not None and target is not None:
            targets.append(target)
            masks.append(mask)
    return targets, masks


def mask_gradients(tensors: Sequence[PrunedTensor]) -> None:
    """Zero the gradients of pruned entries, in place (before clipping and the optimizer step)."""
    gradients, masks = _masked_pairs(tensors, gradients=True)
    if gradients:
        with torch.no_grad():
            torch._foreach_mul_(gradients, masks)


def zero_pruned(tensors: Sequence[PrunedTensor]) -> None:
    """Set the pruned entries of every parameter to exactly zero, in place."""
    parameters, masks = _masked_pairs(tensors, gradients=False)
    if parameters:
        with torch.no_grad():
            torch._foreach_mul_(parameters, masks)


def keep_pruned_at_zero(
    optimizer: torch.optim.Optimizer, tensors: Sequence[PrunedTensor], mask_gradients_before_step: bool = True
) -> list[RemovableHandle]:
    """Hook ``optimizer`` so that it sees masked gradients and leaves pruned weights at zero: one
    multiplication per tensor before and after each ``step`` (not per forward). Returns the hook
    handles (``.remove()`` them to detach). ``mask_gradients_before_step=False`` leaves out the
    pre-step masking, for callers that mask the gradients themselves after backward (a
    closure-based ``step(closure)``, as Lightning calls it, runs its backward after the pre-hook)."""
    handles = [optimizer.register_step_post_hook(lambda *_: zero_pruned(tensors))]
    if mask_gradients_before_step:
        handles.append(optimizer.register_step_pre_hook(lambda *_: mask_gradients(tensors)))
    return handles


def channel_view(values: torch.Tensor, structured: bool) -> torch.Tensor:
    """Units as rows: one row per output channel (dim 0) when structured, else one per entry (a
    1-D tensor, a bias or a normalisation weight, has one entry per channel either way)."""
    return values.reshape(values.shape[0], -1) if structured else values.reshape(-1, 1)


def unit_scores(scores: torch.Tensor, values: torch.Tensor, structured: bool, norm: float | None) -> torch.Tensor:
    """One score per unit: the entry's score; for output channels the summed score, or with
    ``norm`` the channel's L_norm of ``values``."""
    if not structured:
        return scores.reshape(-1)
    if norm is None:
        return channel_view(scores, True).sum(dim=1)
    return torch.linalg.vector_norm(channel_view(values, True), ord=norm, dim=1)


def select_kept_units(scores: Sequence[torch.Tensor], kept: Sequence[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """New keep-flags (bool, one per unit) reaching ``sparsity`` (module docstring: counts, ties)."""
    check_choice("scope", scope, SCOPES)
    if scope == "layer":
        return [select_kept_units([s], [k], sparsity, "global")[0] for s, k in zip(scores, kept)]
    flat_scores = torch.cat([s.reshape(-1) for s in scores]).double()
    flat_kept = torch.cat([k.reshape(-1) for k in kept])
    if not torch.isfinite(flat_scores[flat_kept]).all():
        raise FloatingPointError("pruning scores of unpruned units are not finite")
    count = max(round(sparsity * flat_scores.numel()), int((~flat_kept).sum()))
    order = torch.sort(flat_scores.masked_fill(~flat_kept, -torch.inf), stable=True).indices
    new_kept = torch.ones_like(flat_kept)
    new_kept[order[:count]] = False
    return list(new_kept.split([k.numel() for k in kept]))


def kept_units(tensor: PrunedTensor, structured: bool) -> torch.Tensor:
    """Keep-flags per unit of the tensor's current mask (a channel is kept if any entry is)."""
    return channel_view(tensor.mask(), structured).bool().any(dim=1)


def apply_kept_units(tensor: PrunedTensor, kept: torch.Tensor, structured: bool) -> None:
    """Write unit keep-flags into the tensor's mask, in place (adding it if needed), and zero the pruned entries."""
    add_masks([tensor])
    mask = tensor.mask()
    mask.copy_(channel_view(mask, structured).mul(kept[:, None].to(mask.dtype)).reshape(mask.shape))
    zero_pruned([tensor])


def sparsity(tensors: Sequence[PrunedTensor]) -> tuple[float, dict[str, float]]:
    """The fraction of pruned entries over all tensors, and per tensor (by key)."""
    pruned = {t.key: int((t.mask() == 0).sum()) for t in tensors}
    sizes = {t.key: t.mask().numel() for t in tensors}
    return sum(pruned.values()) / sum(sizes.values()), {key: pruned[key] / sizes[key] for key in pruned}


def make_permanent(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold every mask of ``model`` (from :func:`add_masks`) into its parameter (pruned entries
    zero), remove the mask buffers and return the model's state_dict, loadable into an unpruned copy."""
    for module in model.modules():
        names = getattr(module, "_pruned_names", ())
        with torch.no_grad():
            for name in names:
                getattr(module, name).mul_(getattr(module, f"{name}_mask"))
                delattr(module, f"{name}_mask")
        if names:
            del module._pruned_names
    return model.state_dict()


def snapshot(tensors: Sequence[PrunedTensor]) -> dict[str, torch.Tensor]:
    """Copies of the tensors' values, for lottery-ticket rewinding."""
    return {t.key: t.leaf().detach().clone() for t in tensors}


def rewind(tensors: Sequence[PrunedTensor], saved: dict[str, torch.Tensor]) -> None:
    """Reset every tensor to ``saved``: the survivors take their saved values, the pruned entries stay zero."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.leaf().copy_(saved[tensor.key])
    zero_pruned(tensors)
