"""PonderNet, ACT, the early-exit CNN and the habitual/controlled network: the generic
architecture check, halting distributions that sum to 1, the KL to the geometric prior against
its closed form, ACT's ponder cost N + R by hand, the compute interface (expected steps and FLOPs
against hand counts and FlopCounterMode), and adaptive inference that gives exactly the
training-time outputs at each input's exit while running fewer steps."""

import math

import pytest
import torch
import torch.nn.functional as F

from framework.errors import UserInputError
from torch.utils.flop_counter import FlopCounterMode

from callbacks.distillation import kd_loss
from framework.models.adaptive import (
    AdaptiveComputationTime,
    EarlyExitCNN,
    HabitualControlledNet,
    PonderNet,
    act_halting,
    geometric_prior,
    kl_divergence,
    ponder_halting_distribution,
)
from framework.testing.smoke import check_architecture

STROOP_SHAPE = (6, 3, 8, 8)
MODELS = {
    "pondernet": lambda: PonderNet(3 * 8 * 8, 10, hidden=16, max_steps=5, prior_halt=0.3),
    "act": lambda: AdaptiveComputationTime(3 * 8 * 8, 10, hidden=16, max_steps=5, eps=0.01),
    "early_exit": lambda: EarlyExitCNN(3, 10, channels=(4, 8, 8)),
    "habitual_controlled": lambda: HabitualControlledNet(3, 8, 10, habitual_hidden=8, controlled_channels=(4, 8)),
    "habitual_controlled_st": lambda: HabitualControlledNet(3, 8, 10, habitual_hidden=8, controlled_channels=(4, 8), gate="straight_through"),
}
NUM_STEPS = {"pondernet": 5, "act": 5, "early_exit": 3, "habitual_controlled": 2, "habitual_controlled_st": 2}


def halting_units(model) -> list:
    """The Linear layers that output halting (exit, gate) logits."""
    if isinstance(model, EarlyExitCNN):
        return list(model.exit_decisions)
    return [model.gate] if isinstance(model, HabitualControlledNet) else [model.halting]


def with_constant_halting(model, probability: float):
    """Make every halting unit output ``probability`` whatever the input."""
    with torch.no_grad():
        for unit in halting_units(model):
            unit.weight.zero_()
            unit.bias.fill_(math.log(probability / (1 - probability)))
    return model


@pytest.mark.parametrize("name", MODELS)
def test_architecture_smoke(name, tmp_path):
    check_architecture(MODELS[name], torch.randn(STROOP_SHAPE), (STROOP_SHAPE[0], 10), tmp_path)


