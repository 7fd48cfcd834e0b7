"""The brute-force references agree with autograd on examples one at a time."""

import torch
import torch.nn.functional as F

from framework.models import MLP, SmallCNN
from framework.testing.reference import empirical_ntk, per_example_gradients, per_example_jacobians


def _loop_gradients(model, inputs, targets):
    rows = []
    for x, y in zip(inputs, targets):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_per_example_gradients_match_a_loop():
    torch.manual_seed(0)
    model = SmallCNN(1, 3, channels=(2,)).double()
    inputs, targets = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    expected = _loop_gradients(model, inputs, targets)
    torch.testing.assert_close(per_example_gradients(model, inputs, targets, F.cross_entropy), expected)


def test_jacobian_of_a_linear_model_and_its_ntk():
    torch.manual_seed(0)
    model = MLP(3, 2, hidden=()).double()
    inputs = torch.randn(4, 3, dtype=torch.float64)
    jacobians = per_example_jacobians(model, inputs)
    assert jacobians.shape == (4, 2, 3 * 2 + 2)
    # d f_a / d W_bc = delta_ab x_c; d f_a / d b_b = delta_ab
    expected = torch.cat([torch.einsum("ab,nc->nabc", torch.eye(2, dtype=torch.float64), inputs).reshape(4, 2, 6), torch.eye(2, dtype=torch.float64).expand(4, 2, 2)], dim=2)
    torch.testing.assert_close(jacobians, expected)
    kernel = empirical_ntk(model, inputs)
    torch.testing.assert_close(kernel, (inputs @ inputs.T + 1)[:, :, None, None] * torch.eye(2, dtype=torch.float64))
