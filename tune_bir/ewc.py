"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) and online EWC (Schwarz et al., 2018) as one plugin
(docs/algorithm.md "Elastic Weight Consolidation"): `--ewc --lambda --fisher-n --online --gamma --emp-fi`, the
options of the original research code with its meanings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from tune_bir.fields import Field
from tune_bir.plugin import Plugin, PluginContext, TaskInfo, register

if TYPE_CHECKING:
    from tune_bir.config import BIRConfig
    from tune_bir.model import BIRModel


def diagonal_fisher(model: BIRModel, params: dict[str, torch.nn.Parameter], x: Tensor, y: Tensor,
                    columns: slice, empirical: bool) -> dict[str, Tensor]:
    """The diagonal of the Fisher information of the classifier's log-likelihood, averaged over the samples:
    mean_i (d/dtheta log p(label_i | x_i))^2, one sample at a time, in eval mode.

    label_i is the true label with `empirical` (`--emp-fi`), else the model's most likely class (the original's
    choice); only the active output `columns` are scored.
    """
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    for i in range(len(x)):
        logits = model.predict(x[i:i + 1])[:, columns]
        label = y[i:i + 1] if empirical else logits.argmax(1).detach()
        grads = torch.autograd.grad(F.cross_entropy(logits, label), list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                fisher[n] += g.square()
    model.train(was_training)
    return {n: f / max(len(x), 1) for n, f in fisher.items()}


@register
class EWC(Plugin):
    """`--ewc`: after each task, the diagonal Fisher information F and the parameters theta* are stored; before
    every backward pass the penalty 1/2 sum F (theta - theta*)^2 (one term per finished task; with `--online`
    one running term, F <- gamma F + F_new and the penalty on gamma F) enters the loss weighted by `--lambda`.

    Scope: every trainable parameter of the model (as the original); only those the classifier's output
    depends on get a non-zero Fisher.
    """

    name = "ewc"
    label = "EWC"
    switch = Field.switch("ewc", "Elastic Weight Consolidation: a Fisher-weighted quadratic penalty per finished task")
    # `--lambda`, the original's flag, is a Python keyword: the field is its `dest`
    weight_field = Field.weight("ewc_lambda", 1.0, "EWC strength, with --ewc (the original's --lambda)",
                                flag="--lambda")
    options = (   # the bool ones (--online, --emp-fi) are off in a sweep's baseline and refused without --ewc
        Field("fisher_n", int | None, None, "samples per Fisher estimate, with --ewc (default: all of the task's)",
              minimum=1),
        Field("online", bool, False, "online EWC: one running Fisher, decayed by --gamma (with --ewc)"),
        Field("gamma", float, 1.0, "online EWC's forgetting coefficient (with --ewc --online)", minimum=0.0),
        Field("emp_fi", bool, False, "empirical Fisher: the true labels instead of the model's most likely class "
              "(with --ewc)"),
    )
    off_in_baseline = True                     # `--space ewc` compares BI-R+SI+EWC with BI-R+SI

    @classmethod
    def from_config(cls, cfg: BIRConfig, context: PluginContext) -> EWC:
        return cls(context.model, cfg.ewc_lambda, cfg.fisher_n, cfg.online, cfg.gamma, cfg.emp_fi)

    def __init__(self, model: BIRModel, weight: float, fisher_n: int | None, online: bool, gamma: float,
                 empirical: bool):
        self.model, self.weight, self.fisher_n, self.online = model, weight, fisher_n, online
        self.gamma, self.empirical = gamma, empirical
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # one (Fisher, theta*) pair per finished task; a single running pair with --online
        self.anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def after_task(self, info: TaskInfo) -> None:
        n = len(info.train.y) if self.fisher_n is None else min(self.fisher_n, len(info.train.y))
        x, y = info.train.x[:n], info.targets(info.train.y[:n])
        fisher = diagonal_fisher(self.model, self.params, x, y, info.columns, self.empirical)
        star = {name: p.detach().clone() for name, p in self.params.items()}
        if self.online and self.anchors:
            previous, _ = self.anchors[0]
            fisher = {name: f + self.gamma * previous[name] for name, f in fisher.items()}
            self.anchors = []
        self.anchors.append((fisher, star))

    def before_backward(self) -> Tensor | None:
        """1/2 sum over stored tasks of sum F (theta - theta*)^2 (online: of gamma F); None before task 1 ends."""
        if not self.anchors:
            return None
        scale = self.gamma if self.online else 1.0
        terms = [(scale * fisher[n] * (p - star[n]).square()).sum()
                 for fisher, star in self.anchors for n, p in self.params.items()]
        return 0.5 * torch.stack(terms).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": [{"fisher": dict(f), "theta_star": dict(s)} for f, s in self.anchors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = []
        for anchor in state["anchors"]:
            fisher, star = anchor["fisher"], anchor["theta_star"]
            if set(fisher) != set(self.params) or set(star) != set(self.params):
                raise ValueError("the EWC state does not match this model's parameters")
            self.anchors.append(({n: fisher[n].to(p.device) for n, p in self.params.items()},
                                 {n: star[n].to(p.device) for n, p in self.params.items()}))
