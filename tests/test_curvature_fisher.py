"""Fisher construction (callbacks.curvature) against brute-force per-example gradients from
framework.testing.reference, in float64 on tiny models: types, capture, layers, side effects."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.curvature import LayerCapture, ParameterLayout, builder, fisher, output_gradient_draws
from callbacks.curvature.layers import channel_major_index
from framework.errors import UserInputError
from framework.models import MLP, SmallCNN
from framework.testing.reference import per_example_gradients, per_example_jacobians

DOUBLE = torch.float64


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log of a unit Gaussian up to a constant."""
    return 0.5 * (output - target).square().sum()


def reference_fisher(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, fisher_type: str, task: str) -> torch.Tensor:
    """The dense Fisher from materialised per-example gradients ("exact" or "empirical")."""
    n = inputs.shape[0]
    if task == "regression" and fisher_type == "exact":
        jacobians = per_example_jacobians(model, inputs)
        return torch.einsum("nop,noq->pq", jacobians, jacobians) / n
    loss = squared_error if task == "regression" else F.cross_entropy
    if fisher_type == "empirical":
        gradients = per_example_gradients(model, inputs, targets, loss)
        return gradients.T @ gradients / n
    probabilities = model(inputs).softmax(dim=1).detach()
    total = 0
    for c in range(probabilities.shape[1]):
        gradients = per_example_gradients(model, inputs, torch.full((n,), c), loss)
        total = total + gradients.T @ (probabilities[:, c, None] * gradients)
    return total / n


def classification_task(seed: int = 0, n: int = 7) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return MLP(3, 3, hidden=(4,), activation="tanh").double(), torch.randn(n, 3, dtype=DOUBLE), torch.randint(0, 3, (n,))


def regression_task(seed: int = 0, n: int = 7) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return MLP(3, 2, hidden=(4,), activation="tanh").double(), torch.randn(n, 3, dtype=DOUBLE), torch.randn(n, 2, dtype=DOUBLE)


