"""Networks that choose per input how much computation to spend.

An iterated block (a GRU cell fed the encoded input at every step) emits a prediction and a
halting probability after each step. PonderNet (Banino et al. 2021) turns the halting
probabilities into a distribution over the step at which to stop and regularises it towards a
geometric prior; ACT (Graves 2016) stops once the halting units add up to ``1 - eps`` and charges
a ponder cost ``N + R``. The early-exit CNN has a classifier and a learned exit decision after
each convolutional stage, its exits weighted like PonderNet's steps.

The habitual-vs-controlled network (Kamanda's two modes) runs a cheap path on every input and a
gate that sends the input to a costly path as well; it is a two-step instance of the same
halting scheme.

Training runs every input through all steps (stages) and weights each by its halting
probability, so ``forward`` returns (N, C) logits and trains with :class:`ClassificationTask`
unchanged; the per-step details come from ``forward_steps``.

**The compute interface** (:class:`AdaptiveComputation`, what the cost-of-effort penalty of
:mod:`callbacks.effort` reads): every model here keeps the :class:`HaltingSteps` of its last
``forward`` and returns from :meth:`~AdaptiveComputation.expected_compute` the per-example
expected compute of that forward, differentiable, in ``steps`` (expected number of steps,
ACT's ponder cost N + R, 1 + the gate probability) or ``flops`` (expected FLOPs of the path
taken, counted by :class:`torch.utils.flop_counter.FlopCounterMode`: 2 per multiply-add of the
Linear, GRU and convolution layers). :meth:`~AdaptiveComputation.forward_adaptive` is the
inference that really spends less: each input runs only up to its halting (exit, gate)
decision, the inputs still running grouped at each step.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from callbacks.distillation.losses import kd_loss
from framework.errors import UserInputError, check_choice, check_positive
from framework.models.cnn import SmallCNN

ComputeMeasure = Literal["steps", "flops"]
MEASURES = ("steps", "flops")
GATE_MODES = ("soft", "straight_through")


@dataclass
class HaltingSteps:
    """What an iterated block computed at each step.

    Attributes:
        step_logits: (N, max_steps, C) the prediction after each step.
        halting_distribution: (N, max_steps) the probability of stopping at each step; sums to 1.
    """

    step_logits: torch.Tensor
    halting_distribution: torch.Tensor

    @property
    def expected_steps(self) -> torch.Tensor:
        """(N,) the expected number of steps, sum over n of n * p_n."""
        step_numbers = torch.arange(1, self.halting_distribution.shape[1] + 1, device=self.halting_distribution.device)
        return (self.halting_distribution * step_numbers).sum(dim=1)


@dataclass
class PonderSteps(HaltingSteps):
    """:class:`HaltingSteps` plus the conditional halting probabilities lambda_n (N, max_steps):
    the probability of stopping at step n once step n is reached (1 at the last step)."""

    halting_probabilities: torch.Tensor


@dataclass
class ACTSteps(HaltingSteps):
    """:class:`HaltingSteps` plus ACT's halting step N (N,) (int64, counted from 1) and
    remainder R (N,)."""

    halting_step: torch.Tensor
    remainder: torch.Tensor

    @property
    def ponder_cost(self) -> torch.Tensor:
        """(N,) Graves' ponder cost N + R; its gradient flows through R."""
        return self.halting_step + self.remainder


def ponder_halting_distribution(halting_probabilities: torch.Tensor) -> torch.Tensor:
    """p_n = lambda_n * prod_{k<n} (1 - lambda_k) over the last dimension, with the probability of
    not having stopped before the last step put on the last step (lambda_last taken as 1), so
    that the distribution sums to 1."""
    ones = torch.ones_like(halting_probabilities[..., :1])
    lambdas = torch.cat([halting_probabilities[..., :-1], ones], dim=-1)
    not_halted_yet = torch.cumprod(torch.cat([ones, 1 - lambdas[..., :-1]], dim=-1), dim=-1)
    return lambdas * not_halted_yet


def geometric_prior(prior_halt: float, max_steps: int) -> torch.Tensor:
    """(max_steps,) the geometric distribution with halting probability ``prior_halt``,
    truncated like :func:`ponder_halting_distribution` (the tail on the last step)."""
    return ponder_halting_distribution(torch.full((max_steps,), prior_halt, dtype=torch.float64)).float()


