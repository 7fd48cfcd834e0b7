"""Batch-normalised recurrent networks: BN-RNN (Laurent et al. 2016) and BN-LSTM (Cooijmans et
al. 2016)."""

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import check_positive
from framework.models.rnn_base import PlainLSTM, PlainRNN, State, lstm_cell_update


class BNRNN(PlainRNN):
    """BN-RNN (Laurent et al. 2016): ``h_t = tanh(BN(W_x x_t) + W_h h_{t-1})``.

    Only the input-to-hidden term is normalised (the paper found no benefit in normalising the
    recurrent term), with statistics over time and batch ("sequence-wise"): in training the mean and
    variance of each unit are taken over all N * L steps of the batch, in evaluation the running
    averages are used. BN's shift is the only bias.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__(input_size, hidden_size, output_size)
        self.input_to_hidden = nn.Linear(input_size, hidden_size, bias=False)
        self.input_norm = nn.BatchNorm1d(hidden_size)

    def input_terms(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.input_to_hidden(x)
        return self.input_norm(projected.flatten(0, 1)).view_as(projected)


class StepwiseBatchNorm(nn.Module):
    """Batch normalisation with separate statistics for every time step (Cooijmans et al. 2016).

    In training, step t is normalised with the batch statistics of step t, and the population
    (running) statistics of step t are updated if ``t < max_steps``. In evaluation, step t uses
    the population statistics of step ``min(t, max_steps - 1)``: beyond T_max the last step's
    statistics are reused.

    Args:
        num_features: features of the normalised term.
        max_steps: T_max, the number of steps with their own population statistics.
        shift: learn a shift beta (off for the gate terms, which share the LSTM's bias).
        gamma_init: initial scale; 0.1 keeps tanh and sigmoid out of saturation at the start.
        momentum: weight of the new batch statistics in the running averages; ``None``: the
            cumulative average of every batch since :meth:`reset_running_stats`, as in
            ``torch.nn.BatchNorm1d`` (what :func:`callbacks.batchnorm.recompute_population_statistics`
            uses to replace the running averages by exact population statistics).
        eps: added to the variance.
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        shift: bool,
        gamma_init: float = 0.1,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_positive("max_steps", max_steps)
        self.max_steps = max_steps
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.full((num_features,), gamma_init))
        self.bias = nn.Parameter(torch.zeros(num_features)) if shift else None
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features))
        self.register_buffer("running_var", torch.ones(max_steps, num_features))
        # Batches averaged per step when momentum is None; not saved, like the average's progress
        # it only matters while the averages are being (re)computed.
        self.register_buffer("num_batches_tracked", torch.zeros(max_steps, 1, dtype=torch.long), persistent=False)

    def reset_running_stats(self) -> None:
        """Population statistics back to mean 0, variance 1, and the cumulative count to 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Normalise ``x`` (N, F), the term of time step ``t``."""
        if not self.training:
            stored = min(t, self.max_steps - 1)
            return F.batch_norm(x, self.running_mean[stored], self.running_var[stored], self.weight, self.bias, False, 0.0, self.eps)
        if t >= self.max_steps:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # The fused kernel normalises and updates the running statistics of step t in place.
        momentum = self.momentum if self.momentum is not None else float(self._update_weights(t, t + 1))
        return F.batch_norm(x, self.running_mean[t], self.running_var[t], self.weight, self.bias, True, momentum, self.eps)

    def normalise_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, L, F), the terms of steps 0..L-1 at once: the same as calling
        :meth:`forward` at every step, for a term that does not depend on the recurrence."""
        batch, length, features = x.shape
        weight = self.weight.repeat(length)
        bias = None if self.bias is None else self.bias.repeat(length)
        flat = x.reshape(batch, length * features)
        if not self.training:
            steps = torch.arange(length, device=x.device).clamp_max(self.max_steps - 1)
            mean, var = self.running_mean[steps].flatten(), self.running_var[steps].flatten()
            return F.batch_norm(flat, mean, var, weight, bias, False, 0.0, self.eps).view_as(x)
        stored = min(length, self.max_steps)
        with torch.no_grad():
            var, mean = torch.var_mean(x[:, :stored], dim=0)
            update = self._update_weights(0, stored)
            self.running_mean[:stored].lerp_(mean, update)
            self.running_var[:stored].lerp_(var, update)
        return F.batch_norm(flat, None, None, weight, bias, True, 0.0, self.eps).view_as(x)

    def _update_weights(self, first: int, end: int) -> torch.Tensor:
        """The weight of a new batch in the running statistics of steps first..end-1, (steps, 1):
        the momentum, or 1 / (batches so far) for the cumulative average."""
        if self.momentum is not None:
            return self.running_mean.new_full((end - first, 1), self.momentum)
        self.num_batches_tracked[first:end] += 1
        return self.num_batches_tracked[first:end].to(self.running_mean.dtype).reciprocal()


class BNLSTM(PlainLSTM):
    """BN-LSTM (Cooijmans et al. 2016)::

        gates = BN(W_h h_{t-1}; gamma_h) + BN(W_x x_t; gamma_x) + b
        c_t   = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t   = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

    with separate statistics per time step (:class:`StepwiseBatchNorm`), no shift on the two
    gate terms (the shared bias b plays that role) and every gamma initialised to 0.1.

    Args:
        max_steps: T_max, the steps with their own population statistics (the training
            sequence length); longer sequences reuse the last step's in evaluation.
        gamma_init: initial gamma of all three normalisations.
        (the rest as in :class:`RecurrentNetwork`)
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, max_steps: int = 1000, gamma_init: float = 0.1) -> None:
        super().__init__(input_size, hidden_size, output_size)
        # The LSTM's input bias (forget gate at 1) becomes the shared bias b of the gates.
        self.bias = nn.Parameter(self.input_to_hidden.bias.detach().clone())
        self.input_to_hidden = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.input_norm = StepwiseBatchNorm(4 * hidden_size, max_steps, shift=False, gamma_init=gamma_init)
        self.hidden_norm = StepwiseBatchNorm(4 * hidden_size, max_steps, shift=False, gamma_init=gamma_init)
        self.cell_norm = StepwiseBatchNorm(hidden_size, max_steps, shift=True, gamma_init=gamma_init)

    def input_terms(self, x: torch.Tensor) -> torch.Tensor:
        """``BN(W_x x_t) + b`` for every step at once (the input term does not depend on h)."""
        return self.input_norm.normalise_sequence(self.input_to_hidden(x)) + self.bias

    def step(self, input_term: torch.Tensor, state: State, t: int, recurrent_weight: torch.Tensor) -> State:
        hidden, cell = state
        gates = self.hidden_norm(F.linear(hidden, recurrent_weight), t) + input_term
        cell, output_gate = lstm_cell_update(gates, cell)
        return output_gate * torch.tanh(self.cell_norm(cell, t)), cell