def conv_task(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return SmallCNN(1, 3, channels=(2,)).double(), torch.randn(5, 1, 4, 4, dtype=DOUBLE), torch.randint(0, 3, (5,))


def weight_sharing_task(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A dilated "same" Conv2d without bias, a strided Conv2d, and a Linear applied at two positions."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding="same", dilation=2, bias=False),
        nn.Conv2d(2, 2, 2, stride=2),
        nn.Flatten(2),
        nn.Linear(4, 3),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()
    return model, torch.randn(5, 1, 5, 5, dtype=DOUBLE), torch.randint(0, 3, (5,))


def batched(inputs: torch.Tensor, targets: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(inputs.split(sizes), targets.split(sizes)))


def layer_slices(layout: ParameterLayout) -> dict[str, slice]:
    offsets = list(itertools.accumulate(layer.size for layer in layout.layers.values()))
    return {name: slice(end - layer.size, end) for (name, layer), end in zip(layout.layers.items(), offsets)}


@pytest.mark.parametrize(
    "make_task, task, fisher_type",
    [
        (classification_task, "classification", "exact"),
        (classification_task, "classification", "empirical"),
        (regression_task, "regression", "exact"),
        (regression_task, "regression", "empirical"),
        (conv_task, "classification", "exact"),
        (weight_sharing_task, "classification", "empirical"),
    ],
    ids=["mlp-exact", "mlp-empirical", "regression-exact", "regression-empirical", "cnn-exact", "shared-empirical"],
)
def test_dense_equals_average_of_per_example_outer_products(make_task, task, fisher_type):
    model, inputs, targets = make_task()
    computed = fisher(model, batched(inputs, targets, [3, len(inputs) - 3]), "dense", fisher_type, task).to_dense()
    torch.testing.assert_close(computed, reference_fisher(model, inputs, targets, fisher_type, task))


def test_exact_draws_factor_the_softmax_covariance_with_one_draw_fewer_than_classes():
    logits = torch.randn(20, 5, dtype=DOUBLE) * 3
    logits[0] = torch.tensor([40.0, 0.0, 0.0, -40.0, 0.0])  # one class almost certain, one almost impossible
    draws = output_gradient_draws(logits, None, "exact", "classification")
    assert draws.shape == (4, 20, 5)
    p = logits.softmax(dim=1)
    covariance = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(torch.einsum("dni,dnj->nij", draws, draws), covariance, rtol=0, atol=1e-15)


@pytest.mark.parametrize("make_task", [classification_task, conv_task, weight_sharing_task], ids=["mlp", "cnn", "shared"])
def test_diagonal_and_block_diagonal_are_parts_of_the_dense_fisher(make_task):
    model, inputs, targets = make_task()
    expected = reference_fisher(model, inputs, targets, "exact", "classification")
    diagonal = fisher(model, [(inputs, targets)], "diagonal").to_dense()
    torch.testing.assert_close(diagonal, torch.diag(expected.diagonal()))
    blocks = fisher(model, [(inputs, targets)], "block_diagonal")
    slices = layer_slices(blocks.layout)
    mask = torch.block_diag(*(torch.ones(s.stop - s.start, s.stop - s.start) for s in slices.values())).bool()
    torch.testing.assert_close(blocks.to_dense(), torch.where(mask, expected, 0.0))
    assert blocks.layout.size == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("representation", ["dense", "diagonal", "block_diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("make_task", [classification_task, conv_task, weight_sharing_task], ids=["mlp", "cnn", "shared"])
def test_draws_differentiated_in_groups_give_the_same_fisher(monkeypatch, make_task, representation):
    """5 sampled draws per batch in one vmapped backward, in groups of 2, 2 and 1, and one by one
    (the group size follows GROUP_BYTES, KFAC_GROUP_BYTES for the KFAC factors, over one draw's
    gradient bytes)."""
    model, inputs, targets = make_task()
    data = batched(inputs, targets, [3, len(inputs) - 3])

    def computed(per_group: int) -> torch.Tensor:
        monkeypatch.setattr(builder, "GROUP_BYTES", per_group)
        monkeypatch.setattr(builder, "KFAC_GROUP_BYTES", per_group)
        monkeypatch.setattr(LayerCapture, "draw_bytes", lambda self: 1)
        generator = torch.Generator().manual_seed(0)
        return fisher(model, data, representation, "mc", samples=5, generator=generator).to_dense()

    together = computed(5)
    assert together.abs().max() > 0
    torch.testing.assert_close(computed(2), together)
    torch.testing.assert_close(computed(1), together)


def test_one_draw_bytes_are_the_layer_outputs_of_a_batch():
    model, inputs, _ = conv_task()
    with LayerCapture(ParameterLayout(model)) as capture:
        model(inputs)
    conv_output, linear_output = 5 * 2 * 4 * 4, 5 * 3
    assert capture.draw_bytes() == (conv_output + linear_output) * 8


def test_conv2d_kfac_factors_follow_the_documented_convention():
    """A = (1/N) sum_n sum_t a a^T over unfolded padded patches (entries by kernel row, kernel
    column, channel) with a 1 appended, and G = (1/(N T)) sum_n sum_t g g^T over output pixels,
    for an empirical Fisher."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    inputs, targets = torch.randn(4, 2, 4, 4, dtype=DOUBLE), torch.randint(0, 2, (4,))
    kfac = fisher(model, [(inputs, targets)], "kfac", "empirical", layers=["0"])
    patches = F.unfold(inputs, 3, padding=1).transpose(1, 2)
    patches = torch.cat([patches, torch.ones(4, 16, 1, dtype=DOUBLE)], dim=2).flatten(0, 1)
    patches = patches[:, channel_major_index(2, (3, 3), has_bias=True)]
    logit_gradients = model(inputs).softmax(1).detach() - F.one_hot(targets, 2)
    output_gradients = (logit_gradients @ model[2].weight.detach()).reshape(4, 3, 16).transpose(1, 2).flatten(0, 1)
    block = kfac.blocks["0"]
    torch.testing.assert_close(block.a, patches.T @ patches / 4)
    torch.testing.assert_close(block.g, output_gradients.T @ output_gradients / (4 * 16))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_mc_fisher_converges_at_inverse_square_root_rate(task):
    model, inputs, targets = classification_task(n=6) if task == "classification" else regression_task(n=6)
    exact = reference_fisher(model, inputs, targets, "exact", task)

    def root_mean_squared_error(samples: int) -> float:
        errors = []
        for seed in range(8):
            generator = torch.Generator().manual_seed(seed)
            estimate = fisher(model, [(inputs, targets)], "dense", "mc", task, samples=samples, generator=generator).to_dense()
            errors.append((estimate - exact).square().sum())
        return torch.stack(errors).mean().sqrt().item()

    ratio = root_mean_squared_error(2) / root_mean_squared_error(32)
    assert 2.5 < ratio < 6.5, ratio
    generator_a, generator_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        fisher(model, [(inputs, targets)], "diagonal", "mc", samples=2, generator=generator_a).to_dense(),
        fisher(model, [(inputs, targets)], "diagonal", "mc", samples=2, generator=generator_b).to_dense(),
    )


def test_mixed_representation_covers_batchnorm_and_embedding_with_their_dense_diagonal():
    """Also checks that an in-place ReLU after a captured layer does not alter its output gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(6, 2), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(inplace=True), nn.Linear(3, 3)
    ).double()
    with torch.no_grad():
        model[3].weight.uniform_(0.5, 1.5)
        model[3].bias.normal_()
        model[3].running_mean.normal_()
        model[3].running_var.uniform_(0.5, 2.0)
    model.eval()
    inputs, targets = torch.randint(0, 6, (8, 2)), torch.randint(0, 3, (8,))
    expected = reference_fisher(model, inputs, targets, "exact", "classification")
    kfac = fisher(model, [(inputs, targets)], "kfac")
    assert kfac.layout.size == sum(p.numel() for p in model.parameters())
    dense = kfac.to_dense()
    for name in ("0", "3"):
        part = layer_slices(kfac.layout)[name]
        torch.testing.assert_close(dense[part, part], torch.diag(expected.diagonal()[part]))
    torch.testing.assert_close(fisher(model, [(inputs, targets)], "dense").to_dense(), expected)


@pytest.mark.parametrize("representation", ["dense", "diagonal", "kfac", "ekfac", "implicit"])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_and_mode_are_untouched(representation, training):
    model, inputs, targets = classification_task()
    model.train(training)
    model.layers[1].weight.grad = torch.ones_like(model.layers[1].weight)
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    fisher(model, [(inputs, targets)], representation, "mc", generator=torch.Generator().manual_seed(0)).trace()
    assert [m.training for m in model.modules()] == modes
    for p, grad in zip(model.parameters(), before):
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad)


@pytest.mark.parametrize("representation", ["dense", "implicit"])
def test_works_inside_no_grad(representation):
    model, inputs, targets = classification_task()
    with torch.no_grad():
        computed = fisher(model, [(inputs, targets)], representation).to_dense()
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(computed, reference_fisher(model, inputs, targets, "exact", "classification"))


def test_mean_reduced_loss_gives_per_example_gradients():
    model, inputs, targets = classification_task()
    layout = ParameterLayout(model)
    with LayerCapture(layout) as capture:
        outputs = model(inputs)
    mean = capture.output_gradients(F.cross_entropy(outputs, targets), reduction="mean")
    summed = capture.output_gradients(F.cross_entropy(outputs, targets, reduction="sum"))
    for name in layout.layers:
        torch.testing.assert_close(mean[name], summed[name])
    gradients = torch.cat(
        [layer.per_example_gradients(capture.inputs[name], mean[name]) for name, layer in layout.layers.items()], dim=1
    )
    torch.testing.assert_close(gradients, per_example_gradients(model, inputs, targets, F.cross_entropy))


def test_a_subset_of_layers_gives_the_sub_matrix():
    model, inputs, targets = classification_task()
    subset = fisher(model, [(inputs, targets)], "dense", layers=["layers.3"])
    part = layer_slices(ParameterLayout(model))["layers.3"]
    expected = reference_fisher(model, inputs, targets, "exact", "classification")[part, part]
    torch.testing.assert_close(subset.to_dense(), expected)


def test_hooks_are_removed_after_capture():
    model, inputs, _ = classification_task()
    fisher(model, [inputs], "diagonal")
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "options, fragments",
    [
        ({"representation": "kronecker"}, ["representation='kronecker'", "'kfac'", "'ekfac'"]),
        ({"fisher_type": "true"}, ["fisher_type='true'", "'exact'", "'mc'", "'empirical'"]),
        ({"task": "ranking"}, ["task='ranking'", "'classification'", "'regression'"]),
        ({"samples": 0}, ["samples=0", "> 0"]),
        ({"layers": ["layers.7"]}, ["layers='layers.7'", "'layers.1'"]),
        ({"layers": ["layers.2"]}, ["'layers.2'", "Tanh", "nn.Linear", "nn.Conv2d"]),
        ({"representation": "lowrank"}, ["rank"]),
    ],
)
def test_bad_options_name_the_option_and_allowed_values(options, fragments):
    model, inputs, targets = classification_task()
    with pytest.raises(UserInputError) as error:
        fisher(model, [(inputs, targets)], **options)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_unsupported_or_unusable_layers_are_refused_by_name():
    lstm = nn.Sequential(nn.LSTM(3, 2))
    with pytest.raises(UserInputError, match=r"'0' of type LSTM cannot be handled; supported: Kronecker factors: nn.Linear"):
        fisher(lstm, [torch.randn(2, 3, 3)], layers=["0"])
    batch_norm = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).train()
    with pytest.raises(UserInputError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        fisher(batch_norm, [torch.randn(4, 3)])
    model, inputs, _ = classification_task()
    with pytest.raises(UserInputError, match="empirical"):
        fisher(model, [inputs], fisher_type="empirical")
    with pytest.raises(UserInputError, match="re-iterable"):
        fisher(model, iter([inputs]))
    with pytest.raises(UserInputError, match="re-iterable"):
        fisher(model, (batch for batch in [inputs]))
    with pytest.raises(UserInputError, match="got dict"):
        fisher(model, [{"inputs": inputs}])
    for representation in ("kfac", "implicit"):
        with pytest.raises(UserInputError, match="no batches"):
            fisher(model, [], representation)
    with pytest.raises(UserInputError, match="reduction='none'"):
        LayerCapture(ParameterLayout(model)).output_gradients(torch.zeros(()), reduction="none")
