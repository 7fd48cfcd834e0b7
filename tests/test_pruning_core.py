"""The pruning core: exact counts, monotone masks, agreement with torch.nn.utils.prune, exact loss
predictions where the loss models are exact, schedules, rewinding, masks under optimizers."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from callbacks.curvature import EKFACOptimizer, FisherStatistics, fisher
from callbacks.pruning import (
    CRITERIA,
    Pruning,
    apply_kept_units,
    criterion_scores,
    fisher_diagonals,
    keep_pruned_at_zero,
    kept_units,
    loss_gradient,
    make_permanent,
    mean_loss,
    negative_log_likelihood,
    predicted_loss_change,
    prunable_tensors,
    prune,
    rewind,
    select_kept_units,
    snapshot,
    target_sparsity,
    unit_scores,
)
from framework.errors import UserInputError


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()


def classification_data(inputs_shape: tuple[int, ...], batches: int = 3, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, *inputs_shape, generator=generator, dtype=torch.float64), torch.randint(0, 3, (8,), generator=generator))
        for _ in range(batches)
    ]


def pruned_count(tensors) -> int:
    return sum(int((t.mask() == 0).sum()) for t in tensors)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_reached_sparsity_is_the_rounded_target_and_masks_only_shrink(criterion, scope):
    model, data = mlp(), classification_data((6,))
    tensors = prunable_tensors(model)
    sizes = [t.leaf().numel() for t in tensors]
    previous = [torch.ones_like(t.leaf()) for t in tensors]
    for target in (0.3, 0.55, 0.62, 0.9):
        prune(model, tensors, data, target, criterion=criterion, scope=scope, allow_layer_collapse=True)
        if scope == "global":
            assert pruned_count(tensors) == round(target * sum(sizes))
        else:
            assert [int((t.mask() == 0).sum()) for t in tensors] == [round(target * n) for n in sizes]
        masks = [t.mask().clone() for t in tensors]
        assert all(((old == 0) <= (new == 0)).all() for old, new in zip(previous, masks)), "a pruned weight came back"
        previous = masks
        with torch.no_grad():  # training between steps moves the unmasked values anywhere
            for t in tensors:
                t.leaf().normal_(0, 10)


@pytest.mark.parametrize(("criterion", "norm"), [("MP", 1), ("MP", 2), ("OBD", None)])
def test_structured_pruning_removes_the_output_channels_ranked_lowest(criterion, norm):
    model, data = conv_net(), classification_data((2, 4, 4))
    tensors = prunable_tensors(model)
    diagonals = fisher_diagonals(model, data, tensors) if criterion == "OBD" else [None, None]
    expected = torch.cat(
        [unit_scores(criterion_scores(criterion, t.value(), None, f), t.value(), True, norm) for t, f in zip(tensors, diagonals)]
    )
    prune(model, tensors, data, 0.3, criterion=criterion, structured=True, pruning_norm=norm)
    channels = [t.mask().reshape(t.mask().shape[0], -1) for t in tensors]
    assert all(((rows == 0).all(1) | (rows == 1).all(1)).all() for rows in channels)
    kept = torch.cat([kept_units(t, structured=True) for t in tensors])
    assert int((~kept).sum()) == round(0.3 * (4 + 3))
    assert expected[~kept].max() <= expected[kept].min()


def test_magnitude_global_mask_equals_torch_global_unstructured():
    ours, reference = conv_net(), conv_net()
    tensors = prunable_tensors(ours)
    total = sum(t.leaf().numel() for t in tensors)
    prune(ours, tensors, [], 0.7, criterion="MP")
    pairs = [(m, "weight") for m in reference if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(pairs, pruning_method=torch_prune.L1Unstructured, amount=round(0.7 * total))
    for t, (module, _) in zip(tensors, pairs):
        assert torch.equal(t.mask(), module.weight_mask)


def test_ties_prune_the_lower_index_first():
    scores = [torch.tensor([1.0, 0.5, 0.5]), torch.tensor([0.5, 2.0])]
    kept = select_kept_units(scores, [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)], 0.4, "global")
    assert [k.tolist() for k in kept] == [[True, False, False], [True, True]]


def linear_regression(inputs: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[nn.Module, list]:
    model = nn.Linear(inputs.shape[1], weight.shape[0], bias=False).double()
    with torch.no_grad():
        model.weight.copy_(weight)
    return nn.Sequential(model), [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])]


def test_obd_predicts_the_true_increase_at_the_minimum_of_a_diagonal_quadratic():
    # Orthogonal inputs make the Hessian of the mean squared error diagonal; targets from the weights put it at its minimum.
    inputs = torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64))
    weight = torch.randn(2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model, data = linear_regression(inputs, weight, inputs @ weight.T)
    loss = negative_log_likelihood("regression")
    before = mean_loss(model, data, loss)
    predicted = prune(model, prunable_tensors(model), data, 0.6, criterion="OBD", task="regression")
    measured = mean_loss(model, data, loss) - before
    assert predicted > 0.01
    assert predicted == pytest.approx(measured, rel=1e-12)


def test_quadratic_model_is_exact_for_single_weights_away_from_the_minimum():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    weight, targets = torch.randn(3, 4, generator=generator, dtype=torch.float64), torch.randn(7, 3, generator=generator, dtype=torch.float64)
    model, data = linear_regression(inputs, weight, targets)
    loss = negative_log_likelihood("regression")
    (tensor,) = prunable_tensors(model)
    gradient = loss_gradient(model, data, [tensor], loss)[0]
    assert gradient.abs().max() > 0.1
    predicted = predicted_loss_change("QM", tensor.value(), gradient, fisher_diagonals(model, data, [tensor], task="regression")[0])
    before = mean_loss(model, data, loss)
    for index in [(0, 0), (1, 2), (2, 3)]:
        with torch.no_grad():
            saved = tensor.leaf()[index].item()
            tensor.leaf()[index] = 0.0
            measured = mean_loss(model, data, loss) - before
            tensor.leaf()[index] = saved
        assert predicted[index].item() == pytest.approx(measured, rel=1e-10)


def test_linear_model_is_exact_for_a_linear_loss():
    model, data = mlp(), classification_data((6,))
    weights = torch.randn(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def linear_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs @ weights  # linear in the last layer's weight

    tensors = prunable_tensors(model, layers=["4"])
    gradient = loss_gradient(model, data, tensors, linear_loss)[0]
    predicted = predicted_loss_change("LM", tensors[0].value(), gradient, None)
    before = mean_loss(model, data, linear_loss)
    scores = criterion_scores("LM", tensors[0].value(), gradient)
    kept = select_kept_units([unit_scores(scores, tensors[0].value(), False, None)], [kept_units(tensors[0], False)], 0.5, "global")[0]
    apply_kept_units(tensors[0], kept, structured=False)
    measured = mean_loss(model, data, linear_loss) - before
    assert predicted.reshape(-1)[~kept].sum().item() == pytest.approx(measured, rel=1e-10, abs=1e-14)
    assert abs(measured) > 1e-3


def test_fisher_diagonal_of_pruned_layers_matches_the_curvature_package():
    model, data = conv_net(), classification_data((2, 4, 4))
    reference = fisher(model, data, representation="diagonal", layers=["0", "3"])
    tensors = prunable_tensors(model, parameter_names=("weight", "bias"))
    prune(model, tensors, [], 0.0)  # masks added
    ours = fisher_diagonals(model, data, tensors)
    for t, diagonal in zip(tensors, ours):
        flat = reference.blocks[t.module_name].diagonal
        size = t.module.weight.numel()
        assert torch.allclose(diagonal.reshape(-1), flat[:size] if t.name == "weight" else flat[size:])


@pytest.mark.parametrize("schedule", ["linear", "exponential", "cubic"])
def test_schedules_end_exactly_at_the_target(schedule):
    model = mlp()
    tensors = prunable_tensors(model)
    total = sum(t.leaf().numel() for t in tensors)
    steps = 5
    targets = [target_sparsity(schedule, 0.9, k, steps) for k in range(1, steps + 1)]
    for target in targets:
        prune(model, tensors, [], target)
    assert targets[-1] == 0.9 and pruned_count(tensors) == round(0.9 * total)
    assert targets == sorted(targets)
    if schedule == "exponential":  # a constant fraction of the remaining weights per step
        remaining = [1.0] + [1 - s for s in targets]
        assert [b / a for a, b in zip(remaining, remaining[1:])] == pytest.approx([0.1 ** (1 / steps)] * steps)
    if schedule == "cubic":
        assert targets[0] == pytest.approx(0.9 * (1 - 0.8**3))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_a_large_locality_penalty_ranks_every_criterion_like_magnitude(criterion):
    generator = torch.Generator().manual_seed(0)
    weight, gradient = torch.randn(50, generator=generator, dtype=torch.float64), torch.randn(50, generator=generator, dtype=torch.float64)
    fisher_diagonal = torch.rand(50, generator=generator, dtype=torch.float64) * 10
    magnitude_order = weight.abs().argsort()
    penalised = criterion_scores(criterion, weight, gradient, fisher_diagonal, locality_penalty=1e8)
    assert torch.equal(penalised.argsort(), magnitude_order)
    if criterion in ("LM", "QM"):
        assert not torch.equal(criterion_scores(criterion, weight, gradient, fisher_diagonal).argsort(), magnitude_order)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, data: list, statistics: FisherStatistics | None = None) -> None:
    for inputs, targets in data:
        optimizer.zero_grad()
        if statistics is None:
            outputs = model(inputs)
        else:
            with statistics.record(targets):
                outputs = model(inputs)
        nn.functional.cross_entropy(outputs, targets).backward()
        optimizer.step()


def test_rewound_survivors_equal_their_saved_values():
    model, data = mlp(), classification_data((6,))
    tensors = prunable_tensors(model)
    prune(model, tensors, [], 0.0)
    saved = snapshot(tensors)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.5), data)
    prune(model, tensors, data, 0.6, criterion="LM")
    rewind(tensors, saved)
    for t in tensors:
        kept = t.mask().bool()
        assert torch.equal(t.value()[kept], saved[t.key][kept]) and (t.value()[~kept] == 0).all()


def ekfac(model: nn.Module) -> tuple[torch.optim.Optimizer, FisherStatistics]:
    optimizer = EKFACOptimizer(model.parameters(), lr=0.05, damping=0.1, weight_decay=0.01, eigen_every=1)
    return optimizer, FisherStatistics(model, optimizer, fisher_type="empirical")


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda m: (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01), None),
        lambda m: (torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.01), None),
        lambda m: (torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1), None),
        ekfac,
    ],
    ids=["sgd_momentum_wd", "adam_wd", "adamw", "ekfac"],
)
def test_pruned_weights_stay_exactly_zero_while_training(optimizer):
    model, data = mlp(), classification_data((6,), batches=4)
    tensors = prunable_tensors(model)
    prune(model, tensors, [], 0.0)
    opt, statistics = optimizer(model)
    hooks = keep_pruned_at_zero(opt, tensors)
    train_steps(model, opt, data, statistics)  # momentum and Adam moments are non-zero when the step prunes
    prune(model, tensors, data, 0.5, criterion="QM")
    train_steps(model, opt, data * 3, statistics)
    for t in tensors:
        assert (t.leaf()[t.mask() == 0] == 0).all()
    for hook in hooks:
        hook.remove()
    train_steps(model, opt, data[:1], statistics)
    assert any((t.leaf()[t.mask() == 0] != 0).any() for t in tensors), "without the hooks the optimizer moves pruned weights"


def test_the_optimizer_only_sees_masked_gradients():
    # A preconditioner that mixes coordinates would carry a pruned weight's gradient into the others.
    model, data = mlp(), classification_data((6,))
    tensors = prunable_tensors(model)
    prune(model, tensors, data, 0.5, criterion="LM")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    keep_pruned_at_zero(optimizer, tensors)
    optimizer.register_step_pre_hook(lambda *_: seen.extend(t.leaf().grad.clone() for t in tensors))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
    assert any((t.leaf().grad[t.mask() == 0] != 0).any() for t in tensors), "pruned weights do get a gradient"
    optimizer.step()
    assert all((g[t.mask() == 0] == 0).all() and (g[t.mask() == 1] != 0).any() for g, t in zip(seen, tensors))


def test_make_permanent_gives_a_state_dict_loadable_into_an_unpruned_model():
    model, data = conv_net(), classification_data((2, 4, 4))
    prune(model, prunable_tensors(model, parameter_names=("weight", "bias")), data, 0.5, criterion="OBD")
    outputs = model(data[0][0])
    state = make_permanent(model)
    assert not any(key.endswith("_mask") for key in state)
    fresh = conv_net(seed=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(data[0][0]), outputs)
    zeros = sum(int((p == 0).sum()) for p in fresh.parameters())
    assert zeros == round(0.5 * sum(p.numel() for p in fresh.parameters()))


def test_bad_inputs_are_refused_naming_the_allowed_values():
    model = mlp()
    with pytest.raises(UserInputError, match=r"layers='9' is not allowed; choose one of \['0', '2', '4'\]"):
        prunable_tensors(model, layers=["9"])
    with pytest.raises(UserInputError, match=r"choose one of \['weight', 'bias'\]"):
        prunable_tensors(model, parameter_names=["gamma"])
    with pytest.raises(UserInputError, match=r"criterion='SNIP' is not allowed; choose one of \['MP', 'LM', 'QM', 'OBD'\]"):
        criterion_scores("SNIP", torch.ones(3))
    tensors = prunable_tensors(model, layers=["4"])
    with pytest.raises(UserInputError, match=r"would prune all of \['4.weight'\].*allow_layer_collapse=True"):
        prune(model, tensors, [], 0.97)
    assert (tensors[0].mask() == 1).all(), "a refused step must not change the masks"
    prune(model, tensors, [], 0.97, allow_layer_collapse=True)
    assert (tensors[0].mask() == 0).all()


def normalised_mlp(seed: int = 0) -> nn.Module:
    """An MLP with BatchNorm1d and LayerNorm whose affine parameters and running statistics are not the defaults."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)
    ).double()
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight.normal_(0, 1)
            norm.bias.normal_(0, 1)
        model[1].running_mean.normal_(0, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_normalisation_weights_pruned_on_request_reach_the_rounded_target(criterion, scope):
    model, data = normalised_mlp(), classification_data((6,))
    tensors = prunable_tensors(model, include_normalization=True)
    assert [t.key for t in tensors] == ["0.weight", "1.weight", "3.weight", "4.weight", "6.weight"]
    sizes = [t.leaf().numel() for t in tensors]
    for target in (0.3, 0.62):
        prune(model, tensors, data, target, criterion=criterion, scope=scope)
        if scope == "global":
            assert pruned_count(tensors) == round(target * sum(sizes)) == round(target * 104)
        else:
            assert [int((t.mask() == 0).sum()) for t in tensors] == [round(target * n) for n in sizes]
        assert all((t.leaf()[t.mask() == 0] == 0).all() for t in tensors)


@pytest.mark.parametrize("criterion", ["MP", "OBD"])
def test_structured_pruning_of_normalisation_parameters_prunes_whole_channels(criterion):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(16, 3)
    ).double()
    data = classification_data((2, 4, 4))
    tensors = prunable_tensors(model, parameter_names=("weight", "bias"), include_normalization=True)
    assert [t.key for t in tensors if t.leaf().dim() == 1] == ["0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "6.bias"]
    prune(model, tensors, data, 0.5, criterion=criterion, scope="layer", structured=True)
    for t in tensors:
        rows = t.mask().reshape(t.mask().shape[0], -1)
        assert ((rows == 0).all(dim=1) | (rows == 1).all(dim=1)).all(), "a channel was pruned in part"
        assert int((rows == 0).all(dim=1).sum()) == round(0.5 * t.mask().shape[0])


def test_pruned_normalisation_weights_stay_exactly_zero_under_sgd_momentum():
    model, data = normalised_mlp(), classification_data((6,), batches=4)
    tensors = prunable_tensors(model, parameter_names=("weight", "bias"), include_normalization=True)
    norms = [t for t in tensors if t.module_name in ("1", "4")]
    prune(model, tensors, [], 0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    keep_pruned_at_zero(optimizer, tensors)
    train_steps(model, optimizer, data)  # the momentum of every BN weight is non-zero when the step prunes
    prune(model, tensors, data, 0.5, criterion="QM", scope="layer")
    assert [int((t.mask() == 0).sum()) for t in norms] == [4, 4, 2, 2]
    before = [t.leaf().detach().clone() for t in norms]
    train_steps(model, optimizer, data * 3)
    for t, old in zip(norms, before):
        assert (t.leaf()[t.mask() == 0] == 0).all()
        assert not torch.equal(t.leaf()[t.mask() == 1], old[t.mask() == 1]), "the kept entries train"


def test_normalisation_parameters_are_excluded_unless_asked():
    model = normalised_mlp()
    assert [t.key for t in prunable_tensors(model, parameter_names=("weight", "bias"))] == [
        "0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"
    ]
    refusal = r"layers='1' is a normalisation layer: set include_normalization=True, or choose one of \['0', '3', '6'\]"
    with pytest.raises(UserInputError, match=refusal):
        prunable_tensors(model, layers=["1"])
    assert [t.key for t in prunable_tensors(model, layers=["1", "6"], include_normalization=True)] == ["1.weight", "6.weight"]
    Pruning().setup(None, model, "fit")
    assert not hasattr(model[1], "weight_mask") and hasattr(model[0], "weight_mask")
    callback = Pruning(include_normalization=True)
    callback.setup(None, model, "fit")
    assert [t.key for t in callback._tensors] == ["0.weight", "1.weight", "3.weight", "4.weight", "6.weight"]
    assert hasattr(model[1], "weight_mask") and not hasattr(model[1], "bias_mask")


def test_linear_model_score_of_a_batchnorm_weight_equals_its_hand_computed_value():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
        model[0].bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        model[0].running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        model[0].running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    inputs = torch.tensor([[1.0, 2.0, -1.0], [0.0, -1.0, 2.0], [3.0, 0.5, 0.0], [-2.0, 1.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0])
    data = [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]
    # In eval mode BN is x_hat * gamma + beta with the running statistics; d loss / d gamma_c is the
    # mean over examples of (softmax - one_hot) W[:, c] x_hat_c.
    gamma, beta, weight, bias = (p.detach().clone() for p in (model[0].weight, model[0].bias, model[1].weight, model[1].bias))
    x_hat = (inputs - model[0].running_mean) / (model[0].running_var + model[0].eps).sqrt()
    logits = (x_hat * gamma + beta) @ weight.T + bias
    residual = logits.softmax(dim=1) - nn.functional.one_hot(targets, 2).double()
    gradient = ((residual @ weight) * x_hat).mean(dim=0)
    expected = (gradient * -gamma).abs()

    model.train()  # scores must use the running statistics whatever the mode
    tensors = prunable_tensors(model, layers=["0"], include_normalization=True)
    (measured,) = loss_gradient(model, data, tensors, negative_log_likelihood("classification"))
    assert model.training
    assert torch.allclose(criterion_scores("LM", tensors[0].value(), measured), expected, rtol=1e-12, atol=0)
    predicted = prune(model, tensors, data, 1 / 3, criterion="LM")
    lowest = int(expected.argmin())
    assert tensors[0].mask().tolist() == [0.0 if c == lowest else 1.0 for c in range(3)]
    assert predicted == pytest.approx(float(gradient[lowest] * -gamma[lowest]), rel=1e-12)
