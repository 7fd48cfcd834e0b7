"""nnRNN: P stays orthogonal under training, the Schur form sets the spectrum, the orthogonal
RNN preserves the hidden norm, and the regularisation is the paper's."""

import math

import pytest
import torch

from framework.models.rnn_nonnormal import NNRNN, ModReLU, OrthogonalRNN, rotation_blocks


@pytest.fixture
def one_thread():
    """Small matrices: a second intra-op thread only adds synchronisation, which on a busy
    machine makes the matrix exponential's backward many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_basis_stays_orthogonal_after_many_optimizer_steps():
    torch.manual_seed(0)
    model = NNRNN(4, 32, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, target = torch.randn(8, 6, 4), torch.randn(8, 6, 3)
    initial = model.log_basis.detach().clone()
    for _ in range(200):
        optimizer.zero_grad()
        loss = (model(x) - target).square().mean() + model.regularization()
        loss.backward()
        optimizer.step()
    assert (model.log_basis - initial).abs().max() > 0.5  # P really moved
    with torch.no_grad():
        basis = model.orthogonal_basis()
    assert (basis.T @ basis - torch.eye(32)).abs().max() < 1e-5


def test_eigenvalues_are_set_by_lambda_whatever_t():
    torch.manual_seed(0)
    model = NNRNN(2, 6, 1)
    with torch.no_grad():
        model.alphas.copy_(torch.tensor([0.5, 0.9, 1.2]))
        model.upper.normal_()
        weight = model.recurrent_weight().double()
        expected = torch.cat([model.alphas * torch.exp(1j * model.angles), model.alphas * torch.exp(-1j * model.angles)])
    eigenvalues = torch.linalg.eigvals(weight)
    for value in expected.to(torch.complex128):
        assert (eigenvalues - value).abs().min() < 1e-4
    assert (weight @ weight.T - torch.eye(6, dtype=torch.float64)).abs().max() > 0.1  # non-normal, not orthogonal


def test_schur_form_is_lambda_plus_strictly_upper_t():
    model = NNRNN(2, 6, 1)
    with torch.no_grad():
        model.upper.fill_(1.0)
        lam = rotation_blocks(model.alphas, model.angles)
        t = model.schur_form() - lam
    assert torch.equal(t, t.triu(1))
    assert t[0, 1] == t[2, 3] == t[4, 5] == 0  # inside Lambda's 2x2 blocks
    assert t[0, 2] == t[1, 5] == 1


def test_rotation_blocks():
    block = rotation_blocks(torch.tensor([2.0]), torch.tensor([math.pi / 2]))
    torch.testing.assert_close(block, torch.tensor([[0.0, -2.0], [2.0, 0.0]]), atol=1e-6, rtol=0)


def _hidden_norms(model: NNRNN, steps: int) -> torch.Tensor:
    x = torch.zeros(3, steps, 4)
    x[:, 0] = torch.randn(3, 4)  # one input, then the recurrence alone
    with torch.no_grad():
        return model.hidden_states(x).norm(dim=-1)


def test_orthogonal_linear_rnn_preserves_the_hidden_norm():
    torch.manual_seed(0)
    norms = _hidden_norms(OrthogonalRNN(4, 16, 2, activation="identity"), 200)
    torch.testing.assert_close(norms, norms[:, :1].expand_as(norms), rtol=1e-4, atol=0)


def test_nnrnn_with_t_zero_and_alpha_one_preserves_the_hidden_norm():
    """The learnable nnRNN brought back to T = 0, alpha = 1 (after moving both) is orthogonal."""
    torch.manual_seed(0)
    model = NNRNN(4, 16, 2, activation="identity")
    with torch.no_grad():
        model.upper.normal_(std=0.3)
        model.alphas.uniform_(0.5, 1.5)
        model.upper.zero_()
        model.alphas.fill_(1.0)
    model.double()
    x = torch.zeros(3, 200, 4, dtype=torch.float64)
    x[:, 0] = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        norms = model.hidden_states(x).norm(dim=-1)
    torch.testing.assert_close(norms, norms[:, :1].expand_as(norms), rtol=1e-10, atol=0)


def test_non_normal_linear_rnn_does_not_preserve_the_hidden_norm():
    torch.manual_seed(0)
    model = NNRNN(4, 16, 2, activation="identity")
    with torch.no_grad():
        model.upper.normal_(std=0.3)
    norms = _hidden_norms(model, 20)
    assert (norms / norms[:, :1]).sub(1).abs().max() > 0.1


def test_regularization_is_the_alpha_penalty_plus_the_decay_of_t():
    model = NNRNN(2, 4, 1, alpha_penalty=0.5, t_decay=0.25)
    assert model.regularization().item() == 0.0  # alpha = 1 and T = 0 at initialisation
    with torch.no_grad():
        model.alphas.copy_(torch.tensor([1.0, 3.0]))
        model.upper.fill_(2.0)
    assert int(model.upper_mask.sum()) == 4  # 6 entries above the diagonal, 2 of them in Lambda's blocks
    assert model.regularization().item() == 0.5 * 4.0 + 0.25 * 4.0 * 4


def test_orthogonal_rnn_has_no_alpha_or_t_and_an_orthogonal_matrix():
    model = OrthogonalRNN(2, 8, 1)
    names = {name for name, _ in model.named_parameters()}
    assert not any(name in names for name in ("alphas", "upper"))
    assert model.regularization().item() == 0.0
    with torch.no_grad():
        weight = model.recurrent_weight()
    assert (weight.T @ weight - torch.eye(8)).abs().max() < 1e-5


def test_modrelu_keeps_the_sign_and_shifts_the_magnitude():
    activation = ModReLU(3)
    with torch.no_grad():
        activation.bias.copy_(torch.tensor([-0.5, 0.5, -2.0]))
    z = torch.tensor([[-1.0, -1.0, 1.0], [0.2, 0.0, 3.0]])
    torch.testing.assert_close(activation(z), torch.tensor([[-0.5, -1.5, 0.0], [0.0, 0.0, 1.0]]))
