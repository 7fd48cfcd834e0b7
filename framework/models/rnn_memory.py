"""Self-attentive memory RNN with relevancy screening (Kerg et al. 2020)."""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import check_choice, check_positive
from framework.models.rnn_base import RecurrentNetwork, lstm_cell_update

CELLS = ("rnn", "lstm")


class MemoryState(NamedTuple):
    """The state of :class:`RelevancyMemoryRNN` after a step.

    ``window`` holds the last (up to k) hidden states, oldest first, and ``window_scores`` the
    attention each has accumulated so far; ``relevant`` holds r slots and ``relevant_scores``
    their scores, frozen when they entered (``-inf`` marks an empty slot). ``cell`` is the LSTM
    variant's cell state (None for the RNN)."""

    hidden: torch.Tensor
    cell: torch.Tensor | None
    window: torch.Tensor
    window_scores: torch.Tensor
    relevant: torch.Tensor
    relevant_scores: torch.Tensor


def screen(relevant: torch.Tensor, scores: torch.Tensor, candidate: torch.Tensor, candidate_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevancy screening: per example, ``candidate`` (N, H) replaces the weakest of the r
    slots ``relevant`` (N, r, H) if its score beats the weakest score (an empty slot has
    ``-inf``). So the slots always hold the r highest-scored candidates seen. Out of place,
    so gradients still flow to the stored states."""
    weakest_score, weakest_slot = scores.min(dim=1)
    replace = F.one_hot(weakest_slot, scores.shape[1]).bool() & (candidate_score > weakest_score)[:, None]
    relevant = torch.where(replace[..., None], candidate[:, None], relevant)
    return relevant, torch.where(replace, candidate_score[:, None], scores)


class RelevancyMemoryRNN(RecurrentNetwork):
    """An RNN that attends to a memory of its past hidden states (Kerg et al. 2020).

    The memory is a short-term window of the last ``window`` hidden states and a relevant set of
    ``relevant_slots`` older ones. At step t, additive attention with query h_{t-1},
    ``e_i = v^T tanh(W_q h_{t-1} + W_k m_i)``, gives the context c_t over the whole memory, and
    the recurrent cell reads ``s_t = (h_{t-1} + c_t) / 2`` in place of h_{t-1}. The attention a
    state receives while in the window accumulates (detached) into its relevancy score; when it
    leaves the window it enters the relevant set if its score beats the weakest member's
    (:func:`screen`). Gradients flow through the stored states, which gives long skip
    connections in time at a memory cost of k + r states.

    Args:
        window: k, the short-term window.
        relevant_slots: r, the size of the relevant set.
        cell: ``rnn`` (``h_t = tanh(W s_t + U x_t + b)``) or ``lstm`` (an LSTM reading s_t as its
            previous hidden state).
        (the rest as in :class:`RecurrentNetwork`)
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, window: int = 10, relevant_slots: int = 5, cell: str = "rnn") -> None:
        check_choice("cell", cell, CELLS)
        super().__init__(input_size, hidden_size, output_size, gate_blocks=4 if cell == "lstm" else 1)
        check_positive("window", window)
        check_positive("relevant_slots", relevant_slots)
        self.window_size = window
        self.relevant_slots = relevant_slots
        self.cell_type = cell
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.score = nn.Linear(hidden_size, 1, bias=False)

    def initial_state(self, batch_size: int, like: torch.Tensor) -> MemoryState:
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return MemoryState(
            hidden=zeros,
            cell=zeros if self.cell_type == "lstm" else None,
            window=like.new_zeros(batch_size, 0, self.hidden_size),
            window_scores=like.new_zeros(batch_size, 0),
            relevant=like.new_zeros(batch_size, self.relevant_slots, self.hidden_size),
            relevant_scores=like.new_full((batch_size, self.relevant_slots), float("-inf")),
        )

    def attend(self, query: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive attention of ``query`` (N, H) over the window and the filled relevant slots:
        the context (N, H) and the weights of the window's entries (N, k)."""
        if state.window.shape[1] == 0:  # the first step: nothing to remember yet
            return torch.zeros_like(query), state.window_scores
        memory = torch.cat([state.window, state.relevant], dim=1)
        logits = self.score(torch.tanh(self.query(query)[:, None] + self.key(memory))).squeeze(-1)
        filled = torch.cat([torch.ones_like(state.window_scores, dtype=torch.bool), state.relevant_scores > float("-inf")], dim=1)
        weights = logits.masked_fill(~filled, float("-inf")).softmax(dim=1)
        context = (weights[..., None] * memory).sum(dim=1)
        return context, weights[:, : state.window.shape[1]]

    def step(self, input_term: torch.Tensor, state: MemoryState, t: int, recurrent_weight: torch.Tensor) -> MemoryState:
        context, window_weights = self.attend(state.hidden, state)
        mixed = (state.hidden + context) / 2
        pre_activation = input_term + F.linear(mixed, recurrent_weight)
        if self.cell_type == "lstm":
            cell, output_gate = lstm_cell_update(pre_activation, state.cell)
            hidden = output_gate * torch.tanh(cell)
        else:
            cell, hidden = None, torch.tanh(pre_activation)
        window = torch.cat([state.window, hidden[:, None]], dim=1)
        window_scores = torch.cat([state.window_scores + window_weights.detach(), hidden.new_zeros(hidden.shape[0], 1)], dim=1)
        relevant, relevant_scores = state.relevant, state.relevant_scores
        if window.shape[1] > self.window_size:
            relevant, relevant_scores = screen(relevant, relevant_scores, window[:, 0], window_scores[:, 0])
            window, window_scores = window[:, 1:], window_scores[:, 1:]
        return MemoryState(hidden, cell, window, window_scores, relevant, relevant_scores)