@pytest.mark.parametrize("name", MODELS)
def test_halting_distributions_sum_to_one(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():
        for unit in halting_units(model):
            unit.bias.fill_(-2.0)  # late halting, so that ACT reaches the last step for some inputs
        steps = model.forward_steps(torch.randn(STROOP_SHAPE) * 3)
    max_steps = NUM_STEPS[name]
    assert steps.step_logits.shape == (STROOP_SHAPE[0], max_steps, 10)
    assert (steps.halting_distribution >= 0).all()
    assert torch.allclose(steps.halting_distribution.sum(dim=1), torch.ones(STROOP_SHAPE[0]), atol=1e-6)
    assert ((steps.expected_steps >= 1) & (steps.expected_steps <= max_steps)).all()


def test_ponder_halting_distribution_by_hand():
    lambdas = torch.tensor([[0.2, 0.5, 0.3]])
    # p1 = 0.2, p2 = 0.8 * 0.5, and the remainder 0.8 * 0.5 on the last step (lambda_3 is unused).
    assert torch.allclose(ponder_halting_distribution(lambdas), torch.tensor([[0.2, 0.4, 0.4]]))


def truncated_geometric_kl(a: float, b: float, steps: int) -> float:
    """KL between geometrics with halting probabilities a and b, both truncated at ``steps`` with
    the tail on the last step. log(p_n / q_n) = log(a / b) + (n - 1) log((1 - a) / (1 - b)), with
    no log(a / b) term at the last step, so KL = P(n < steps) log(a / b) + E[n - 1] log((1 - a) / (1 - b)),
    P(n < steps) = 1 - (1 - a)^(steps - 1), E[n] = (1 - (1 - a)^steps) / a."""
    stop_before_last = 1 - (1 - a) ** (steps - 1)
    expected_steps = (1 - (1 - a) ** steps) / a
    return stop_before_last * math.log(a / b) + (expected_steps - 1) * math.log((1 - a) / (1 - b))


def test_geometric_prior_is_the_truncated_geometric():
    prior = geometric_prior(0.25, 4)
    assert torch.allclose(prior, torch.tensor([0.25, 0.75 * 0.25, 0.75**2 * 0.25, 0.75**3]))


def test_kl_to_prior_equals_the_closed_form():
    halt, prior_halt, max_steps = 0.35, 0.1, 6
    model = with_constant_halting(PonderNet(12, 3, hidden=4, max_steps=max_steps, prior_halt=prior_halt), halt)
    with torch.no_grad():
        steps = model.forward_steps(torch.randn(5, 12))
        kl = model.kl_to_prior(steps)
    assert kl.item() == pytest.approx(truncated_geometric_kl(halt, prior_halt, max_steps), rel=1e-5)
    assert steps.expected_steps.mean().item() == pytest.approx((1 - (1 - halt) ** max_steps) / halt, rel=1e-5)
    # And the KL of the prior to itself is 0.
    assert kl_divergence(model.prior, model.prior).item() == pytest.approx(0.0, abs=1e-7)


def test_pondernet_output_is_the_log_mixture_and_expected_loss_weights_each_step():
    torch.manual_seed(1)
    model = PonderNet(12, 3, hidden=4, max_steps=3)
    x, targets = torch.randn(4, 12), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        steps = model.forward_steps(x)
        mixture = (steps.halting_distribution[..., None] * steps.step_logits.softmax(dim=-1)).sum(dim=1)
        assert torch.allclose(model(x).exp(), mixture, atol=1e-6)
        by_loop = sum(
            steps.halting_distribution[i, n] * F.cross_entropy(steps.step_logits[i, n], targets[i])
            for i in range(4)
            for n in range(3)
        ) / 4
        assert model.expected_loss(steps, targets).item() == pytest.approx(by_loop.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("units", "distribution", "halting_step", "remainder"),
    [
        ([0.3, 0.4, 0.5, 0.9], [0.3, 0.4, 0.3, 0.0], 3, 0.3),  # 0.3 + 0.4 + 0.5 >= 0.99 at step 3
        ([0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], 4, 0.7),  # never reaches 0.99: the last step
        ([0.995, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0], 1, 1.0),  # halts at once, R = 1
    ],
)
def test_act_halting_by_hand(units, distribution, halting_step, remainder):
    p, n, r = act_halting(torch.tensor([units]), threshold=0.99)
    assert torch.allclose(p, torch.tensor([distribution]))
    assert n.tolist() == [halting_step] and r.item() == pytest.approx(remainder)


def test_act_ponder_cost_is_n_plus_r_and_its_gradient_flows_through_r():
    # Constant halting units 0.3: 0.3 + 0.3 + 0.3 < 0.99 <= 1.2, so N = 4 and R = 1 - 0.9 = 0.1.
    model = with_constant_halting(AdaptiveComputationTime(12, 3, hidden=4, max_steps=6, eps=0.01), 0.3)
    steps = model.forward_steps(torch.randn(5, 12))
    assert steps.halting_step.tolist() == [4] * 5
    assert torch.allclose(steps.ponder_cost, torch.full((5,), 4.1))
    assert torch.allclose(steps.halting_distribution, torch.tensor([0.3, 0.3, 0.3, 0.1, 0.0, 0.0]).expand(5, 6))
    steps.ponder_cost.sum().backward()
    # dR/d(bias) = -3 * h (1 - h) per example: the three steps before N.
    assert model.halting.bias.grad.item() == pytest.approx(-5 * 3 * 0.3 * 0.7, rel=1e-5)


def test_act_output_is_the_halting_weighted_mean_of_step_logits():
    torch.manual_seed(2)
    model = AdaptiveComputationTime(12, 3, hidden=4, max_steps=4)
    x = torch.randn(4, 12)
    with torch.no_grad():
        steps = model.forward_steps(x)
        assert torch.allclose(model(x), torch.einsum("ns,nsc->nc", steps.halting_distribution, steps.step_logits))


def test_early_exit_distribution_is_ponders_over_stages():
    model = with_constant_halting(EarlyExitCNN(3, 10, channels=(4, 8, 8)), 0.4)
    with torch.no_grad():
        steps = model.forward_steps(torch.randn(STROOP_SHAPE))
    assert torch.allclose(steps.halting_distribution, torch.tensor([0.4, 0.6 * 0.4, 0.6 * 0.6]).expand(6, 3))


def test_early_exit_inference_matches_the_training_exits_and_skips_stages():
    torch.manual_seed(3)
    model = EarlyExitCNN(3, 10, channels=(4, 8, 8)).eval()
    x = torch.randn(20, 3, 8, 8)
    with torch.no_grad():
        steps = model.forward_steps(x)
    threshold = steps.halting_probabilities[:, 0].median().item()  # about half the inputs leave at stage 1
    processed = []
    hooks = [stage.register_forward_hook(lambda module, inputs, output: processed.append(len(inputs[0]))) for stage in model.stages]
    model.threshold = threshold
    logits, exit_stage = model.forward_adaptive(x)
    for hook in hooks:
        hook.remove()
    exits_at_1 = steps.halting_probabilities[:, 0] >= threshold
    exits_at_2 = ~exits_at_1 & (steps.halting_probabilities[:, 1] >= threshold)
    expected_stage = torch.where(exits_at_1, 1, torch.where(exits_at_2, 2, 3))
    assert torch.equal(exit_stage, expected_stage) and 0 < int(exits_at_1.sum()) < 20
    reach_stage_3 = int((expected_stage == 3).sum())
    assert processed == [20, 20 - int(exits_at_1.sum())] + ([reach_stage_3] if reach_stage_3 else [])
    assert torch.allclose(logits, steps.step_logits[torch.arange(20), exit_stage - 1], atol=1e-6)


def test_act_halting_inference_matches_training_and_skips_steps():
    torch.manual_seed(4)
    model = AdaptiveComputationTime(12, 3, hidden=8, max_steps=6, eps=0.01)
    with torch.no_grad():
        model.halting.bias.fill_(-1.0)  # halting steps spread over 2..6
        x = torch.randn(32, 12) * 2
        steps = model.forward_steps(x)
        expected = model(x)
    processed = []
    hook = model.cell.register_forward_hook(lambda module, inputs, output: processed.append(len(inputs[0])))
    logits, halting_step = model.forward_adaptive(x)
    hook.remove()
    assert torch.equal(halting_step, steps.halting_step) and len(set(halting_step.tolist())) > 1
    assert torch.allclose(logits, expected, atol=1e-5)
    assert processed == [int((steps.halting_step > n).sum()) for n in range(int(steps.halting_step.max()))]
    assert sum(processed) == int(steps.halting_step.sum()) < 32 * 6


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: PonderNet(12, prior_halt=1.0), "prior_halt=1.0"),
        (lambda: PonderNet(12, max_steps=0), "max_steps=0"),
        (lambda: AdaptiveComputationTime(12, eps=0.0), "eps=0.0"),
        (lambda: AdaptiveComputationTime(12, hidden=0), "hidden=0"),
        (lambda: EarlyExitCNN(channels=()), "at least one stage"),
        (lambda: EarlyExitCNN(channels=(4, 0)), "must be > 0"),
        (lambda: EarlyExitCNN(threshold=0.0), "threshold=0.0"),
        (lambda: PonderNet(12, beta=-1.0), "beta=-1.0"),
        (lambda: HabitualControlledNet(gate="hard"), "gate='hard' is not allowed"),
        (lambda: HabitualControlledNet(distill_weight=-0.1), "distill_weight=-0.1"),
        (lambda: HabitualControlledNet(habitual_hidden=0), "habitual_hidden=0"),
    ],
)
def test_bad_hyperparameters_are_refused(factory, message):
    with pytest.raises(UserInputError, match=message):
        factory()


