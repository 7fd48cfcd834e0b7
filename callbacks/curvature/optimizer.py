"""The EKFAC optimiser (George, Laurent et al. 2018), with KFAC as the same optimiser without
re-estimation, on the functional core's capture (:class:`LayerCapture`, :class:`ParameterLayout`,
:func:`output_gradient_draws`) and algebra (:class:`EigenBlock`).

How the optimiser gets its statistics: it takes parameters only, like any torch optimiser, so
``Task.optimizer`` can be ``functools.partial(EKFAC, lr=...)``. A :class:`FisherStatistics`
attaches it to a model: it tells the optimiser which parameters form Kronecker layers and, on the
steps where the optimiser asks for statistics, records a forward pass (layer inputs, by hooks)
and draws output gradients (sampled targets by default) with one extra backward to the layer
outputs, which writes no ``.grad``. The Lightning callback :class:`EKFACStatistics` drives it from
its hooks; in a plain loop wrap the forward pass in ``statistics.record(targets)``.

Per Kronecker layer, with statistics summed over every batch recorded since the last step (all
micro-batches of an accumulated step, all ranks), divided by their number of examples:

- every ``stats_every`` steps the KFAC factors A, G (KFC convention, see ``builder``) are
  running-averaged with weight ``decay`` on the old value;
- every ``eigen_every`` steps they are eigendecomposed and the scaling is reset to l_G l_A^T;
- every ``scale_every`` steps (never if None: KFAC) the scaling is running-averaged towards the
  second moment of per-example gradients projected in the eigenbasis;
- the direction is ``Q_G [(Q_G^T dW Q_A) / (scaling + damping)] Q_A^T`` of dW = grad + weight
  decay * parameter, then momentum and the learning rate as in SGD;
- every ``adapt_damping_every`` steps (never if None: fixed damping) the damping follows the
  Levenberg-Marquardt rule of Martens & Grosse (2015, section 6.5): after the step delta, the
  closure re-evaluates the loss on the same batch and rho = (loss(theta + delta) - loss(theta)) /
  (g.delta + 1/2 delta^T F delta) compares the actual change with the one the quadratic model
  predicts (g the loss gradient, F the EKFAC curvature of the preconditioned layers, none for the
  others); rho < 1/4 divides the damping by ``damping_factor``, rho > 3/4 multiplies it by
  ``damping_factor``, within [``min_damping``, ``max_damping``]. Losses are averaged over ranks,
  so every rank takes the same decision.

With ``distribute_eigen`` under DDP each layer's eigendecomposition is computed by one rank (layers
dealt out by cost, largest first, to the least loaded rank) and broadcast from it; every rank makes
the same broadcasts, and the factors are identical on all ranks, so the result equals the
undistributed one.

Every other parameter (BatchNorm, embeddings, grouped convolutions, ...) takes a plain SGD step
with the same learning rate, momentum and weight decay: BatchNorm in training mode mixes the
examples of a batch, so it has no per-example gradients to build a curvature from.
"""

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from callbacks.curvature.blocks import EigenBlock
from callbacks.curvature.capture import CapturedBatch, LayerCapture
from callbacks.curvature.layers import (
    PATCH_ORDER,
    KroneckerLayer,
    ParameterLayout,
    channel_major_index,
    has_kronecker_form,
    input_factor,
    output_factor,
    projected_second_moment,
)
from callbacks.curvature.targets import FISHER_TYPES, TASKS, output_gradient_draws
from framework.errors import UserInputError, check_choice, check_positive


class CurvatureError(RuntimeError):
    """A layer's curvature became non-finite or could not be eigendecomposed."""


