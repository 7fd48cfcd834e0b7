"""The memory RNN with relevancy screening: it equals a direct per-example transcription of
Kerg et al. 2020 (lists of states, the authors' screening rule), outputs and gradients; the
relevant set never exceeds r and always holds the highest-scored states that left the
short-term window; gradients flow through the stored states."""

import pytest
import torch

from framework.models import rnn_memory
from framework.models.rnn_base import lstm_cell_update
from framework.models.rnn_memory import RelevancyMemoryRNN, screen


def reference_outputs(model: RelevancyMemoryRNN, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs (N, L, C) computed one example and one step at a time with Python
    lists, as in the authors' code: attention of W_q s_{t-1} over the window and the relevant
    set, s_t = (h_{t-1} + c_t) / 2, scores = detached attention accumulated in the window, a
    state leaving the window takes the place of the weakest relevant state if it scores higher
    (an empty slot is taken unconditionally)."""
    hidden_size, outputs = model.hidden_size, []
    for example in x:
        h, cell, previous_mixed = (example.new_zeros(hidden_size) for _ in range(3))
        window: list[list] = []  # [state, score], oldest first
        relevant: list[list] = []
        per_step = []
        for x_t in example:
            mixed = h / 2
            if window:
                memory = torch.stack([state for state, _ in window + relevant])
                logits = model.score(torch.tanh(model.key(memory) + model.query(previous_mixed))).squeeze(-1)
                weights = logits.softmax(dim=0)
                for entry, weight in zip(window, weights):
                    entry[1] += weight.item()
                mixed = (h + weights @ memory) / 2
            pre_activation = model.input_to_hidden(x_t) + model.hidden_to_hidden(mixed)
            if model.cell_type == "lstm":
                cell, output_gate = lstm_cell_update(pre_activation, cell)
                h = output_gate * torch.tanh(cell)
            else:
                h = torch.tanh(pre_activation)
            window.append([h, 0.0])
            if len(window) > model.window_size:
                candidate = window.pop(0)
                if len(relevant) < model.relevant_slots:
                    relevant.append(candidate)
                else:
                    weakest = min(range(len(relevant)), key=lambda i: relevant[i][1])
                    if candidate[1] > relevant[weakest][1]:
                        relevant[weakest] = candidate
            previous_mixed = mixed
            per_step.append(model.readout(h))
        outputs.append(torch.stack(per_step))
    return torch.stack(outputs)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_model_equals_the_per_example_reference_with_gradients(cell):
    torch.manual_seed(0)
    model = RelevancyMemoryRNN(3, 6, 2, window=3, relevant_slots=4, cell=cell).double()
    with torch.no_grad():  # sharper attention than at initialisation, so screening matters
        model.score.weight.mul_(4.0)
    x = torch.randn(3, 25, 3, dtype=torch.float64, requires_grad=True)
    outputs, expected = model(x), reference_outputs(model, x)
    torch.testing.assert_close(outputs, expected, rtol=1e-10, atol=1e-12)
    targets = [x, *model.parameters()]
    weights = torch.randn_like(outputs)
    gradients = torch.autograd.grad((outputs * weights).sum(), targets)
    expected_gradients = torch.autograd.grad((expected * weights).sum(), targets)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-12)


def test_screen_keeps_the_r_highest_scores_seen():
    torch.manual_seed(0)
    batch, slots, width = 5, 3, 4
    relevant = torch.zeros(batch, slots, width)
    scores = torch.full((batch, slots), float("-inf"))
    seen_scores, seen_states = [], []
    for _ in range(20):
        candidate, candidate_score = torch.randn(batch, width), torch.rand(batch)
        seen_states.append(candidate), seen_scores.append(candidate_score)
        replace = screen(scores, candidate_score)
        assert replace.sum(dim=1).le(1).all()
        relevant = torch.where(replace[..., None], candidate[:, None], relevant)
        scores = torch.where(replace, candidate_score[:, None], scores)
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
    scores = torch.tensor([[0.5, 0.2], [0.5, 0.2], [float("-inf"), 0.2]])
    replace = screen(scores, torch.tensor([0.2, 0.3, 0.0]))
    assert replace.tolist() == [[False, False], [False, True], [True, False]]


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_model_screens_the_states_leaving_the_window(cell, monkeypatch):
    torch.manual_seed(0)
    window, slots, length = 3, 4, 25
    model = RelevancyMemoryRNN(2, 6, 1, window=window, relevant_slots=slots, cell=cell)
    screened: list[torch.Tensor] = []

    def recording_screen(relevant_scores, candidate_score):
        screened.append(candidate_score)
        return screen(relevant_scores, candidate_score)

    monkeypatch.setattr(rnn_memory, "screen", recording_screen)
    x = torch.randn(5, length, 2)
    inputs, weight = model.input_terms(x), model.recurrent_weight()
    state = model.initial_state(5, inputs)
    hidden = []
    for t in range(length):
        state = model.step(inputs[:, t], state, t, weight)
        hidden.append(state.hidden)
        assert len(state.window) == state.window_scores.shape[1] == min(t + 1, window)
        assert all(torch.equal(stored, h) for stored, h in zip(state.window, hidden[-window:]))
        assert not state.window_scores.requires_grad and not state.relevant_scores.requires_grad
        filled = (state.relevant_scores > float("-inf")).sum(dim=1)
        assert filled.le(slots).all() and filled.eq(min(slots, len(screened))).all()
        assert len(screened) == max(0, t + 1 - window)
        if screened:
            assert (screened[-1] > 0).all()  # h_{t-k} received attention while in the window
            all_scores = torch.stack(screened, dim=1)
            best = all_scores.topk(min(slots, len(screened)), dim=1).values
            assert torch.equal(state.relevant_scores.sort(dim=1, descending=True).values[:, : best.shape[1]], best)
            for row in range(5):  # each relevant state is the one that left the window with its score
                for slot in range(slots):
                    if state.relevant_scores[row, slot] > float("-inf"):
                        origin = (all_scores[row] == state.relevant_scores[row, slot]).nonzero()[0, 0]
                        assert torch.equal(state.relevant[row, slot], hidden[origin][row])
                        torch.testing.assert_close(state.relevant_keys[row, slot], model.key(hidden[origin][row]))


def test_gradients_flow_through_the_relevant_set():
    """h_1 stays in the relevant set; the gradient of the last output with respect to it changes
    when the stored states are detached, so part of it flows through the memory."""
    torch.manual_seed(0)
    model = RelevancyMemoryRNN(2, 6, 1, window=2, relevant_slots=30).double()
    x = torch.randn(1, 30, 2, dtype=torch.float64)

    def gradient_at_first_state(detach_memory: bool) -> torch.Tensor:
        inputs, weight = model.input_terms(x), model.recurrent_weight()
        state = model.initial_state(1, inputs)
        for t in range(30):
            state = model.step(inputs[:, t], state, t, weight)
            if t == 0:
                first = state.hidden
            if detach_memory:
                state = state._replace(relevant=state.relevant.detach(), relevant_keys=state.relevant_keys.detach())
        assert torch.equal(state.relevant[0, 0], first[0])  # still in memory after 29 steps
        return torch.autograd.grad(model.readout(state.hidden).sum(), first)[0]

    through_memory, recurrence_only = gradient_at_first_state(False), gradient_at_first_state(True)
    assert (through_memory - recurrence_only).abs().max() > 1e-3 * through_memory.abs().max()
