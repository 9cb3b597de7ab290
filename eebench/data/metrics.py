"""Task metrics (accuracy, F1, Matthews, Pearson, Spearman), as GLUE defines them and task specs
name them.

Single evaluations use scikit-learn / scipy. Sweeps evaluate hundreds of thresholds at once, so
the classification metrics also have vectorised versions over a [T, N] batch of predictions;
tests check them against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import stats
from sklearn import metrics as skm

from eebench.errors import EebenchError


def accuracy(preds, labels) -> float:
    return float(skm.accuracy_score(np.asarray(labels), np.asarray(preds)))


def f1(preds, labels) -> float:
    return float(skm.f1_score(np.asarray(labels), np.asarray(preds), zero_division=0))


def matthews(preds, labels) -> float:
    return float(skm.matthews_corrcoef(np.asarray(labels), np.asarray(preds)))


def pearson(preds, labels) -> float:
    return float(stats.pearsonr(np.asarray(preds, dtype=float), np.asarray(labels, dtype=float))[0])


def spearman(preds, labels) -> float:
    return float(stats.spearmanr(np.asarray(preds, dtype=float), np.asarray(labels, dtype=float))[0])


def _batched_accuracy(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (preds == labels).double().mean(-1)


def _confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[T, N] predictions -> [T, C, C] confusion matrices (rows: true label)."""
    t = preds.shape[0]
    idx = labels.long().expand_as(preds) * num_classes + preds.long()
    conf = torch.zeros(t, num_classes * num_classes, dtype=torch.double, device=preds.device)
    conf.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.double))
    return conf.view(t, num_classes, num_classes)


def _batched_f1(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary F1 of the positive class 1 (GLUE's MRPC / QQP F1); 0 where undefined (sklearn)."""
    pos_pred, pos_true = preds == 1, (labels == 1).expand_as(preds)
    tp = (pos_pred & pos_true).sum(-1).double()
    denom = pos_pred.sum(-1).double() + pos_true.sum(-1).double()
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def _batched_matthews(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-class MCC (Gorodkin), as scikit-learn computes it; 0 where undefined."""
    num_classes = int(max(preds.max().item(), labels.max().item())) + 1
    c = _confusion(preds, labels, num_classes)
    t_k, p_k = c.sum(2), c.sum(1)
    n, correct = c.sum((1, 2)), c.diagonal(dim1=1, dim2=2).sum(-1)
    cov_ytyp = correct * n - (t_k * p_k).sum(-1)
    cov_ypyp = n * n - (p_k * p_k).sum(-1)
    cov_ytyt = n * n - (t_k * t_k).sum(-1)
    denom = torch.sqrt(cov_ytyt * cov_ypyp)
    return torch.where(denom > 0, cov_ytyp / denom.clamp_min(1e-300), torch.zeros_like(denom))


class Metric:
    """A task metric: ``fn(preds, labels)`` once; ``batched(preds [T, N], labels [N])`` for sweeps."""

    def __init__(self, name: str, fn: Callable, batched: Callable | None, regression: bool = False):
        self.name, self.fn, self._batched, self.regression = name, fn, batched, regression

    def __call__(self, preds, labels) -> float:
        return self.fn(preds, labels)

    def batched(self, preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._batched is not None:
            return self._batched(preds, labels.to(preds.device))
        return torch.tensor([self.fn(p.cpu().numpy(), labels.cpu().numpy()) for p in preds], dtype=torch.double)


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", accuracy, _batched_accuracy),
    "f1": Metric("f1", f1, _batched_f1),
    "matthews": Metric("matthews", matthews, _batched_matthews),
    "pearson": Metric("pearson", pearson, None, regression=True),
    "spearman": Metric("spearman", spearman, None, regression=True),
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise EebenchError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def compute_metrics(names: list[str], preds, labels) -> dict[str, float]:
    return {n: get_metric(n)(preds, labels) for n in names}


def majority_score(name: str, labels) -> float:
    """Metric ``name`` of always answering the most frequent class of ``labels`` (the first on a
    tie): the floor an exit classifier must clear to be of any use (accuracy: that class's share;
    Matthews: 0; F1: 0 unless the positive class is the majority)."""
    labels = np.asarray(labels).astype(np.int64)
    return get_metric(name)(np.full(len(labels), int(np.bincount(labels).argmax())), labels)


