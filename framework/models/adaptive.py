"""Networks that choose per input how much computation to spend.

An iterated block (a GRU cell fed the encoded input at every step) emits a prediction and a
halting probability after each step. PonderNet (Banino et al. 2021) turns the halting
probabilities into a distribution over the step at which to stop and regularises it towards a
geometric prior; ACT (Graves 2016) stops once the halting units add up to ``1 - eps`` and charges
a ponder cost ``N + R``. The early-exit CNN has a classifier and a learned exit decision after
each convolutional stage, its exits weighted like PonderNet's steps.

Training runs every input through all steps (stages) and weights each by its halting
probability, so ``forward`` returns (N, C) logits and trains with :class:`ClassificationTask`
unchanged; the per-step details come from ``forward_steps``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import UserInputError, check_positive


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


class IteratedBlock(nn.Module):
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

    def run_steps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run all ``max_steps`` steps: ``(step_logits (N, max_steps, C), halting_logits (N, max_steps))``."""
        encoded = self.encoder(x)
        state = torch.zeros_like(encoded)
        step_logits, halting_logits = [], []
        for _ in range(self.max_steps):
            state = self.cell(encoded, state)
            step_logits.append(self.classifier(state))
            halting_logits.append(self.halting(state).squeeze(-1))
        return torch.stack(step_logits, dim=1), torch.stack(halting_logits, dim=1)


class PonderNet(IteratedBlock):
    """PonderNet (Banino et al. 2021): the halting distribution p_n over ``max_steps`` steps.

    ``forward`` returns :func:`log_mixture` of the steps. PonderNet's own loss is
    :meth:`expected_loss` + beta * :meth:`kl_to_prior`.

    Args:
        prior_halt: lambda_p, the halting probability of the geometric prior, in (0, 1).
        (the rest as in :class:`IteratedBlock`)
    """

    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 64, max_steps: int = 10, prior_halt: float = 0.2) -> None:
        super().__init__(in_features, num_classes, hidden, max_steps)
        if not 0.0 < prior_halt < 1.0:
            raise UserInputError(f"prior_halt={prior_halt!r} must be in (0, 1)")
        self.prior_halt = prior_halt
        self.register_buffer("prior", geometric_prior(prior_halt, max_steps), persistent=False)

    def forward_steps(self, x: torch.Tensor) -> PonderSteps:
        """Run all steps: per-step logits, halting probabilities lambda_n and distribution p_n."""
        step_logits, halting_logits = self.run_steps(x)
        halting_probabilities = torch.sigmoid(halting_logits)
        return PonderSteps(step_logits, ponder_halting_distribution(halting_probabilities), halting_probabilities)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mixture(self.forward_steps(x))

    def expected_loss(self, steps: PonderSteps, targets: torch.Tensor) -> torch.Tensor:
        """PonderNet's reconstruction term: sum_n p_n * cross-entropy(y_n, target), batch mean."""
        per_step = F.cross_entropy(steps.step_logits.transpose(1, 2), targets[:, None].expand(-1, self.max_steps), reduction="none")
        return (steps.halting_distribution * per_step).sum(dim=1).mean()

    def kl_to_prior(self, steps: PonderSteps) -> torch.Tensor:
        """PonderNet's regulariser: KL(p || truncated geometric(prior_halt)), batch mean."""
        return kl_divergence(steps.halting_distribution, self.prior).mean()


