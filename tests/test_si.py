"""Synaptic Intelligence bookkeeping and penalty (docs/algorithm.md "Synaptic Intelligence")."""

import io

import pytest
import torch
from torch import nn

from tune_bir.si import SynapticIntelligence

CURVATURE = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
LR = 1e-3


def _quadratic(theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-coordinate losses 0.5 * a_i * (theta_i - target_i)^2."""
    return 0.5 * CURVATURE * (theta - target).square()


def _sgd_task(theta: nn.Parameter, si: SynapticIntelligence, target: torch.Tensor, steps: int,
              with_penalty: bool = False) -> torch.Tensor:
    """Plain gradient steps on the quadratic (plus c * L_SI); returns the explicit sum -g * dtheta."""
    path_integral = torch.zeros_like(theta)
    for _ in range(steps):
        theta.grad = None
        loss = _quadratic(theta, target).sum()
        if with_penalty:
            loss = loss + si.loss()
        loss.backward()
        with torch.no_grad():
            before = theta.detach().clone()
            theta -= LR * theta.grad
            path_integral -= theta.grad * (theta - before)
        si.after_step()
    return path_integral


def _parameter() -> nn.Parameter:
    return nn.Parameter(torch.zeros(3, dtype=torch.float64))


def _after_one_task(c: float) -> tuple[nn.Parameter, SynapticIntelligence]:
    """A parameter trained on one quadratic task and consolidated (omega > 0, theta* = theta)."""
    theta = _parameter()
    si = SynapticIntelligence({"theta": theta}, c=c)
    si.begin_task()
    _sgd_task(theta, si, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), steps=200)
    si.end_task()
    return theta, si


def test_w_after_a_task_is_the_explicit_path_integral_and_the_loss_decrease():
    theta = _parameter()
    si = SynapticIntelligence({"theta": theta}, c=1.0)
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    start = _quadratic(theta.detach(), target)
    si.begin_task()
    explicit = _sgd_task(theta, si, target, steps=400)
    decrease = start - _quadratic(theta.detach(), target)
    w = si.state_dict()["W"]["theta"]
    torch.testing.assert_close(w, explicit, rtol=1e-12, atol=0)
    # first order: the loss decrease attributable to each coordinate; on a quadratic each step's decrease is
    # lr*g^2*(1 - a*lr/2) while W gains lr*g^2, so the ratio is exact
    torch.testing.assert_close(w, decrease, rtol=2e-3, atol=0)
    torch.testing.assert_close(w, decrease / (1 - 0.5 * CURVATURE * LR), rtol=1e-9, atol=0)


def test_omega_is_w_over_squared_change_plus_epsilon_summed_over_tasks():
    theta = _parameter()
    si = SynapticIntelligence({"theta": theta}, c=1.0, epsilon=0.1)
    expected = torch.zeros(3, dtype=torch.float64)
    for target in ([1.0, -2.0, 0.5], [-1.0, 0.0, 2.0]):
        start = theta.detach().clone()
        si.begin_task()
        _sgd_task(theta, si, torch.tensor(target, dtype=torch.float64), steps=300)
        w = si.state_dict()["W"]["theta"]
        expected += w / ((theta.detach() - start).square() + 0.1)
        si.end_task()
        state = si.state_dict()
        torch.testing.assert_close(state["omega"]["theta"], expected)
        assert torch.equal(state["theta_star"]["theta"], theta.detach())
    assert (expected > 0).all()


def test_penalty_is_exactly_zero_with_a_gradient_path_before_the_first_end_task():
    theta = _parameter()
    si = SynapticIntelligence({"theta": theta}, c=1e8)
    si.begin_task()
    _sgd_task(theta, si, torch.ones(3, dtype=torch.float64), steps=10)
    theta.grad = None
    loss = si.loss()
    assert loss.item() == 0.0 and loss.requires_grad and loss.device == theta.device
    loss.backward()
    assert torch.equal(theta.grad, torch.zeros(3, dtype=torch.float64))


def test_penalty_value_and_loss_scaling():
    theta, si = _after_one_task(c=3.0)
    state = si.state_dict()
    with torch.no_grad():
        theta += torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    expected = (state["omega"]["theta"] * torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)).sum()
    torch.testing.assert_close(si.penalty(), expected)
    torch.testing.assert_close(si.loss(), 3.0 * expected)


def test_penalty_gradient_pulls_parameters_toward_the_anchor():
    theta, si = _after_one_task(c=1.0)
    anchor = theta.detach().clone()
    with torch.no_grad():
        theta += torch.tensor([0.3, -0.4, 0.2], dtype=torch.float64)
    theta.grad = None
    si.penalty().backward()
    assert torch.equal(torch.sign(theta.grad), torch.sign(theta.detach() - anchor))
    with torch.no_grad():
        moved = theta - 0.1 * theta.grad
    assert ((moved - anchor).abs() < (theta.detach() - anchor).abs()).all()


@pytest.mark.parametrize("grad_before", [None, [0.5, 0.25, -1.0]])
def test_add_penalty_grad_equals_backpropagating_the_loss(grad_before):
    theta, si = _after_one_task(c=3.0)
    with torch.no_grad():
        theta += torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    initial = None if grad_before is None else torch.tensor(grad_before, dtype=torch.float64)
    theta.grad = None if initial is None else initial.clone()
    si.loss().backward()
    expected_grad, expected_loss = theta.grad.clone(), si.loss().detach()
    theta.grad = None if initial is None else initial.clone()
    value = si.add_penalty_grad_()
    torch.testing.assert_close(theta.grad, expected_grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(value, expected_loss, rtol=1e-12, atol=0)
    assert not value.requires_grad


def test_state_dict_round_trip_continues_bit_identically():
    target1 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    target2 = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    theta = _parameter()
    si = SynapticIntelligence({"theta": theta}, c=0.5)
    si.begin_task()
    _sgd_task(theta, si, target1, steps=100)
    si.end_task()
    si.begin_task()
    _sgd_task(theta, si, target2, steps=50, with_penalty=True)

    buffer = io.BytesIO()
    torch.save(si.state_dict(), buffer)
    buffer.seek(0)
    restored_theta = nn.Parameter(theta.detach().clone())
    restored = SynapticIntelligence({"theta": restored_theta}, c=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))

    for param, method in ((theta, si), (restored_theta, restored)):
        _sgd_task(param, method, target2, steps=50, with_penalty=True)
        method.end_task()
    assert torch.equal(theta, restored_theta)
    for key in ("W", "old", "omega", "theta_star"):
        assert torch.equal(si.state_dict()[key]["theta"], restored.state_dict()[key]["theta"])
    assert restored.c == 0.5 and restored.epsilon == 0.1


def test_state_dict_is_a_copy_not_a_view_of_the_buffers():
    theta = _parameter()
    si = SynapticIntelligence({"theta": theta}, c=1.0)
    state = si.state_dict()
    si.begin_task()
    _sgd_task(theta, si, torch.ones(3, dtype=torch.float64), steps=5)
    assert torch.equal(state["W"]["theta"], torch.zeros(3, dtype=torch.float64))


def test_load_state_dict_with_a_missing_name_raises():
    a, b = _parameter(), _parameter()
    state = SynapticIntelligence({"a": a}, c=1.0).state_dict()
    with pytest.raises(KeyError, match="missing \\['b'\\]"):
        SynapticIntelligence({"a": a, "b": b}, c=1.0).load_state_dict(state)


def test_load_state_dict_with_an_extra_name_raises():
    a, b = _parameter(), _parameter()
    state = SynapticIntelligence({"a": a, "b": b}, c=1.0).state_dict()
    with pytest.raises(KeyError, match="unexpected \\['b'\\]"):
        SynapticIntelligence({"a": a}, c=1.0).load_state_dict(state)


def test_load_state_dict_with_a_wrong_shape_raises():
    state = SynapticIntelligence({"a": _parameter()}, c=1.0).state_dict()
    with pytest.raises(ValueError, match="shape"):
        SynapticIntelligence({"a": nn.Parameter(torch.zeros(4))}, c=1.0).load_state_dict(state)


def test_parameters_outside_the_scope_get_nothing():
    layer = nn.Linear(3, 2)
    si = SynapticIntelligence({"weight": layer.weight}, c=1.0)
    si.begin_task()
    for _ in range(5):
        layer.zero_grad()
        (layer(torch.randn(8, 3)) - 1.0).square().mean().backward()
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.1 * p.grad
        si.after_step()
    si.end_task()
    with torch.no_grad():
        layer.weight.add_(0.1)
        layer.bias.add_(0.1)
    for key in ("W", "old", "omega", "theta_star"):
        assert set(si.state_dict()[key]) == {"weight"}
    layer.zero_grad(set_to_none=True)
    si.penalty().backward()
    assert layer.bias.grad is None and layer.weight.grad.abs().sum() > 0


def test_after_step_uses_given_gradients_and_treats_none_as_zero():
    a, b = _parameter(), _parameter()
    si = SynapticIntelligence({"a": a, "b": b}, c=1.0)
    si.begin_task()
    a.grad = torch.full((3,), 100.0, dtype=torch.float64)  # a second objective's gradient, to be ignored
    with torch.no_grad():
        a += 0.5
        b += 0.5
    si.after_step({"a": torch.ones(3, dtype=torch.float64), "b": None})
    state = si.state_dict()
    torch.testing.assert_close(state["W"]["a"], torch.full((3,), -0.5, dtype=torch.float64))
    assert torch.equal(state["W"]["b"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(state["old"]["b"], b.detach())  # the step is still consumed
    with pytest.raises(KeyError, match="'b'"):
        si.after_step({"a": torch.ones(3, dtype=torch.float64)})


def test_after_step_without_gradient_counts_zero():
    theta = _parameter()
    si = SynapticIntelligence({"theta": theta}, c=1.0)
    si.begin_task()
    with torch.no_grad():
        theta += 1.0
    si.after_step()
    assert torch.equal(si.state_dict()["W"]["theta"], torch.zeros(3, dtype=torch.float64))


def test_begin_task_resets_w_but_keeps_omega():
    theta = _parameter()
    si = SynapticIntelligence({"theta": theta}, c=1.0)
    si.begin_task()
    _sgd_task(theta, si, torch.ones(3, dtype=torch.float64), steps=20)
    si.end_task()
    omega = si.state_dict()["omega"]["theta"]
    si.begin_task()
    state = si.state_dict()
    assert torch.equal(state["W"]["theta"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(state["omega"]["theta"], omega) and (omega > 0).all()


@pytest.mark.parametrize(("c", "epsilon"), [(-1.0, 0.1), (1.0, 0.0), (1.0, -0.1)])
def test_invalid_hyper_parameters_raise(c, epsilon):
    with pytest.raises(ValueError):
        SynapticIntelligence({"theta": _parameter()}, c=c, epsilon=epsilon)
