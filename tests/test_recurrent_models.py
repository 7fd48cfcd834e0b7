"""Every recurrent model passes the generic architecture check; the plain baselines and the
batch-normalised RNNs (per-step vs sequence-wise statistics, population statistics)."""

import pytest
import torch

from framework.errors import UserInputError
from framework.models.rnn_base import PlainLSTM, PlainRNN
from framework.models.rnn_batchnorm import BNLSTM, BNRNN, StepwiseBatchNorm
from framework.models.rnn_memory import RelevancyMemoryRNN
from framework.models.rnn_nonnormal import NNRNN, OrthogonalRNN
from framework.testing.smoke import check_architecture

INPUTS, HIDDEN, OUTPUTS, BATCH, LENGTH = 3, 8, 5, 4, 9

RECURRENT_MODELS = {
    "plain_rnn": lambda: PlainRNN(INPUTS, HIDDEN, OUTPUTS),
    "plain_lstm": lambda: PlainLSTM(INPUTS, HIDDEN, OUTPUTS),
    "bn_rnn": lambda: BNRNN(INPUTS, HIDDEN, OUTPUTS),
    "bn_lstm": lambda: BNLSTM(INPUTS, HIDDEN, OUTPUTS, max_steps=LENGTH - 3),
    "nnrnn": lambda: NNRNN(INPUTS, HIDDEN, OUTPUTS),
    "nnrnn_linear": lambda: NNRNN(INPUTS, HIDDEN, OUTPUTS, activation="identity"),
    "orthogonal_rnn": lambda: OrthogonalRNN(INPUTS, HIDDEN, OUTPUTS),
    "memory_rnn": lambda: RelevancyMemoryRNN(INPUTS, HIDDEN, OUTPUTS, window=2, relevant_slots=3),
    "memory_lstm": lambda: RelevancyMemoryRNN(INPUTS, HIDDEN, OUTPUTS, window=2, relevant_slots=3, cell="lstm"),
}


@pytest.mark.parametrize("name", RECURRENT_MODELS)
def test_recurrent_architecture_smoke(name, tmp_path):
    check_architecture(RECURRENT_MODELS[name], torch.randn(BATCH, LENGTH, INPUTS), (BATCH, LENGTH, OUTPUTS), tmp_path)


@pytest.mark.parametrize("name", RECURRENT_MODELS)
def test_outputs_are_causal(name):
    """The output at step t depends on the inputs up to t only (in evaluation, where no batch
    statistic couples the steps)."""
    torch.manual_seed(0)
    model = RECURRENT_MODELS[name]().eval()
    x = torch.randn(BATCH, LENGTH, INPUTS)
    changed = x.clone()
    changed[:, 5:] = torch.randn(BATCH, LENGTH - 5, INPUTS)
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_plain_lstm_matches_torch_lstm():
    torch.manual_seed(0)
    model = PlainLSTM(INPUTS, HIDDEN, OUTPUTS)
    reference = torch.nn.LSTM(INPUTS, HIDDEN, batch_first=True)
    # torch orders the gates input, forget, candidate, output; ours forget, input, output, candidate.
    order = torch.cat([torch.arange(HIDDEN) + k * HIDDEN for k in (1, 0, 3, 2)])
    with torch.no_grad():
        reference.weight_ih_l0.copy_(model.input_to_hidden.weight[order])
        reference.bias_ih_l0.copy_(model.input_to_hidden.bias[order])
        reference.weight_hh_l0.copy_(model.hidden_to_hidden.weight[order])
        reference.bias_hh_l0.zero_()
        x = torch.randn(BATCH, LENGTH, INPUTS)
        torch.testing.assert_close(model.hidden_states(x), reference(x)[0])


