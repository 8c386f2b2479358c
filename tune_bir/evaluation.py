"""Evaluation: per-task scores of a model and the accuracy metrics of docs/algorithm.md "Evaluation metrics"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from tune_bir.data import Split
from tune_bir.hidden import EVAL_BATCH
from tune_bir.model import BIRModel
from tune_bir.scenario import Scenario


@dataclass
class SplitScores:
    """Per-task scores on one split, tasks 1..seen."""

    accuracy: list[float]       # share of samples whose argmax over the active columns is right
    probability: list[float]    # mean softmax probability (over the active columns) of the true class


@torch.no_grad()
def scores(model: BIRModel, tasks: list[Split], scenario: Scenario, seen: int) -> SplitScores:
    """Accuracy and mean true-class probability on each of the first `seen` tasks.

    Predictions are the argmax over the active columns; probabilities are the softmax over them.
    """
    was_training = model.training
    model.eval()
    accuracy, probability = [], []
    for k in range(1, seen + 1):
        cols = scenario.columns(k, seen)
        data = tasks[k - 1]
        logits = torch.cat([model.predict(data.x[i:i + EVAL_BATCH])[:, cols]
                            for i in range(0, len(data.y), EVAL_BATCH)])
        target = scenario.targets(data.y, k)
        acc = multiclass_accuracy(logits.argmax(1), target, num_classes=logits.shape[1], average="micro")
        accuracy.append(float(acc))
        probability.append(float(torch.softmax(logits, 1).gather(1, target[:, None]).mean()))
    model.train(was_training)
    return SplitScores(accuracy, probability)


def accuracy_metrics(row: list[float], history: list[list[float]], prefix: str) -> dict[str, float]:
    """acc_avg, acc_task_<k>, bwt and forgetting_avg from the current row and finished rows
    (docs/algorithm.md "Evaluation metrics")."""
    t = len(row)
    metrics = {f"{prefix}acc_task_{k + 1}": acc for k, acc in enumerate(row)}
    metrics[f"{prefix}acc_avg"] = sum(row) / t
    previous = range(t - 1)
    if t > 1:
        metrics[f"{prefix}bwt"] = sum(row[k] - history[k][k] for k in previous) / (t - 1)
        metrics[f"{prefix}forgetting_avg"] = sum(
            max(history[l][k] for l in range(k, t - 1)) - row[k] for k in previous) / (t - 1)
    else:
        metrics[f"{prefix}bwt"] = 0.0
        metrics[f"{prefix}forgetting_avg"] = 0.0
    return metrics


@torch.no_grad()
def outputs_finite(model: BIRModel, task: Split) -> bool:
    """Weights, and the model's outputs on a few inputs of `task`, are all finite (no divergence)."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return False
    h, y = task.x[:64], task.y[:64]
    e = model.encode(h)
    outputs = [e, model.classify(e)]
    if model.spec.decoder:
        mu, logvar = model.posterior(e)
        gate = F.one_hot(y, model.spec.n_classes).float() if model.gated else None
        outputs += [mu, logvar, model.decode(mu, gate)]
    return all(bool(torch.isfinite(o).all()) for o in outputs)