def log_mixture(steps: HaltingSteps) -> torch.Tensor:
    """(N, C) log sum_n p_n softmax(y_n): the log class probabilities of the model that stops at
    step n with probability p_n; cross-entropy on them is its negative log-likelihood."""
    weights = steps.halting_distribution
    log_weights = weights.clamp_min(torch.finfo(weights.dtype).tiny).log()
    return torch.logsumexp(log_weights[..., None] + steps.step_logits.log_softmax(dim=-1), dim=1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, with 0 log 0 = 0."""
    return (torch.xlogy(p, p) - p * q.log()).sum(dim=-1)


def act_halting(halting_units: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ACT's halting rule on halting units h (N, max_steps) in (0, 1): N is the first step at
    which the cumulative sum of h reaches ``threshold`` (the last step if none does), R = 1 -
    sum_{n<N} h_n. Returns ``(distribution, halting_step, remainder)``: the distribution is h_n
    before N, R at N and 0 after."""
    max_steps = halting_units.shape[1]
    reached = halting_units.detach().cumsum(dim=1) >= threshold
    reached[:, -1] = True
    halting_index = reached.int().argmax(dim=1)  # the first step that reaches the threshold
    before_halting = torch.arange(max_steps, device=halting_units.device) < halting_index[:, None]
    remainder = 1 - (halting_units * before_halting).sum(dim=1)
    at_halting = F.one_hot(halting_index, max_steps).bool()
    distribution = torch.where(before_halting, halting_units, 0.0) + torch.where(at_halting, remainder[:, None], 0.0)
    return distribution, halting_index + 1, remainder


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs of one call of ``function`` as :class:`FlopCounterMode` counts them (2 per
    multiply-add of matmuls and convolutions), without gradients."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


class AdaptiveComputation(nn.Module):
    """Base of the networks that choose their compute per input, and the interface the
    cost-of-effort penalty reads.

    A subclass implements :meth:`forward_steps` (all steps, as in training), passes its result
    through :meth:`remember` in ``forward``, implements :meth:`step_flops` and
    :meth:`forward_adaptive`; it may override :meth:`step_cost` (the ``steps`` measure).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_steps: HaltingSteps | None = None
        self.last_input_shape: tuple[int, ...] | None = None
        self._flops_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def forward_steps(self, x: torch.Tensor) -> HaltingSteps:
        """Run every step: the per-step logits and the halting distribution."""
        raise NotImplementedError

    def forward_adaptive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference that stops: each input runs only up to its own decision. Returns
        ``(logits (N, C), steps taken (N,) int64 from 1)``."""
        raise NotImplementedError

    def step_flops(self, example: torch.Tensor) -> list[int]:
        """FLOPs of each step alone (halting head included) on ``example``, one input (1, ...)."""
        raise NotImplementedError

    def remember(self, steps: HaltingSteps, x: torch.Tensor) -> HaltingSteps:
        """Keep ``steps`` and the input shape as the last forward's, for :meth:`expected_compute`."""
        self.last_steps, self.last_input_shape = steps, tuple(x.shape[1:])
        return steps

    def cumulative_flops(self, input_shape: Sequence[int] | None = None) -> torch.Tensor:
        """(max_steps,) float64: FLOPs per input of stopping after step n (steps 1..n run).
        Counted once per input shape (default: the last forward's) and cached."""
        shape = tuple(input_shape if input_shape is not None else self.last_input_shape or ())
        if not shape:
            raise RuntimeError(f"{type(self).__name__}.cumulative_flops needs an input shape: run forward first")
        if shape not in self._flops_cache:
            parameter = next(self.parameters())
            example = torch.zeros((1, *shape), dtype=parameter.dtype, device=parameter.device)
            with torch.no_grad():
                per_step = self.step_flops(example)
            self._flops_cache[shape] = torch.tensor(per_step, dtype=torch.float64).cumsum(dim=0)
        return self._flops_cache[shape]

    def step_cost(self, steps: HaltingSteps) -> torch.Tensor:
        """(N,) the ``steps`` measure: the expected number of steps."""
        return steps.expected_steps

    def expected_flops(self, steps: HaltingSteps) -> torch.Tensor:
        """(N,) the ``flops`` measure: sum_n p_n * cumulative FLOPs of step n."""
        cumulative = self.cumulative_flops().to(device=steps.halting_distribution.device, dtype=steps.halting_distribution.dtype)
        return steps.halting_distribution @ cumulative

    def expected_compute(self, measure: ComputeMeasure = "steps") -> torch.Tensor:
        """(N,) the expected compute of each input of the last ``forward``, differentiable:
        ``steps`` (:meth:`step_cost`) or ``flops`` (:meth:`expected_flops`)."""
        check_choice("measure", measure, MEASURES)
        if self.last_steps is None:
            raise RuntimeError(f"{type(self).__name__}.expected_compute reads the last forward: run forward first")
        return self.step_cost(self.last_steps) if measure == "steps" else self.expected_flops(self.last_steps)

    def compute_of_steps(self, steps_taken: torch.Tensor, measure: ComputeMeasure = "steps", input_shape: Sequence[int] | None = None) -> torch.Tensor:
        """(N,) the compute of inputs that ran ``steps_taken`` steps (as :meth:`forward_adaptive`
        returns them), in ``steps`` or ``flops``."""
        check_choice("measure", measure, MEASURES)
        if measure == "steps":
            return steps_taken.to(torch.float64)
        return self.cumulative_flops(input_shape).to(steps_taken.device)[steps_taken - 1]

    def compute_bounds(self, measure: ComputeMeasure = "steps", input_shape: Sequence[int] | None = None) -> tuple[float, float]:
        """The least and the most compute an input can take (first step only, every step)."""
        check_choice("measure", measure, MEASURES)
        if measure == "steps":
            return 1.0, float(len(self.cumulative_flops(input_shape)))
        cumulative = self.cumulative_flops(input_shape)
        return float(cumulative[0]), float(cumulative[-1])


class IteratedBlock(AdaptiveComputation):
    """The shared recurrent step network: the flattened input goes through ``Linear -> ReLU``
    and is fed to a GRU cell at every step (from a zero state); after each step a Linear head
    gives the logits and another the halting logit.

    Args:
        in_features: size of the flattened input (e.g. 3 * 8 * 8 for Stroop digits).
        num_classes: size of the output.
        hidden: width of the encoding and of the recurrent state.
        max_steps: number of steps run.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int, max_steps: int) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes), ("hidden", hidden), ("max_steps", max_steps)):
            check_positive(name, value)
        self.max_steps = max_steps
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.cell = nn.GRUCell(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.halting = nn.Linear(hidden, 1)

    def step(self, encoded: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step: ``(new state, logits, halting logit (N,))``."""
        state = self.cell(encoded, state)
        return state, self.classifier(state), self.halting(state).squeeze(-1)

    def run_steps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run all ``max_steps`` steps: ``(step_logits (N, max_steps, C), halting_logits (N, max_steps))``."""
        encoded = self.encoder(x)
        state = torch.zeros_like(encoded)
        step_logits, halting_logits = [], []
        for _ in range(self.max_steps):
            state, logits, halting_logit = self.step(encoded, state)
            step_logits.append(logits)
            halting_logits.append(halting_logit)
        return torch.stack(step_logits, dim=1), torch.stack(halting_logits, dim=1)

    def step_flops(self, example: torch.Tensor) -> list[int]:
        """The encoder counts with step 1; every step the GRU cell and both heads."""
        encoded = self.encoder(example)
        encoder = count_flops(lambda: self.encoder(example))
        step = count_flops(lambda: self.step(encoded, encoded))
        return [encoder + step] + [step] * (self.max_steps - 1)


class PonderNet(IteratedBlock):
    """PonderNet (Banino et al. 2021): the halting distribution p_n over ``max_steps`` steps.

    ``forward`` returns :func:`log_mixture` of the steps. PonderNet's own loss is
    :meth:`expected_loss` + beta * :meth:`kl_to_prior`; with ``beta > 0``
    :meth:`regularization` adds the KL term of the last training forward to the task's loss.
    :meth:`forward_adaptive` halts each input at the first step whose lambda_n reaches
    ``threshold`` (Banino et al. sample the halting; ``sample=True`` does).

    Args:
        prior_halt: lambda_p, the halting probability of the geometric prior, in (0, 1).
        beta: weight of the KL to the prior added to the training loss (0: none).
        threshold: the halting rule of :meth:`forward_adaptive`, in (0, 1].
        (the rest as in :class:`IteratedBlock`)
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 10,
        hidden: int = 64,
        max_steps: int = 10,
        prior_halt: float = 0.2,
        beta: float = 0.0,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(in_features, num_classes, hidden, max_steps)
        if not 0.0 < prior_halt < 1.0:
            raise UserInputError(f"prior_halt={prior_halt!r} must be in (0, 1)")
        if not 0.0 < threshold <= 1.0:
            raise UserInputError(f"threshold={threshold!r} must be in (0, 1]")
        check_positive("beta", beta, allow_zero=True)
        self.prior_halt, self.beta, self.threshold = prior_halt, beta, threshold
        self.register_buffer("prior", geometric_prior(prior_halt, max_steps), persistent=False)

    def forward_steps(self, x: torch.Tensor) -> PonderSteps:
        """Run all steps: per-step logits, halting probabilities lambda_n and distribution p_n."""
        step_logits, halting_logits = self.run_steps(x)
        halting_probabilities = torch.sigmoid(halting_logits)
        return PonderSteps(step_logits, ponder_halting_distribution(halting_probabilities), halting_probabilities)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mixture(self.remember(self.forward_steps(x), x))

    def expected_loss(self, steps: PonderSteps, targets: torch.Tensor) -> torch.Tensor:
        """PonderNet's reconstruction term: sum_n p_n * cross-entropy(y_n, target), batch mean."""
        per_step = F.cross_entropy(steps.step_logits.transpose(1, 2), targets[:, None].expand(-1, self.max_steps), reduction="none")
        return (steps.halting_distribution * per_step).sum(dim=1).mean()

    def kl_to_prior(self, steps: PonderSteps) -> torch.Tensor:
        """PonderNet's regulariser: KL(p || truncated geometric(prior_halt)), batch mean."""
        return kl_divergence(steps.halting_distribution, self.prior.to(steps.halting_distribution.dtype)).mean()

    def regularization(self) -> torch.Tensor:
        """beta * :meth:`kl_to_prior` of the last forward (what ``Task.regularized`` adds)."""
        if self.beta == 0 or self.last_steps is None:
            return self.prior.new_zeros(())
        return self.beta * self.kl_to_prior(self.last_steps)

    @torch.no_grad()
    def forward_adaptive(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each input runs only until it halts: at the first step with lambda_n >= ``threshold``
        (or, with ``sample``, with probability lambda_n), the last step otherwise; the logits
        are that step's, as in :meth:`forward_steps`. Returns ``(logits, halting step from 1)``."""
        encoded = self.encoder(x)
        state = torch.zeros_like(encoded)
        logits = encoded.new_zeros(len(x), self.classifier.out_features)
        halting_step = torch.full((len(x),), self.max_steps, dtype=torch.int64, device=x.device)
        inside = torch.arange(len(x), device=x.device)
        for step in range(self.max_steps):
            state, step_logits, halting_logit = self.step(encoded, state)
            halting_probability = torch.sigmoid(halting_logit)
            if step == self.max_steps - 1:
                halts = torch.ones_like(halting_probability, dtype=torch.bool)
            elif sample:
                halts = torch.rand(halting_probability.shape, generator=generator, device=x.device, dtype=halting_probability.dtype) < halting_probability
            else:
                halts = halting_probability >= self.threshold
            logits[inside[halts]] = step_logits[halts]
            halting_step[inside[halts]] = step + 1
            inside, encoded, state = inside[~halts], encoded[~halts], state[~halts]
            if len(inside) == 0:
                break
        return logits, halting_step


class AdaptiveComputationTime(IteratedBlock):
    """ACT (Graves 2016): sigmoid halting units h_n; computation stops at the first step N at
    which sum_{n<=N} h_n >= 1 - ``eps``, with the remainder R = 1 - sum_{n<N} h_n as the last
    weight. ``forward`` returns the weighted mean of the step logits, sum_n p_n y_n (running all
    ``max_steps`` steps, as in training); the ponder cost N + R is in :meth:`forward_steps`'s
    :attr:`ACTSteps.ponder_cost` and is the ``steps`` measure of :meth:`expected_compute`;
    :meth:`forward_adaptive` runs each input only up to its N.

    (Graves adds a first-step flag to the input because a sequence carries the state over
    between inputs; here each input starts from a zero state, which already marks step 1.)

    Args:
        eps: the halting threshold is ``1 - eps``; in (0, 1).
        (the rest as in :class:`IteratedBlock`)
    """

    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 64, max_steps: int = 10, eps: float = 0.01) -> None:
        super().__init__(in_features, num_classes, hidden, max_steps)
        if not 0.0 < eps < 1.0:
            raise UserInputError(f"eps={eps!r} must be in (0, 1)")
        self.eps = eps

    def forward_steps(self, x: torch.Tensor) -> ACTSteps:
        """Run all steps: per-step logits, the halting distribution, N and R."""
        step_logits, halting_logits = self.run_steps(x)
        distribution, halting_step, remainder = act_halting(torch.sigmoid(halting_logits), 1 - self.eps)
        return ACTSteps(step_logits, distribution, halting_step, remainder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.remember(self.forward_steps(x), x)
        return (steps.halting_distribution[..., None] * steps.step_logits).sum(dim=1)

    def step_cost(self, steps: ACTSteps) -> torch.Tensor:
        """Graves' ponder cost N + R."""
        return steps.ponder_cost

    def expected_flops(self, steps: ACTSteps) -> torch.Tensor:
        """The FLOPs of N + R steps (the encoder once, then N + R times one step), so that the
        gradient flows through R as for the ponder cost."""
        cumulative = self.cumulative_flops().to(device=steps.remainder.device, dtype=steps.remainder.dtype)
        per_step = cumulative[1] - cumulative[0] if len(cumulative) > 1 else cumulative[0]
        return cumulative[0] + (steps.ponder_cost - 1) * per_step

    @torch.no_grad()
    def forward_adaptive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each input runs only up to its own halting step N, so the steps after it are never
        computed. Returns ``(logits (N, C), halting_step (N,))``, the same as ``forward`` and
        :attr:`ACTSteps.halting_step`."""
        threshold = 1 - self.eps
        encoded = self.encoder(x)
        state = torch.zeros_like(encoded)
        cumulative = torch.zeros(len(x), device=x.device, dtype=encoded.dtype)
        logits = encoded.new_zeros(len(x), self.classifier.out_features)
        halting_step = torch.full((len(x),), self.max_steps, dtype=torch.int64, device=x.device)
        inside = torch.arange(len(x), device=x.device)
        for step in range(self.max_steps):
            state, step_logits, halting_logit = self.step(encoded, state)
            halting_unit = torch.sigmoid(halting_logit)
            halts = (cumulative + halting_unit >= threshold) | (step == self.max_steps - 1)
            weight = torch.where(halts, 1 - cumulative, halting_unit)  # the remainder R at step N
            logits[inside] += weight[:, None] * step_logits
            halting_step[inside[halts]] = step + 1
            running = ~halts
            inside, encoded, state, cumulative = inside[running], encoded[running], state[running], (cumulative + halting_unit)[running]
            if len(inside) == 0:
                break
        return logits, halting_step


class EarlyExitCNN(AdaptiveComputation):
    """``[Conv3x3 -> ReLU -> MaxPool2]`` per entry of ``channels`` (as :class:`SmallCNN`); after
    each stage a Linear classifier on the globally pooled features, and after each stage but the
    last a learned exit decision lambda_k = sigmoid(Linear(pooled)), the probability of exiting
    there once reached. The exit distribution is PonderNet's (the last stage takes the rest).

    ``forward`` returns :func:`log_mixture` of the exits (every stage runs, as in training);
    :meth:`forward_adaptive` runs each input only up to its exit.

    Args:
        in_channels: channels of the input images (3 for Stroop digits).
        num_classes: size of the output.
        channels: output channels of each stage; needs ``2 ** len(channels)`` input pixels a side.
        threshold: an input exits at the first stage whose lambda_k reaches it, in (0, 1].
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels: Sequence[int] = (16, 32, 64), threshold: float = 0.5) -> None:
        super().__init__()
        if len(channels) < 1:
            raise UserInputError("channels=() must list at least one stage")
        for width in (in_channels, num_classes, *channels):
            check_positive("EarlyExitCNN width", width)
        if not 0.0 < threshold <= 1.0:
            raise UserInputError(f"threshold={threshold!r} must be in (0, 1]")
        self.threshold = threshold
        fan_ins = (in_channels, *channels[:-1])
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(fan_in, fan_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)) for fan_in, fan_out in zip(fan_ins, channels)
        )
        self.classifiers = nn.ModuleList(nn.Linear(width, num_classes) for width in channels)
        self.exit_decisions = nn.ModuleList(nn.Linear(width, 1) for width in channels[:-1])

    def stage(self, index: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stage ``index``: ``(features, logits, exit probability (N,) or None at the last stage)``."""
        features = self.stages[index](features)
        pooled = features.mean(dim=(2, 3))
        exit_probability = torch.sigmoid(self.exit_decisions[index](pooled)).squeeze(-1) if index < len(self.exit_decisions) else None
        return features, self.classifiers[index](pooled), exit_probability

    def forward_steps(self, x: torch.Tensor) -> PonderSteps:
        """Run every stage: per-exit logits, exit probabilities lambda_k and the exit distribution."""
        step_logits, halting_probabilities = [], []
        features = x
        for index in range(len(self.stages)):
            features, logits, exit_probability = self.stage(index, features)
            step_logits.append(logits)
            halting_probabilities.append(torch.ones_like(logits[:, 0]) if exit_probability is None else exit_probability)
        lambdas = torch.stack(halting_probabilities, dim=1)
        return PonderSteps(torch.stack(step_logits, dim=1), ponder_halting_distribution(lambdas), lambdas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mixture(self.remember(self.forward_steps(x), x))

    def step_flops(self, example: torch.Tensor) -> list[int]:
        """Each stage with its classifier and exit decision."""
        flops, features = [], example
        for index in range(len(self.stages)):
            flops.append(count_flops(lambda: self.stage(index, features)))
            features = self.stages[index](features)
        return flops

    @torch.no_grad()
    def forward_adaptive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference that stops early: each input leaves at the first stage whose lambda_k is at
        least ``threshold`` (the last stage otherwise), and later stages run only on the inputs
        still inside. Returns ``(logits (N, C) of each input's exit, exit stage (N,) from 1)``."""
        logits = x.new_empty(len(x), self.classifiers[0].out_features)
        exit_stage = torch.full((len(x),), len(self.stages), dtype=torch.int64, device=x.device)
        inside = torch.arange(len(x), device=x.device)
        features = x
        for index in range(len(self.stages)):
            features, stage_logits, exit_probability = self.stage(index, features)
            exits = torch.ones(len(inside), dtype=torch.bool, device=x.device) if exit_probability is None else exit_probability >= self.threshold
            logits[inside[exits]] = stage_logits[exits]
            exit_stage[inside[exits]] = index + 1
            inside, features = inside[~exits], features[~exits]
            if len(inside) == 0:
                break
        return logits, exit_stage


class HabitualControlledNet(AdaptiveComputation):
    """Two modes of processing (Kamanda's habitual vs controlled): a cheap *habitual* path, a
    one-hidden-layer MLP on the flattened image, runs on every input; a *gate* on its hidden
    features gives g, the probability of engaging the costly *controlled* path, a
    :class:`SmallCNN` on the image, whose prediction then replaces the habitual one.

    It is a two-step halting model: the distribution over (habitual, controlled) is
    (1 - g, g), the ``steps`` measure is 1 + g and the ``flops`` measure
    habitual + g * controlled. Training output is the mixture ``log((1 - w) softmax(habitual)
    + w softmax(controlled))`` with w = g (``gate: soft``, the expected-compute relaxation) or
    w a Bernoulli(g) sample with the straight-through gradient of g (``gate: straight_through``;
    in eval mode w = [g >= threshold]). :meth:`forward_adaptive` runs the controlled path only
    on the inputs whose g reaches ``threshold``.

    With ``distill_weight > 0`` :meth:`regularization` adds ``distill_weight * KD(habitual ||
    controlled)`` (:func:`callbacks.distillation.kd_loss`, the controlled logits detached) to the
    training loss: the habitual path learns from the controlled one.

    Args:
        in_channels: channels of the input images.
        image_size: side of the (square) input images.
        num_classes: size of the output.
        habitual_hidden: width of the habitual MLP.
        controlled_channels: the controlled CNN's stages.
        gate: ``soft`` or ``straight_through``.
        threshold: the hard gate of inference, in (0, 1].
        distill_weight: weight of distilling the habitual path from the controlled one.
        temperature: the distillation temperature.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 8,
        num_classes: int = 10,
        habitual_hidden: int = 32,
        controlled_channels: Sequence[int] = (16, 32, 64),
        gate: Literal["soft", "straight_through"] = "soft",
        threshold: float = 0.5,
        distill_weight: float = 0.0,
        temperature: float = 4.0,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes), ("habitual_hidden", habitual_hidden), ("temperature", temperature)):
            check_positive(name, value)
        check_choice("gate", gate, GATE_MODES)
        if not 0.0 < threshold <= 1.0:
            raise UserInputError(f"threshold={threshold!r} must be in (0, 1]")
        check_positive("distill_weight", distill_weight, allow_zero=True)
        self.gate_mode, self.threshold, self.distill_weight, self.temperature = gate, threshold, distill_weight, temperature
        self.habitual = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, habitual_hidden), nn.ReLU())
        self.habitual_head = nn.Linear(habitual_hidden, num_classes)
        self.gate = nn.Linear(habitual_hidden, 1)
        self.controlled = SmallCNN(in_channels, num_classes, controlled_channels)

    def habitual_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(habitual logits, gate probability g (N,))``."""
        hidden = self.habitual(x)
        return self.habitual_head(hidden), torch.sigmoid(self.gate(hidden)).squeeze(-1)

    def forward_steps(self, x: torch.Tensor) -> PonderSteps:
        """Both paths: logits (N, 2, C) and the distribution (1 - g, g); halting probabilities
        (1 - g, 1)."""
        habitual_logits, gate = self.habitual_step(x)
        step_logits = torch.stack([habitual_logits, self.controlled(x)], dim=1)
        lambdas = torch.stack([1 - gate, torch.ones_like(gate)], dim=1)
        return PonderSteps(step_logits, ponder_halting_distribution(lambdas), lambdas)

    def mixture_weight(self, gate: torch.Tensor) -> torch.Tensor:
        """w of the controlled path in the output (see the class docstring)."""
        if self.gate_mode == "soft":
            return gate
        if not self.training:
            return (gate >= self.threshold).to(gate.dtype)
        hard = torch.bernoulli(gate.detach())
        return hard + gate - gate.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.remember(self.forward_steps(x), x)
        weight = self.mixture_weight(steps.halting_distribution[:, 1])[:, None]
        probabilities = steps.step_logits.softmax(dim=-1)
        mixture = (1 - weight) * probabilities[:, 0] + weight * probabilities[:, 1]
        return mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()

    def regularization(self) -> torch.Tensor:
        """distill_weight * KD of the habitual logits towards the (detached) controlled ones of
        the last training forward; 0 when not distilling."""
        if self.distill_weight == 0 or self.last_steps is None or not self.training:
            return self.gate.bias.new_zeros(())
        habitual_logits, controlled_logits = self.last_steps.step_logits.unbind(dim=1)
        return self.distill_weight * kd_loss(habitual_logits, controlled_logits.detach(), self.temperature)

    def step_flops(self, example: torch.Tensor) -> list[int]:
        """The habitual path with its gate, then the controlled path."""
        return [count_flops(lambda: self.habitual_step(example)), count_flops(lambda: self.controlled(example))]

    @torch.no_grad()
    def forward_adaptive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The habitual path on every input, the controlled path only where g >= ``threshold``.
        Returns ``(logits, path (N,): 1 habitual, 2 controlled)``."""
        logits, gate = self.habitual_step(x)
        controlled = gate >= self.threshold
        if controlled.any():
            logits[controlled] = self.controlled(x[controlled])
        return logits, controlled.long() + 1