def test_stepwise_batchnorm_uses_each_steps_batch_statistics_in_training():
    norm = StepwiseBatchNorm(3, max_steps=2, shift=True, momentum=0.5)
    steps = [torch.randn(16, 3) * scale + shift for scale, shift in ((1.0, 0.0), (3.0, 5.0), (0.5, -2.0))]
    for t, x in enumerate(steps):
        y = norm(x, t)
        torch.testing.assert_close(y.mean(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(y.std(dim=0, unbiased=False), torch.full((3,), 0.1), atol=1e-4, rtol=0)
    for t in range(2):  # each stored step averaged its own batch statistics (from 0 and 1)
        torch.testing.assert_close(norm.running_mean[t], 0.5 * steps[t].mean(dim=0))
        torch.testing.assert_close(norm.running_var[t], 0.5 + 0.5 * steps[t].var(dim=0))


def test_stepwise_batchnorm_uses_population_statistics_in_evaluation_and_the_last_beyond_t_max():
    norm = StepwiseBatchNorm(2, max_steps=3, shift=False, gamma_init=1.0, eps=0.0).eval()
    norm.running_mean.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]]))
    norm.running_var.copy_(torch.tensor([[1.0, 1.0], [4.0, 4.0], [0.25, 1.0]]))
    x = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    torch.testing.assert_close(norm(x, 1), torch.tensor([[0.0, -0.5], [1.0, -1.0]]))
    last = torch.tensor([[-4.0, 2.0], [0.0, 1.0]])
    for t in (2, 3, 50):
        torch.testing.assert_close(norm(x, t), last)
    torch.testing.assert_close(norm(x[:1], 50), last[:1])  # independent of the rest of the batch
    assert norm.running_mean[2].tolist() == [3.0, -1.0]  # evaluation never updates the statistics


def test_bn_lstm_layout_and_gamma_initialisation():
    model = BNLSTM(INPUTS, HIDDEN, OUTPUTS, max_steps=7)
    for norm, features in ((model.input_norm, 4 * HIDDEN), (model.hidden_norm, 4 * HIDDEN), (model.cell_norm, HIDDEN)):
        assert torch.equal(norm.weight, torch.full((features,), 0.1))
        assert norm.running_mean.shape == (7, features)
    assert model.input_norm.bias is None and model.hidden_norm.bias is None  # the shared bias b instead
    assert model.cell_norm.bias is not None
    assert model.input_to_hidden.bias is None


def test_bn_lstm_normalises_inputs_per_step_in_training_and_couples_the_batch_only_then():
    torch.manual_seed(0)
    model = BNLSTM(INPUTS, HIDDEN, OUTPUTS, max_steps=LENGTH, gamma_init=0.5)
    x = torch.randn(32, LENGTH, INPUTS) + torch.arange(LENGTH).float()[None, :, None]
    model.input_norm.momentum = 1.0  # the running statistics become the last batch's
    model(x)
    projected = model.input_to_hidden(x)
    torch.testing.assert_close(model.input_norm.running_mean, projected.mean(dim=0))  # one mean per step
    torch.testing.assert_close(model.hidden_norm.running_mean[0], torch.zeros(4 * HIDDEN))  # h_0 = 0
    assert not torch.allclose(model(x)[:2], model(x[:2]))  # training: outputs depend on the batch
    model.eval()
    with torch.no_grad():
        longer = torch.cat([x, x], dim=1)  # beyond T_max: reuses the last step's statistics
        together, single = model(longer), model(longer[:1])
    assert torch.isfinite(together).all()
    torch.testing.assert_close(together[:1], single)


def test_bn_rnn_normalises_the_input_term_over_time_and_batch():
    torch.manual_seed(0)
    model = BNRNN(INPUTS, HIDDEN, OUTPUTS)
    x = torch.randn(16, LENGTH, INPUTS) + torch.arange(LENGTH).float()[None, :, None]
    terms = model.input_terms(x)
    torch.testing.assert_close(terms.mean(dim=(0, 1)), torch.zeros(HIDDEN), atol=1e-5, rtol=0)
    assert terms.mean(dim=0).abs().max() > 0.5  # not per step: the step offsets remain
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:2], model(x[:2]))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: PlainRNN(0, 8, 2), "input_size=0"),
        (lambda: BNLSTM(2, 8, 2, max_steps=0), "max_steps=0"),
        (lambda: NNRNN(2, 7, 2), "hidden_size=7 must be even"),
        (lambda: NNRNN(2, 8, 2, activation="tanh"), "activation='tanh'"),
        (lambda: RelevancyMemoryRNN(2, 8, 2, window=0), "window=0"),
        (lambda: RelevancyMemoryRNN(2, 8, 2, cell="gru"), "cell='gru'"),
    ],
)
def test_bad_recurrent_hyperparameters_are_refused(factory, message):
    with pytest.raises(UserInputError, match=message):
        factory()


def test_wrong_input_width_is_refused():
    with pytest.raises(ValueError, match=r"expected inputs \(N, L, 3\)"):
        PlainRNN(INPUTS, HIDDEN, OUTPUTS)(torch.randn(2, 5, 4))
