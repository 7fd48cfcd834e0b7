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

    ``window`` holds the last (up to k) hidden states, oldest first, each (N, H), and
    ``window_keys`` their attention keys ``W_k h_i + b_k`` (each state is projected once, when it
    is produced, not at every step it is attended to); ``window_scores`` (N, len(window)) is the
    attention each has accumulated so far. ``relevant`` (N, r, H), ``relevant_keys`` (N, r, H)
    and ``relevant_scores`` (N, r) hold the relevant set, the scores frozen when the states
    entered (``-inf`` marks an empty slot). ``query`` is ``W_q s_t``, the attention query of the
    next step, and ``cell`` the LSTM variant's cell state (None for the RNN)."""

    hidden: torch.Tensor
    cell: torch.Tensor | None
    query: torch.Tensor
    window: tuple[torch.Tensor, ...]
    window_keys: tuple[torch.Tensor, ...]
    window_scores: torch.Tensor
    relevant: torch.Tensor
    relevant_keys: torch.Tensor
    relevant_scores: torch.Tensor


def screen(relevant_scores: torch.Tensor, candidate_score: torch.Tensor) -> torch.Tensor:
    """Relevancy screening: per example, whether the candidate leaving the window replaces each
    of the r slots of the relevant set, a (N, r) mask with at most one True per row: the weakest
    slot (an empty one has score ``-inf``), if the candidate's score beats it. Applied at every
    step, the relevant set holds the r highest-scored states that left the window."""
    weakest_score, weakest_slot = relevant_scores.min(dim=1)
    return F.one_hot(weakest_slot, relevant_scores.shape[1]).bool() & (candidate_score > weakest_score)[:, None]


class RelevancyMemoryRNN(RecurrentNetwork):
    """An RNN that attends to a memory of its past hidden states (Kerg et al. 2020).

    The memory is a short-term window of the last ``window`` hidden states and a relevant set of
    ``relevant_slots`` older ones. At step t, additive attention with the previous step's
    attended state as query, ``e_i = v^T tanh(W_q s_{t-1} + W_k h_i + b_k)`` over the filled
    slots, gives the context ``c_t = sum_i softmax(e)_i h_i``, and the recurrent cell reads
    ``s_t = (h_{t-1} + c_t) / 2`` in place of h_{t-1} (the authors' code; the query is s, not h).
    The attention a state receives while in the window accumulates (detached) into its relevancy
    score; when it leaves the window it replaces the weakest member of the relevant set if its
    score is higher (:func:`screen`). Gradients flow through the stored states, which gives
    skip connections in time, at a memory cost of k + r states. Each state's key is computed
    once, when the state is produced, and screening is a tensor operation over the batch
    (:func:`screen`, :func:`torch.where`), so a step is a fixed number of batched operations.

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
        empty = like.new_zeros(batch_size, self.relevant_slots, self.hidden_size)
        return MemoryState(
            hidden=zeros,
            cell=zeros if self.cell_type == "lstm" else None,
            query=zeros,
            window=(),
            window_keys=(),
            window_scores=like.new_zeros(batch_size, 0),
            relevant=empty,
            relevant_keys=empty,
            relevant_scores=like.new_full((batch_size, self.relevant_slots), float("-inf")),
        )

    def attend(self, state: MemoryState) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive attention of ``state.query`` over the window and the filled relevant slots:
        the context (N, H) and the weights of the window's states (N, len(window))."""
        states = torch.cat([*(h[:, None] for h in state.window), state.relevant], dim=1)
        keys = torch.cat([*(key[:, None] for key in state.window_keys), state.relevant_keys], dim=1)
        logits = self.score(torch.tanh(keys + state.query[:, None])).squeeze(-1)
        scores = torch.cat([state.window_scores, state.relevant_scores], dim=1)
        weights = logits.masked_fill(scores == float("-inf"), float("-inf")).softmax(dim=1)
        return torch.bmm(weights[:, None], states).squeeze(1), weights[:, : len(state.window)]

    def step(self, input_term: torch.Tensor, state: MemoryState, t: int, recurrent_weight: torch.Tensor) -> MemoryState:
        window_scores = state.window_scores
        if not state.window:  # the first step: nothing to remember yet
            mixed = state.hidden / 2
        else:
            context, window_weights = self.attend(state)
            mixed = (state.hidden + context) / 2
            window_scores = window_scores + window_weights.detach()
        pre_activation = input_term + F.linear(mixed, recurrent_weight)
        if self.cell_type == "lstm":
            cell, output_gate = lstm_cell_update(pre_activation, state.cell)
            hidden = output_gate * torch.tanh(cell)
        else:
            cell, hidden = None, torch.tanh(pre_activation)
        window, window_keys = (*state.window, hidden), (*state.window_keys, self.key(hidden))
        window_scores = F.pad(window_scores, (0, 1))
        relevant, relevant_keys, relevant_scores = state.relevant, state.relevant_keys, state.relevant_scores
        if len(window) > self.window_size:  # the oldest state leaves the window: screen it
            replace = screen(relevant_scores, window_scores[:, 0])
            relevant = torch.where(replace[..., None], window[0][:, None], relevant)
            relevant_keys = torch.where(replace[..., None], window_keys[0][:, None], relevant_keys)
            relevant_scores = torch.where(replace, window_scores[:, :1], relevant_scores)
            window, window_keys, window_scores = window[1:], window_keys[1:], window_scores[:, 1:]
        return MemoryState(hidden, cell, self.query(mixed), window, window_keys, window_scores, relevant, relevant_keys, relevant_scores)