class AdaptiveComputationTime(IteratedBlock):
    """ACT (Graves 2016): sigmoid halting units h_n; computation stops at the first step N at
    which sum_{n<=N} h_n >= 1 - ``eps``, with the remainder R = 1 - sum_{n<N} h_n as the last
    weight. ``forward`` returns the weighted mean of the step logits, sum_n p_n y_n (running all
    ``max_steps`` steps, as in training); the ponder cost N + R is in :meth:`forward_steps`'s
    :attr:`ACTSteps.ponder_cost`; :meth:`forward_halting` runs each input only up to its N.

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
        steps = self.forward_steps(x)
        return (steps.halting_distribution[..., None] * steps.step_logits).sum(dim=1)

    @torch.no_grad()
    def forward_halting(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference that stops: each input runs only up to its own halting step N, so the
        steps after it are never computed. Returns ``(logits (N, C), halting_step (N,))``, the
        same as ``forward`` and :attr:`ACTSteps.halting_step`."""
        threshold = 1 - self.eps
        encoded = self.encoder(x)
        state = torch.zeros_like(encoded)
        cumulative = torch.zeros(len(x), device=x.device, dtype=encoded.dtype)
        logits = encoded.new_zeros(len(x), self.classifier.out_features)
        halting_step = torch.full((len(x),), self.max_steps, dtype=torch.int64, device=x.device)
        inside = torch.arange(len(x), device=x.device)
        for step in range(self.max_steps):
            state = self.cell(encoded, state)
            halting_unit = torch.sigmoid(self.halting(state)).squeeze(-1)
            halts = (cumulative + halting_unit >= threshold) | (step == self.max_steps - 1)
            weight = torch.where(halts, 1 - cumulative, halting_unit)  # the remainder R at step N
            logits[inside] += weight[:, None] * self.classifier(state)
            halting_step[inside[halts]] = step + 1
            running = ~halts
            inside, encoded, state, cumulative = inside[running], encoded[running], state[running], (cumulative + halting_unit)[running]
            if len(inside) == 0:
                break
        return logits, halting_step


class EarlyExitCNN(nn.Module):
    """``[Conv3x3 -> ReLU -> MaxPool2]`` per entry of ``channels`` (as :class:`SmallCNN`); after
    each stage a Linear classifier on the globally pooled features, and after each stage but the
    last a learned exit decision lambda_k = sigmoid(Linear(pooled)), the probability of exiting
    there once reached. The exit distribution is PonderNet's (the last stage takes the rest).

    ``forward`` returns :func:`log_mixture` of the exits (every stage runs, as in training);
    :meth:`forward_early_exit` runs each input only up to its exit.

    Args:
        in_channels: channels of the input images (3 for Stroop digits).
        num_classes: size of the output.
        channels: output channels of each stage; needs ``2 ** len(channels)`` input pixels a side.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if len(channels) < 1:
            raise UserInputError("channels=() must list at least one stage")
        for width in (in_channels, num_classes, *channels):
            check_positive("EarlyExitCNN width", width)
        fan_ins = (in_channels, *channels[:-1])
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(fan_in, fan_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)) for fan_in, fan_out in zip(fan_ins, channels)
        )
        self.classifiers = nn.ModuleList(nn.Linear(width, num_classes) for width in channels)
        self.exit_decisions = nn.ModuleList(nn.Linear(width, 1) for width in channels[:-1])

    def forward_steps(self, x: torch.Tensor) -> PonderSteps:
        """Run every stage: per-exit logits, exit probabilities lambda_k and the exit distribution."""
        step_logits, halting_probabilities = [], []
        features = x
        for index, stage in enumerate(self.stages):
            features = stage(features)
            pooled = features.mean(dim=(2, 3))
            step_logits.append(self.classifiers[index](pooled))
            if index < len(self.exit_decisions):
                halting_probabilities.append(torch.sigmoid(self.exit_decisions[index](pooled)).squeeze(-1))
        halting_probabilities.append(torch.ones_like(step_logits[0][:, 0]))
        lambdas = torch.stack(halting_probabilities, dim=1)
        return PonderSteps(torch.stack(step_logits, dim=1), ponder_halting_distribution(lambdas), lambdas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mixture(self.forward_steps(x))

    @torch.no_grad()
    def forward_early_exit(self, x: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference that stops early: each input leaves at the first stage whose lambda_k is at
        least ``threshold`` (the last stage otherwise), and later stages run only on the inputs
        still inside. Returns ``(logits (N, C) of each input's exit, exit stage (N,) from 1)``."""
        num_classes = self.classifiers[0].out_features
        logits = x.new_empty(len(x), num_classes)
        exit_stage = torch.full((len(x),), len(self.stages), dtype=torch.int64, device=x.device)
        inside = torch.arange(len(x), device=x.device)
        features = x
        for index, stage in enumerate(self.stages):
            features = stage(features)
            pooled = features.mean(dim=(2, 3))
            if index < len(self.exit_decisions):
                exits = torch.sigmoid(self.exit_decisions[index](pooled)).squeeze(-1) >= threshold
            else:
                exits = torch.ones(len(inside), dtype=torch.bool, device=x.device)
            logits[inside[exits]] = self.classifiers[index](pooled[exits])
            exit_stage[inside[exits]] = index + 1
            inside, features = inside[~exits], features[~exits]
            if len(inside) == 0:
                break
        return logits, exit_stage