def _check_frequency(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserInputError(f"{name}={value!r} must be an integer >= 1" + (" or None" if allow_none else ""))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise UserInputError(f"{name}={value!r} must be in [0, 1)")


def _all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over the ranks of the default process group, in one collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


_Eigen = tuple[torch.Tensor, torch.Tensor]  # eigenvalues, eigenvectors (columns)


class EKFAC(Optimizer):
    """EKFAC (``scale_every`` an integer) or KFAC (``scale_every=None``); see the module docstring.

    Args:
        params: parameters or parameter groups (groups may set ``lr``, ``momentum``, ``weight_decay``).
        lr, momentum, weight_decay: as in ``torch.optim.SGD`` (weight decay is added to the
            gradient before preconditioning).
        damping: added to the scaling before dividing, > 0.
        decay: weight of the old value in the running averages of factors and scaling, in [0, 1).
        stats_every, eigen_every, scale_every: frequencies in optimiser steps, >= 1.
        kl_clip: if set, the preconditioned directions are scaled by
            nu = min(1, sqrt(kl_clip / sum_layers lr^2 v.g)) (v preconditioned, g raw), which bounds
            the step's predicted KL divergence (Ba et al. 2017); None: no clipping.
        jitter: diagonal shift, relative to the factor's mean diagonal, for the float64 retry of
            a failed eigendecomposition.
        adapt_damping_every: adapt the damping every this many steps (Levenberg-Marquardt, see
            the module docstring; needs ``step(closure)``, which Lightning always passes); None:
            fixed damping. Costs one more forward and backward of the batch on those steps.
        damping_factor: the multiplier in (0, 1) of an adaptation.
        min_damping, max_damping: the range the adapted damping stays in.
        distribute_eigen: under DDP, compute each layer's eigendecomposition on one rank and
            broadcast it (see the module docstring).

    Needs :class:`FisherStatistics` (or the :class:`EKFACStatistics` callback) to attach it to
    the model before its first step.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decay: float = 0.95,
        stats_every: int = 1,
        eigen_every: int = 20,
        scale_every: int | None = 1,
        kl_clip: float | None = None,
        jitter: float = 1e-6,
        adapt_damping_every: int | None = None,
        damping_factor: float = 0.75,
        min_damping: float = 1e-8,
        max_damping: float = 1e3,
        distribute_eigen: bool = False,
    ) -> None:
        check_positive("lr", lr)
        check_positive("damping", damping)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_positive("jitter", jitter)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        _check_fraction("momentum", momentum)
        _check_fraction("decay", decay)
        _check_frequency("stats_every", stats_every)
        _check_frequency("eigen_every", eigen_every)
        _check_frequency("scale_every", scale_every, allow_none=True)
        _check_frequency("adapt_damping_every", adapt_damping_every, allow_none=True)
        if not 0.0 < damping_factor < 1.0:
            raise UserInputError(f"damping_factor={damping_factor!r} must be in (0, 1)")
        if not 0.0 < min_damping <= damping <= max_damping:
            raise UserInputError(
                f"damping={damping!r} must lie in [min_damping, max_damping] = [{min_damping!r}, {max_damping!r}], min_damping > 0"
            )
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.damping = damping
        self.decay = decay
        self.stats_every = stats_every
        self.eigen_every = eigen_every
        self.scale_every = scale_every
        self.kl_clip = kl_clip
        self.jitter = jitter
        self.adapt_damping_every = adapt_damping_every
        self.damping_factor = damping_factor
        self.min_damping, self.max_damping = min_damping, max_damping
        self.distribute_eigen = distribute_eigen
        # What the closure's loss is multiplied by to give the loss whose gradient the step
        # uses: Lightning divides it by accumulate_grad_batches (set by EKFACStatistics).
        self.closure_loss_scale = 1
        self.steps = 0
        self._evaluating = False
        self.layers: dict[str, KroneckerLayer] | None = None
        self._pending: list[CapturedBatch] = []
        self._metrics: dict[str, float] = {}

    def attach_layers(self, layout: ParameterLayout) -> None:
        """Precondition the Kronecker layers of ``layout`` whose parameters this optimiser holds."""
        held = {p for group in self.param_groups for p in group["params"]}
        self.layers = {
            name: layer
            for name, layer in layout.layers.items()
            if isinstance(layer, KroneckerLayer) and all(p in held for p in layer.parameters.values())
        }

    def _due(self, every: int | None) -> bool:
        return every is not None and self.steps % every == 0

    def wants_statistics(self) -> bool:
        """Whether the coming step updates the factors or the scaling, i.e. needs recorded batches."""
        return not self._evaluating and (self._due(self.stats_every) or self._due(self.scale_every))

    def add_statistics(self, batch: CapturedBatch) -> None:
        """Keep one recorded batch (layer inputs and output-gradient draws, as captured by
        :class:`LayerCapture`) for the coming step, in each layer's parameter dtype."""
        if self.layers is None:
            raise UserInputError("EKFAC is not attached to a model: use FisherStatistics(model, optimizer) first")
        dtypes = {name: layer.module.weight.dtype for name, layer in self.layers.items() if name in batch.inputs}
        inputs = {name: batch.inputs[name].to(dtype) for name, dtype in dtypes.items()}
        gradients = {name: batch.gradients[name].to(dtype) for name, dtype in dtypes.items()}
        self._pending.append(CapturedBatch(batch.size, inputs, gradients))

    def pop_metrics(self) -> dict[str, float]:
        """What the last steps measured (``ekfac/...``), cleared on reading."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    def spectra(self) -> dict[str, torch.Tensor]:
        """Per preconditioned layer, log10 of its damped scaling (the numbers the projected
        gradient is divided by: eigenvalues of the curvature plus the damping), flattened."""
        return {
            name: torch.log10(self._layer_state(layer)["scaling"] + self.damping).flatten()
            for name, layer in (self.layers or {}).items()
            if "scaling" in self._layer_state(layer)
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["counters"] = {"steps": self.steps, "damping": self.damping, "patch_order": PATCH_ORDER}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("counters")
        self.steps, self.damping = counters["steps"], counters["damping"]
        super().load_state_dict(state_dict)
        if counters.get("patch_order") != PATCH_ORDER:
            self._reorder_conv_input_statistics()

    def _reorder_conv_input_statistics(self) -> None:
        """A checkpoint written before Conv2d patches were ordered kernel row, kernel column,
        channel holds each Conv2d layer's input factor and basis in F.unfold's channel-major
        order: re-index them, so that the resumed run preconditions as the saved one did. A
        layer's state lives on its weight, the only 4-d tensor a Kronecker layer has."""
        for group in self.param_groups:
            for weight in group["params"]:
                state = self.state.get(weight, {})
                if weight.dim() != 4 or "input_factor" not in state:
                    continue
                channels, kh, kw = weight.shape[1:]
                has_bias = len(state["input_factor"]) > channels * kh * kw
                index = channel_major_index(channels, (kh, kw), has_bias).to(state["input_factor"].device)
                state["input_factor"] = state["input_factor"][index][:, index]
                if "input_basis" in state:
                    state["input_basis"] = state["input_basis"][index]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update the curvature from the recorded batches where due, then take one step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layers is None:
            raise UserInputError("EKFAC is not attached to a model: use FisherStatistics(model, optimizer) first")
        adapting = self._due(self.adapt_damping_every)
        if adapting and closure is None:
            raise UserInputError(
                "adapt_damping_every is set, so EKFAC.step needs a closure that re-evaluates the loss (Lightning's automatic "
                "optimisation passes one; fp16 with a GradScaler does not: use bf16-mixed or fixed damping)"
            )
        self._update_curvature()
        self._pending.clear()
        updates = self._apply(self._directions())
        if adapting and loss is not None:
            self._adapt_damping(closure, loss, updates)
        self.steps += 1
        return loss

    def _layer_state(self, layer: KroneckerLayer) -> dict[str, Any]:
        return self.state[next(iter(layer.parameters.values()))]

    def _recorded(self, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, output gradients stacked over draws) of each pending batch that ran the layer."""
        for batch in self._pending:
            if name in batch.inputs:
                yield batch.inputs[name], batch.gradients[name]

    def _running_average(self, state: dict[str, Any], key: str, value: torch.Tensor, what: str) -> None:
        """Fold ``value`` into ``state[key]``; refuse a non-finite result before it reaches the model."""
        state[key] = value if key not in state else self.decay * state[key] + (1 - self.decay) * value
        if not _finite(state[key]):
            raise CurvatureError(f"EKFAC: the {what} became non-finite at step {self.steps}; lower the learning rate")

    def _averaged(self, statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pending sums of all ranks, divided by their number of examples."""
        reference = next(iter(statistics.values()))
        examples = reference.new_tensor(float(sum(batch.size for batch in self._pending)))
        *sums, examples = _all_reduce_sum([*statistics.values(), examples])
        return {key: total / examples for key, total in zip(statistics, sums)}

    def _update_curvature(self) -> None:
        recorded = {name: layer for name, layer in self.layers.items() if any(name in b.inputs for b in self._pending)}
        if recorded and self._due(self.stats_every):
            factors = {}
            for name in recorded:
                factors[f"A {name}"] = sum(input_factor(a) for a, _ in self._recorded(name))
                factors[f"G {name}"] = sum(output_factor(g) for _, g in self._recorded(name))
            averaged = self._averaged(factors)
            for name, layer in recorded.items():
                state = self._layer_state(layer)
                self._running_average(state, "input_factor", averaged[f"A {name}"], f"input factor of layer {name!r}")
                self._running_average(state, "output_factor", averaged[f"G {name}"], f"output-gradient factor of layer {name!r}")
        if self._due(self.eigen_every) and self.layers:
            self._eigendecompose()
        if recorded and self._due(self.scale_every):
            projected = {
                name: sum(
                    projected_second_moment(a, g, self._layer_state(layer)["input_basis"], self._layer_state(layer)["output_basis"])
                    for a, g in self._recorded(name)
                )
                for name, layer in recorded.items()
            }
            for name, scaling in self._averaged(projected).items():
                self._running_average(self._layer_state(self.layers[name]), "scaling", scaling, f"scaling of layer {name!r}")

    def _eigendecompose(self) -> None:
        started = time.perf_counter()
        for name, layer in self.layers.items():
            if "input_factor" not in self._layer_state(layer):
                raise UserInputError(
                    f"EKFAC has no curvature statistics for layer {name!r} at step {self.steps}: record the forward "
                    "pass with FisherStatistics.record (or use the EKFACStatistics callback)"
                )
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distribute_eigen and distributed:
            results = self._eigendecompose_spread(dist.get_world_size(), dist.get_rank())
        else:
            results = {name: self._eigendecompose_layer(layer) for name, layer in self.layers.items()}
        for name, layer in self.layers.items():
            state = self._layer_state(layer)
            for which, key, result in (("input", "input_factor", results[name][0]), ("output-gradient", "output_factor", results[name][1])):
                if result is None:
                    problem = "has non-finite entries" if not _finite(state[key]) else "could not be eigendecomposed"
                    raise CurvatureError(
                        f"EKFAC: the {which} factor of layer {name!r} {problem} at step {self.steps}, also in float64 with "
                        f"jitter {self.jitter}; lower the learning rate or raise the damping"
                    )
            (values_a, state["input_basis"]), (values_g, state["output_basis"]) = results[name]
            state["scaling"] = torch.outer(values_g, values_a)
        self._metrics["ekfac/eigen_seconds"] = time.perf_counter() - started

    def _eigendecompose_layer(self, layer: KroneckerLayer) -> tuple[_Eigen | None, _Eigen | None]:
        state = self._layer_state(layer)
        return self._eigh(state["input_factor"]), self._eigh(state["output_factor"])

    def _eigendecompose_spread(self, world: int, rank: int) -> dict[str, tuple[_Eigen | None, _Eigen | None]]:
        """Each layer eigendecomposed by its owner rank, then broadcast from it: one broadcast per
        rank that owns layers, the same calls on every rank. A failure travels as a flag, so every
        rank raises the same error."""
        sizes = {name: (layer.in_augmented, layer.out_features) for name, layer in self.layers.items()}
        load, owners = [0] * world, {}
        for name in sorted(sizes, key=lambda n: -(sizes[n][0] ** 3 + sizes[n][1] ** 3)):
            owners[name] = owner = load.index(min(load))
            load[owner] += sizes[name][0] ** 3 + sizes[name][1] ** 3
        reference = self._layer_state(next(iter(self.layers.values())))["input_factor"]
        results = {}
        for source in range(world):
            owned = [name for name in self.layers if owners[name] == source]
            if not owned:
                continue
            shapes = [(n, n * n + n + 1) for name in owned for n in sizes[name]]
            if source == rank:
                parts = []
                for name in owned:
                    for result, n in zip(self._eigendecompose_layer(self.layers[name]), sizes[name]):
                        ok = result is not None
                        values, vectors = result if ok else (reference.new_zeros(n), reference.new_zeros(n, n))
                        parts += [reference.new_tensor([float(ok)]), values, vectors.reshape(-1)]
                buffer = torch.cat(parts)
            else:
                buffer = reference.new_empty(sum(size for _, size in shapes))
            dist.broadcast(buffer, src=source)
            chunks = iter(buffer.split([size for _, size in shapes]))
            for name in owned:
                pair = []
                for n in sizes[name]:
                    flag, values, vectors = next(chunks).split([1, n, n * n])
                    pair.append((values, vectors.view(n, n)) if flag.item() == 1.0 else None)
                results[name] = tuple(pair)
        return results

    def _eigh(self, factor: torch.Tensor) -> _Eigen | None:
        """Eigenvalues (clamped at 0) and eigenvectors; on failure or non-finite output retried in
        float64 with a diagonal jitter; None if that fails too."""
        shift = factor.diagonal().abs().mean().double() * self.jitter
        jittered = factor.double() + shift * torch.eye(len(factor), dtype=torch.float64, device=factor.device)
        for matrix in (factor, jittered):
            try:
                values, vectors = torch.linalg.eigh(matrix)
            except RuntimeError:
                continue
            if _finite(values, vectors):
                return values.clamp_min(0).to(factor.dtype), vectors.to(factor.dtype)
        return None

    def _directions(self) -> dict[torch.Tensor, torch.Tensor]:
        """grad + weight decay * parameter for every parameter with a gradient, preconditioned
        per Kronecker layer."""
        directions, learning_rates = {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                learning_rates[p] = group["lr"]
                if p.grad is not None:
                    directions[p] = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
        raw_squared = preconditioned_squared = predicted_kl = 0.0
        preconditioned = []
        for name, layer in self.layers.items():
            params = list(layer.parameters.values())
            if not any(p in directions for p in params):
                continue
            state = self._layer_state(layer)
            if "scaling" not in state:
                raise UserInputError(
                    f"EKFAC has no curvature for layer {name!r} at step {self.steps}: record the forward pass with "
                    "FisherStatistics.record (or use the EKFACStatistics callback)"
                )
            flat = torch.cat([directions.get(p, torch.zeros_like(p)).reshape(-1) for p in params])
            block = EigenBlock(layer, state["output_basis"], state["input_basis"], state["scaling"])
            natural = block.solve(flat, self.damping)
            for p, part in zip(params, natural.split([p.numel() for p in params])):
                directions[p] = part.view_as(p)
            preconditioned += params
            predicted_kl += learning_rates[params[0]] ** 2 * torch.dot(natural, flat).item()
            raw_squared += flat.square().sum().item()
            preconditioned_squared += natural.square().sum().item()
            scaling = state["scaling"]
            self._metrics[f"ekfac/condition/{name}"] = ((scaling.max() + self.damping) / (scaling.min() + self.damping)).item()
        self._metrics["ekfac/damping"] = self.damping
        if self.kl_clip is not None and predicted_kl > 0:
            self._metrics["ekfac/kl_clip_factor"] = factor = min(1.0, (self.kl_clip / predicted_kl) ** 0.5)
            preconditioned_squared *= factor**2
            for p in preconditioned:
                directions[p] = directions[p] * factor
        if raw_squared > 0:
            self._metrics["ekfac/preconditioned_to_raw_norm"] = (preconditioned_squared / raw_squared) ** 0.5
        return directions

    def _predicted_change(self, updates: dict[torch.Tensor, tuple[torch.Tensor, float]]) -> float:
        """The change of the loss the quadratic model predicts for the step just taken,
        g.delta + 1/2 delta^T F delta, with g the loss gradient (``.grad``) and F the curvature of
        the preconditioned layers (other parameters contribute g.delta only)."""
        steps = {p: direction * -lr for p, (direction, lr) in updates.items()}
        change = sum(torch.dot(p.grad.flatten(), delta.flatten()) for p, delta in steps.items() if p.grad is not None)
        for layer in self.layers.values():
            params = list(layer.parameters.values())
            if not any(p in steps for p in params):
                continue
            state = self._layer_state(layer)
            delta = layer.to_matrix(torch.cat([steps.get(p, torch.zeros_like(p)).reshape(-1) for p in params]))
            projected = state["output_basis"].T @ delta @ state["input_basis"]
            change = change + 0.5 * (state["scaling"] * projected.square()).sum()
        return float(change)

    def _adapt_damping(
        self, closure: Callable[[], torch.Tensor], loss: torch.Tensor, updates: dict[torch.Tensor, tuple[torch.Tensor, float]]
    ) -> None:
        """Levenberg-Marquardt: compare the actual change of the loss on this batch with the
        predicted one and scale the damping (see the module docstring)."""
        predicted = self._predicted_change(updates)
        self._evaluating = True
        try:
            with torch.enable_grad():
                new_loss = closure()
        finally:
            self._evaluating = False
        losses = torch.stack([torch.as_tensor(loss).detach().double().cpu(), torch.as_tensor(new_loss).detach().double().cpu()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = self.param_groups[0]["params"][0].device
            losses = _all_reduce_sum([losses.to(device)])[0].cpu() / dist.get_world_size()
        actual = float(losses[1] - losses[0]) * self.closure_loss_scale
        ratio = actual / predicted if predicted < 0 and math.isfinite(actual) else -math.inf
        if ratio < 0.25:
            self.damping = min(self.damping / self.damping_factor, self.max_damping)
        elif ratio > 0.75:
            self.damping = max(self.damping * self.damping_factor, self.min_damping)
        self._metrics["ekfac/reduction_ratio"] = ratio

    def _apply(self, directions: dict[torch.Tensor, torch.Tensor]) -> dict[torch.Tensor, tuple[torch.Tensor, float]]:
        """Momentum and learning rate, as ``torch.optim.SGD`` does them; returns the step
        direction and learning rate of each parameter (it moved by -lr times the direction)."""
        applied = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p not in directions:
                    continue
                direction = directions[p]
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = direction.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(direction)
                    direction = state["momentum_buffer"]
                p.add_(direction, alpha=-group["lr"])
                applied[p] = (direction, group["lr"])
        return applied


class FisherStatistics:
    """Attaches an :class:`EKFAC` to ``model`` and records the statistics it asks for.

    Args:
        model: the network; its Linear/Conv2d layers (with a Kronecker form) are preconditioned.
        optimizer: the EKFAC holding the model's parameters.
        fisher_type: ``mc`` (targets sampled from the model: the true Fisher), ``empirical``
            (the observed labels, i.e. the training loss's own per-example gradients) or
            ``exact`` (every class, one extra backward each).
        task: ``classification`` (the output is logits, softmax cross-entropy) or ``regression``
            (unit Gaussian).
        samples: targets drawn per example for ``mc``.
        seed: the sampled targets of a recorded batch are a function of (seed, optimiser step,
            batch within the step, rank), so resumed runs draw the same ones and the training's
            random stream is left alone.
        output_module: name of the submodule whose output is the model's output ("" for ``model``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: EKFAC,
        fisher_type: str = "mc",
        task: str = "classification",
        samples: int = 1,
        seed: int = 0,
        output_module: str = "",
    ) -> None:
        check_choice("fisher_type", fisher_type, FISHER_TYPES)
        check_choice("task", task, TASKS)
        check_positive("samples", samples)
        if not isinstance(optimizer, EKFAC):
            raise UserInputError(f"FisherStatistics needs an EKFAC optimizer, got {type(optimizer).__name__}")
        kronecker = [name for name, module in model.named_modules() if has_kronecker_form(module)]
        self.layout = ParameterLayout(model, kronecker)
        self.optimizer = optimizer
        self.fisher_type, self.task, self.samples, self.seed = fisher_type, task, samples, seed
        self.output_module = model.get_submodule(output_module)
        optimizer.attach_layers(self.layout)
        self._capture: LayerCapture | None = None
        self._output_hook: torch.utils.hooks.RemovableHandle | None = None
        self._outputs: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        self._recorded_at: tuple[int, int] = (-1, 0)

    @contextmanager
    def record(self, targets: torch.Tensor | None = None) -> Iterator[None]:
        """Record the forward pass run inside (if the optimiser's next step needs statistics);
        on leaving, draw output gradients (an extra backward to the layer outputs, no ``.grad``
        written) and hand the batch to the optimiser. ``targets`` are needed by ``empirical``."""
        self.start(targets)
        try:
            yield
        except BaseException:
            self.cancel()
            raise
        self.finish()

    def start(self, targets: torch.Tensor | None = None) -> None:
        """Begin recording (see :meth:`record`); a no-op if no statistics are due."""
        self.cancel()
        if not (self.optimizer.wants_statistics() and self.optimizer.layers and torch.is_grad_enabled()):
            return
        self._targets = targets
        self._capture = LayerCapture(self.layout).__enter__()
        self._output_hook = self.output_module.register_forward_hook(self._keep_output)

    def _keep_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # Keep the first call to finish, the model's own forward: under DDP, Lightning runs the
        # whole training_step through the LightningModule's forward, which then returns the loss.
        if self._outputs is None:
            self._outputs = output

    def cancel(self) -> None:
        """Stop recording and drop what was recorded."""
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._output_hook.remove()
        self._capture = self._output_hook = self._outputs = self._targets = None

    def finish(self) -> None:
        """Stop recording and hand the recorded batch to the optimiser (before the graph is freed)."""
        capture, outputs, targets = self._capture, self._outputs, self._targets
        self.cancel()
        if capture is None:
            return
        if outputs is None or not capture.inputs:
            raise UserInputError(
                f"no forward pass of the model ({type(self.output_module).__name__}) was recorded; call the model "
                "inside record() (a LightningModule's training_step must call self(...)), or set output_module"
            )
        if not _finite(outputs.detach()):
            raise CurvatureError(f"EKFAC: non-finite model output at step {self.optimizer.steps}; lower the learning rate")
        draws = output_gradient_draws(
            outputs.detach().to(torch.promote_types(outputs.dtype, torch.float32)),
            targets,
            self.fisher_type,
            self.task,
            self.samples,
            self._generator(outputs.device),
        )
        gradients = capture.draw_gradients(outputs, draws.to(outputs.dtype))
        self.optimizer.add_statistics(CapturedBatch(outputs.shape[0], capture.inputs, gradients))

    def _generator(self, device: torch.device) -> torch.Generator:
        step, batch = self._recorded_at
        batch = batch + 1 if step == self.optimizer.steps else 0
        self._recorded_at = (self.optimizer.steps, batch)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return torch.Generator(device=device).manual_seed(hash((self.seed, self.optimizer.steps, batch, rank)) % 2**63)