def test_pondernet_halting_inference_matches_the_training_steps_and_skips_steps():
    torch.manual_seed(5)
    model = PonderNet(12, 3, hidden=8, max_steps=6, threshold=0.5).double()
    with torch.no_grad():
        model.halting.bias.fill_(-0.5)  # halting steps spread over several steps
        x = torch.randn(40, 12, dtype=torch.float64) * 2
        steps = model.forward_steps(x)
    processed = []
    hook = model.cell.register_forward_hook(lambda module, inputs, output: processed.append(len(inputs[0])))
    logits, halting_step = model.forward_adaptive(x)
    hook.remove()
    reached = steps.halting_probabilities >= 0.5
    reached[:, -1] = True
    expected_step = reached.int().argmax(dim=1) + 1
    assert torch.equal(halting_step, expected_step) and len(set(halting_step.tolist())) > 1
    # The training-time step's logits, up to float64 rounding (a sub-batch may take another BLAS path).
    assert torch.allclose(logits, steps.step_logits[torch.arange(40), halting_step - 1], rtol=1e-12, atol=1e-12)
    assert processed == [int((expected_step > n).sum()) for n in range(int(expected_step.max()))]


def test_pondernet_sampled_halting_follows_lambda():
    model = with_constant_halting(PonderNet(12, 3, hidden=4, max_steps=8), 0.4)
    _, halting_step = model.forward_adaptive(torch.randn(4000, 12), sample=True, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(halting_step - 1, minlength=8).double() / 4000
    assert torch.allclose(frequencies, geometric_prior(0.4, 8).double(), atol=0.025)


def test_habitual_controlled_inference_runs_the_costly_path_only_where_gated():
    torch.manual_seed(6)
    model = MODELS["habitual_controlled"]().double().eval()
    x = torch.randn(30, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        steps = model.forward_steps(x)
        model.threshold = steps.halting_distribution[:, 1].median().item()
    processed = []
    hook = model.controlled.register_forward_hook(lambda module, inputs, output: processed.append(len(inputs[0])))
    logits, path = model.forward_adaptive(x)
    hook.remove()
    gated = steps.halting_distribution[:, 1] >= model.threshold
    assert torch.equal(path, gated.long() + 1) and 0 < int(gated.sum()) < 30
    assert processed == [int(gated.sum())]
    assert torch.allclose(logits, steps.step_logits[torch.arange(30), path - 1], rtol=1e-12, atol=1e-12)


def test_habitual_controlled_gate_modes():
    torch.manual_seed(7)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    soft = MODELS["habitual_controlled"]().double()
    steps = soft.forward_steps(x)
    probabilities = steps.step_logits.softmax(dim=-1)
    gate = steps.halting_distribution[:, 1:]
    expected = ((1 - gate) * probabilities[:, 0] + gate * probabilities[:, 1]).log()
    assert torch.allclose(soft(x), expected)
    assert torch.allclose(soft.expected_compute("steps"), 1 + gate[:, 0])
    straight = MODELS["habitual_controlled_st"]().double()
    straight.load_state_dict(soft.state_dict())
    output = straight(x)  # training: a hard Bernoulli(g) choice per input...
    chosen = torch.stack([probabilities[:, 0].log(), probabilities[:, 1].log()], dim=1)
    assert all(any(torch.allclose(output[i], chosen[i, k]) for k in (0, 1)) for i in range(16))
    output.sum().backward()
    assert straight.gate.weight.grad.abs().sum() > 0  # ...with the straight-through gradient of g
    straight.eval()
    hard = (gate[:, 0] >= straight.threshold).long()
    with torch.no_grad():
        assert torch.allclose(straight(x), chosen[torch.arange(16), hard])


def test_distilling_the_habitual_path_is_kd_towards_the_detached_controlled_path():
    torch.manual_seed(8)
    model = HabitualControlledNet(3, 8, 10, habitual_hidden=8, controlled_channels=(4, 8), distill_weight=0.5, temperature=2.0).double()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    model(x)
    habitual, controlled = model.last_steps.step_logits.unbind(dim=1)
    penalty = model.regularization()
    assert penalty.item() == pytest.approx(0.5 * kd_loss(habitual, controlled, 2.0).item(), rel=1e-9)
    penalty.backward()
    assert model.habitual_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.controlled.parameters())  # the teacher side is detached
    assert model.eval().regularization().item() == 0.0


def test_pondernet_regularization_is_beta_times_the_kl():
    torch.manual_seed(9)
    model = PonderNet(12, 3, hidden=4, max_steps=4, prior_halt=0.3, beta=0.25)
    model(torch.randn(5, 12))
    assert model.regularization().item() == pytest.approx(0.25 * model.kl_to_prior(model.last_steps).item(), rel=1e-6)
    assert PonderNet(12, 3, hidden=4).regularization().item() == 0.0


def test_step_flops_against_hand_counts():
    """2 FLOPs per multiply-add: Linear in*out, GRU cell 3h(in + h), conv 9 Cin Cout H W."""
    h, c, inputs = 8, 10, 192
    step = 2 * (3 * h * (h + h) + h * c + h)
    for model in (PonderNet(inputs, c, hidden=h, max_steps=4), AdaptiveComputationTime(inputs, c, hidden=h, max_steps=4)):
        expected = [2 * inputs * h + step * n for n in range(1, 5)]
        assert model.cumulative_flops((3, 8, 8)).tolist() == expected
    early = EarlyExitCNN(3, c, channels=(4, 8, 8))
    stages = [2 * 9 * 3 * 4 * 64 + 2 * 4 * (c + 1), 2 * 9 * 4 * 8 * 16 + 2 * 8 * (c + 1), 2 * 9 * 8 * 8 * 4 + 2 * 8 * c]
    assert early.cumulative_flops((3, 8, 8)).tolist() == [sum(stages[:n]) for n in (1, 2, 3)]
    two_mode = MODELS["habitual_controlled"]()
    habitual = 2 * (inputs * 8 + 8 * c + 8)
    controlled = 2 * 9 * 3 * 4 * 64 + 2 * 9 * 4 * 8 * 16 + 2 * 8 * c
    assert two_mode.cumulative_flops((3, 8, 8)).tolist() == [habitual, habitual + controlled]
    assert two_mode.compute_bounds("flops", (3, 8, 8)) == (habitual, habitual + controlled)


@pytest.mark.parametrize("name", MODELS)
def test_adaptive_inference_spends_the_flops_it_reports_and_fewer_than_the_full_model(name):
    torch.manual_seed(10)
    model = MODELS[name]().eval()
    with torch.no_grad():
        for unit in halting_units(model):
            unit.bias.fill_(-0.5 if isinstance(model, AdaptiveComputationTime) else 0.0)  # a mix of early and late exits
    x = torch.randn(64, *STROOP_SHAPE[1:]) * 2
    with FlopCounterMode(display=False) as adaptive:
        _, steps_taken = model.forward_adaptive(x)
    with FlopCounterMode(display=False) as full:
        model.forward_steps(x)
    reported = model.compute_of_steps(steps_taken, "flops", x.shape[1:]).sum().item()
    assert adaptive.get_total_flops() == reported
    assert full.get_total_flops() == 64 * model.cumulative_flops(x.shape[1:])[-1].item() > reported


def test_expected_compute_reads_the_last_forward():
    torch.manual_seed(11)
    ponder = MODELS["pondernet"]()
    ponder(torch.randn(STROOP_SHAPE))
    steps = ponder.last_steps
    assert torch.allclose(ponder.expected_compute("steps"), steps.expected_steps)
    cumulative = ponder.cumulative_flops().float()
    assert torch.allclose(ponder.expected_compute("flops"), steps.halting_distribution @ cumulative)
    act = MODELS["act"]()
    act(torch.randn(STROOP_SHAPE))
    assert torch.allclose(act.expected_compute("steps"), act.last_steps.ponder_cost)
    per_step = (act.cumulative_flops()[1] - act.cumulative_flops()[0]).item()
    assert torch.allclose(act.expected_compute("flops"), act.cumulative_flops()[0].item() + (act.last_steps.ponder_cost - 1) * per_step)
    with pytest.raises(UserInputError, match="measure='time'"):
        act.expected_compute("time")
    with pytest.raises(RuntimeError, match="run forward first"):
        MODELS["early_exit"]().expected_compute()
