"""Recurrent networks for per-step sequence tasks, and the plain RNN and LSTM baselines.

Every recurrent model here maps inputs (N, L, D) to outputs (N, L, C) with a Linear readout of
the hidden state at every step, as :class:`~framework.tasks.SequenceTask` expects. The cells
are written out (not ``torch.nn.RNN``/``LSTM``) so that the variants share one loop, and so
that the hidden states and the recurrent matrix are reachable for analysis
(:meth:`RecurrentNetwork.hidden_states`, :meth:`RecurrentNetwork.recurrent_weight`), and so
that analysis code can keep the per-step hidden states of an ordinary forward pass as nodes of
its autograd graph (:meth:`RecurrentNetwork.recording_hidden_states`), e.g. to measure how the
gradient of the loss with respect to h_t decays with the distance to the loss.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import check_positive

State = tuple[torch.Tensor | None, ...]
"""A cell's state; its first entry is always the hidden state h_t (N, H)."""


class RecurrentNetwork(nn.Module):
    """Base of the recurrent models: runs :meth:`step` over the sequence and reads out h_t.

    By default the step reads the affine input map ``input_to_hidden`` (``W_x x + b``, applied
    to all steps at once by :meth:`input_terms`) and the matrix of ``hidden_to_hidden``
    (``W_h``, returned once per sequence by :meth:`recurrent_weight`, so that a parametrised
    matrix such as nnRNN's is not rebuilt at every step). Subclasses define :meth:`step` and,
    if their state is not just h, :meth:`initial_state`.

    Args:
        input_size: D, features per step.
        hidden_size: H, size of the hidden state.
        output_size: C, outputs per step (classes, or 1 for regression).
        gate_blocks: the number of H-sized row blocks of ``input_to_hidden`` and
            ``hidden_to_hidden``: 1 for an RNN, 4 for an LSTM (forget, input, output,
            candidate; the forget-gate bias starts at 1). Each block of W_h starts orthogonal.
            ``None`` for a model that builds its own maps.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, gate_blocks: int | None = 1) -> None:
        super().__init__()
        for name, size in (("input_size", input_size), ("hidden_size", hidden_size), ("output_size", output_size)):
            check_positive(name, size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.readout = nn.Linear(hidden_size, output_size)
        if gate_blocks is not None:
            self.input_to_hidden = nn.Linear(input_size, gate_blocks * hidden_size)
            self.hidden_to_hidden = nn.Linear(hidden_size, gate_blocks * hidden_size, bias=False)
            with torch.no_grad():
                for block in self.hidden_to_hidden.weight.chunk(gate_blocks, dim=0):
                    nn.init.orthogonal_(block)
                if gate_blocks == 4:
                    self.input_to_hidden.bias.zero_()
                    self.input_to_hidden.bias[:hidden_size].fill_(1.0)
        self._hidden_record: list[torch.Tensor] | None = None

    @contextmanager
    def recording_hidden_states(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, every forward pass appends its hidden states h_1, ..., h_L (each
        (N, H)) to the yielded list, as the very tensors the next steps read: so
        ``torch.autograd.grad(loss, record)`` gives the total derivatives dL/dh_t, through the
        readout of step t and through every later step. Each block gets a new list; nothing is
        recorded outside a block."""
        record: list[torch.Tensor] = []
        self._hidden_record = record
        try:
            yield record
        finally:
            self._hidden_record = None

    def input_terms(self, x: torch.Tensor) -> torch.Tensor:
        """The input-dependent part of every step, (N, L, *), computed in one batched call."""
        return self.input_to_hidden(x)

    def recurrent_weight(self) -> torch.Tensor:
        """The hidden-to-hidden matrix (rows: pre-activations, columns: h_{t-1})."""
        return self.hidden_to_hidden.weight

    def initial_state(self, batch_size: int, like: torch.Tensor) -> State:
        """The state before the first step: zeros with the dtype and device of ``like``."""
        return (like.new_zeros(batch_size, self.hidden_size),)

    def step(self, input_term: torch.Tensor, state: State, t: int, recurrent_weight: torch.Tensor) -> State:
        """One time step: the state after step ``t`` given its input term (N, *)."""
        raise NotImplementedError

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden states h_1..h_L, (N, L, H), for inputs (N, L, D)."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"expected inputs (N, L, {self.input_size}), got {tuple(x.shape)}")
        inputs = self.input_terms(x)
        weight = self.recurrent_weight()
        state = self.initial_state(x.shape[0], inputs)
        hidden = []
        # unbind, not inputs[:, t]: the backward of L selects would zero-fill and add an
        # (N, L, *) gradient per step (quadratic in L); unbind's stacks the L gradients once.
        for t, input_term in enumerate(inputs.unbind(dim=1)):
            state = self.step(input_term, state, t, weight)
            hidden.append(state[0])
        if self._hidden_record is not None:
            self._hidden_record.extend(hidden)
        return torch.stack(hidden, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden_states(x))


def lstm_cell_update(gates: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the gate pre-activations (N, 4H), ordered forget, input, output, candidate, return
    the new cell state and the output gate; the caller forms h = o * tanh(cell) (BN-LSTM
    normalises the cell first)."""
    forget, write, output, candidate = gates.chunk(4, dim=-1)
    cell = torch.sigmoid(forget) * cell + torch.sigmoid(write) * torch.tanh(candidate)
    return cell, torch.sigmoid(output)


class PlainRNN(RecurrentNetwork):
    """The Elman RNN, ``h_t = tanh(W_x x_t + W_h h_{t-1} + b)``, W_h initialised orthogonal."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__(input_size, hidden_size, output_size, gate_blocks=1)

    def step(self, input_term: torch.Tensor, state: State, t: int, recurrent_weight: torch.Tensor) -> State:
        return (torch.tanh(input_term + F.linear(state[0], recurrent_weight)),)


class PlainLSTM(RecurrentNetwork):
    """The LSTM (Hochreiter & Schmidhuber 1997, with a forget gate), each gate's block of W_h
    initialised orthogonal and the forget-gate bias initialised to 1. State ``(h, c)``."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__(input_size, hidden_size, output_size, gate_blocks=4)

    def initial_state(self, batch_size: int, like: torch.Tensor) -> State:
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return zeros, zeros

    def step(self, input_term: torch.Tensor, state: State, t: int, recurrent_weight: torch.Tensor) -> State:
        hidden, cell = state
        cell, output_gate = lstm_cell_update(input_term + F.linear(hidden, recurrent_weight), cell)
        return output_gate * torch.tanh(cell), cell
