"""Relevancy screening: the relevant set never exceeds r and always holds the highest-scored
states that left the short-term window."""

import pytest
import torch

from framework.models import rnn_memory
from framework.models.rnn_memory import RelevancyMemoryRNN, screen


def test_screen_keeps_the_r_highest_scores_seen():
    torch.manual_seed(0)
    batch, slots, width = 5, 3, 4
    relevant = torch.zeros(batch, slots, width)
    scores = torch.full((batch, slots), float("-inf"))
    seen_scores, seen_states = [], []
    for _ in range(20):
        candidate, candidate_score = torch.randn(batch, width), torch.rand(batch)
        seen_states.append(candidate), seen_scores.append(candidate_score)
        relevant, scores = screen(relevant, scores, candidate, candidate_score)
        all_scores = torch.stack(seen_scores, dim=1)
        kept = min(slots, all_scores.shape[1])
        best = all_scores.topk(kept, dim=1)
        assert torch.equal(scores.sort(dim=1, descending=True).values[:, :kept], best.values)
        assert (scores > float("-inf")).sum(dim=1).eq(kept).all()
        all_states = torch.stack(seen_states, dim=1)
        for row in range(batch):  # each slot holds the state that came with its score
            for slot in range(slots):
                if scores[row, slot] > float("-inf"):
                    origin = (all_scores[row] == scores[row, slot]).nonzero()[0, 0]
                    assert torch.equal(relevant[row, slot], all_states[row, origin])


def test_screen_refuses_a_candidate_no_better_than_the_weakest():
    relevant, scores = torch.ones(1, 2, 3), torch.tensor([[0.5, 0.2]])
    kept, kept_scores = screen(relevant, scores, torch.zeros(1, 3), torch.tensor([0.2]))
    assert torch.equal(kept, relevant) and torch.equal(kept_scores, scores)
    replaced, new_scores = screen(relevant, scores, torch.zeros(1, 3), torch.tensor([0.3]))
    assert torch.equal(new_scores, torch.tensor([[0.5, 0.3]])) and replaced[0, 1].abs().sum() == 0


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_model_screens_the_states_leaving_the_window(cell, monkeypatch):
    torch.manual_seed(0)
    window, slots, length = 3, 4, 25
    model = RelevancyMemoryRNN(2, 6, 1, window=window, relevant_slots=slots, cell=cell)
    left: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording_screen(relevant, scores, candidate, candidate_score):
        left.append((candidate, candidate_score))
        return screen(relevant, scores, candidate, candidate_score)

    monkeypatch.setattr(rnn_memory, "screen", recording_screen)
    x = torch.randn(5, length, 2)
    inputs, weight = model.input_terms(x), model.recurrent_weight()
    state = model.initial_state(5, inputs)
    hidden = []
    for t in range(length):
        state = model.step(inputs[:, t], state, t, weight)
        hidden.append(state.hidden)
        assert state.window.shape[1] == min(t + 1, window)
        assert not state.window_scores.requires_grad
        filled = (state.relevant_scores > float("-inf")).sum(dim=1)
        assert filled.le(slots).all() and filled.eq(min(slots, len(left))).all()
        if left:
            candidate, candidate_score = left[-1]
            assert torch.equal(candidate, hidden[t - window])  # the oldest state of the window
            assert (candidate_score > 0).all()  # it received attention while in the window
            all_scores = torch.stack([score for _, score in left], dim=1)
            best = all_scores.topk(min(slots, len(left)), dim=1).values
            assert torch.equal(state.relevant_scores.sort(dim=1, descending=True).values[:, : best.shape[1]], best)
    assert len(left) == length - window


def test_gradients_reach_a_state_through_the_relevant_set():
    """The last output depends on an early hidden state through the memory: with attention,
    the gradient reaching h_1 is larger than through the recurrence alone."""
    torch.manual_seed(0)
    model = RelevancyMemoryRNN(2, 6, 1, window=2, relevant_slots=30)
    x = torch.randn(1, 30, 2)
    inputs, weight = model.input_terms(x), model.recurrent_weight()
    state = model.initial_state(1, inputs)
    first = None
    for t in range(30):
        state = model.step(inputs[:, t], state, t, weight)
        if t == 0:
            first = state.hidden
            first.retain_grad()
    assert torch.equal(state.relevant[0, 0], first[0])  # still in memory after 29 steps
    model.readout(state.hidden).sum().backward()
    assert first.grad.abs().sum() > 0
