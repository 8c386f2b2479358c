"""EWC and online EWC (tune_bir/ewc.py): the Fisher against a closed form, the penalty, the engine and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tune_bir.config import BIRConfig
from tune_bir.data import Split
from tune_bir.engine import Engine
from tune_bir.errors import ConfigError
from tune_bir.ewc import EWC, diagonal_fisher
from tune_bir.plugin import TaskInfo
from tune_bir.train import config_from_args, method_label


class Softmax(nn.Module):
    """A linear softmax classifier: its log-likelihood gradient has a closed form."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[0.5, -1.0, 0.2], [0.1, 0.3, -0.4], [-0.6, 0.2, 0.9],
                                                   [1.1, -0.3, 0.0]]))
            self.linear.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


X = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 0.0], [-1.0, 0.0, 2.0]])
Y = torch.tensor([1, 0, 1])


def closed_form_fisher(model: Softmax, columns: slice, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(-log softmax(Wx+b)_l)/dW = (p - e_l) x^T, d/db = p - e_l (softmax over the active columns only)."""
    w, b = model.linear.weight.detach()[columns], model.linear.bias.detach()[columns]
    fisher_w, fisher_b = torch.zeros_like(model.linear.weight), torch.zeros_like(model.linear.bias)
    for x, label in zip(X, labels, strict=True):
        p = torch.softmax(w @ x + b, 0)
        r = p - torch.nn.functional.one_hot(label, len(p)).float()
        fisher_w[columns] += torch.outer(r, x) ** 2
        fisher_b[columns] += r ** 2
    return {"linear.weight": fisher_w / len(X), "linear.bias": fisher_b / len(X)}


@pytest.mark.parametrize("empirical", [True, False])
def test_the_fisher_is_the_mean_squared_log_likelihood_gradient(empirical):
    model = Softmax()
    params = dict(model.named_parameters())
    columns = slice(0, 2)   # two active classes: the other outputs get no gradient, F = 0 there
    fisher = diagonal_fisher(model, params, X, Y, columns, empirical)
    labels = Y if empirical else model.predict(X)[:, columns].argmax(1)
    expected = closed_form_fisher(model, columns, labels)
    for name in params:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-6, atol=1e-8)
    assert fisher["linear.weight"][2:].abs().sum() == 0 and fisher["linear.weight"][:2].abs().sum() > 0
    assert model.training   # back in training mode


def _info(task: int) -> TaskInfo:
    return TaskInfo(task, Split(X, Y), slice(0, 2), lambda y: y)


@pytest.mark.parametrize("online", [False, True])
def test_the_penalty_is_half_the_fisher_weighted_squared_distance(online):
    model = Softmax()
    ewc = EWC(model, weight=2.0, fisher_n=None, online=online, gamma=0.5, empirical=True)
    assert ewc.before_backward() is None                       # nothing consolidated yet: inert in task 1
    ewc.after_task(_info(1))
    first = closed_form_fisher(model, slice(0, 2), Y)
    star1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ewc.before_backward() == 0                          # theta = theta*
    with torch.no_grad():
        model.linear.weight.add_(0.1)
    ewc.after_task(_info(2))
    second = closed_form_fisher(model, slice(0, 2), Y)
    star2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.linear.weight.mul_(1.5)
        model.linear.bias.add_(-0.2)
    params = dict(model.named_parameters())
    if online:   # one running term: F = gamma * F_1 + F_2, anchored at theta*_2, penalised as gamma * F
        fisher = {n: 0.5 * first[n] + second[n] for n in params}
        expected = sum(0.5 * (0.5 * fisher[n] * (p - star2[n]) ** 2).sum() for n, p in params.items())
    else:
        expected = sum(0.5 * (f[n] * (p - s[n]) ** 2).sum()
                       for f, s in ((first, star1), (second, star2)) for n, p in params.items())
    torch.testing.assert_close(ewc.before_backward(), expected, rtol=1e-6, atol=0)
    assert len(ewc.anchors) == (1 if online else 2)


def test_fisher_n_caps_the_samples_of_the_estimate():
    model = Softmax()
    ewc = EWC(model, weight=1.0, fisher_n=1, online=False, gamma=1.0, empirical=True)
    ewc.after_task(_info(1))
    one = diagonal_fisher(model, dict(model.named_parameters()), X[:1], Y[:1], slice(0, 2), True)
    torch.testing.assert_close(ewc.anchors[0][0]["linear.weight"], one["linear.weight"])


BIR = dict(experiment="splitMNIST5k", replay="generative", brain_inspired=True, si=True, c=0.1, device="cpu",
           batch=32, seed=0, iters=4, fc_units=50, ewc=True, fisher_n=64)


def test_ewc_in_the_engine_acts_from_task_two_and_continues_from_a_checkpoint():
    engine = Engine(BIRConfig(**BIR, online=True, gamma=0.9))
    first = engine.train_task()
    assert "loss/ewc" not in first                             # no penalty before a task is consolidated
    state = copy.deepcopy(engine.state_dict())   # state_dict() holds the live tensors
    second = engine.train_task()
    assert second["loss/ewc"] > 0
    resumed = Engine(BIRConfig(**BIR, online=True, gamma=0.9))
    resumed.load_state_dict(state)
    again = resumed.train_task()
    assert again == {**second, "time_this_step_s": again["time_this_step_s"]}


def test_cli_takes_the_original_flags():
    cfg = config_from_args(["--replay=generative", "--brain-inspired", "--si", "--ewc", "--lambda", "5000",
                            "--fisher-n", "100", "--online", "--gamma", "0.8", "--emp-fi"])
    assert (cfg.ewc, cfg.ewc_lambda, cfg.fisher_n, cfg.online, cfg.gamma, cfg.emp_fi) == (
        True, 5000.0, 100, True, 0.8, True)
    assert method_label(cfg) == "BI-R+SI+EWC"


@pytest.mark.parametrize("argv, message", [
    (["--online"], "--online needs --ewc"),
    (["--lambda", "10"], "--lambda acts only with --ewc"),
    (["--ewc", "--fisher-n", "0"], "--fisher-n must be >= 1"),
    (["--ewc", "--lambda", "-1"], "--lambda must be >= 0"),
])
def test_bad_ewc_flags_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_args(argv)
    assert "\n" not in str(info.value)
