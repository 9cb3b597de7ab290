"""Speed-up (the COSEE paper's Eq. 12) and early-exit analysis metrics. The task metrics
(accuracy, F1, ...) are ``eebench.data.metrics``."""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics as skm


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def exit_counts(exit_layers: torch.Tensor, num_layers: int) -> torch.Tensor:
    """N_m: how many samples leave at each layer. [N] -> [M], [T, N] -> [T, M]."""
    exit_layers = _as_tensor(exit_layers).long()
    flat = exit_layers.reshape(-1, exit_layers.shape[-1])
    counts = torch.zeros(flat.shape[0], num_layers, dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, flat - 1, torch.ones_like(flat))
    return counts.reshape(*exit_layers.shape[:-1], num_layers)


def speedup_ratios(exit_layers: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Eq. 12 for each row of a [T, N] tensor of 1-based exit layers: M * N / sum_m m * N_m."""
    exit_layers = _as_tensor(exit_layers).long()
    if exit_layers.numel() and (exit_layers.min() < 1 or exit_layers.max() > num_layers):
        raise ValueError(f"exit layers must lie in 1..{num_layers}")
    n = exit_layers.shape[-1]
    return num_layers * n / exit_layers.sum(-1).double()


def speedup_ratio(exit_layers, num_layers: int) -> float:
    """Eq. 12: (M * N) / sum_m (m * N_m) for 1-based exit layers of N samples; 1.0 = no saving."""
    exit_layers = _as_tensor(exit_layers).reshape(-1)
    if exit_layers.numel() == 0:
        raise ValueError("speed-up of an empty set of samples is undefined")
    return float(speedup_ratios(exit_layers, num_layers))


# --------------------------------------------------------------------------- analysis metrics


def difficulty_inversion_score(scores: torch.Tensor, correct: torch.Tensor, higher_is_easier: bool) -> float:
    """DIS (CascadeBERT): AUROC of the signal, oriented so that higher = harder, at telling wrong
    predictions from right ones; ties count half. NaN when a layer is all right or all wrong."""
    wrong = (~correct.bool()).cpu().numpy()
    if wrong.all() or not wrong.any():
        return float("nan")
    hardness = (-scores if higher_is_easier else scores).double().cpu().numpy()
    return float(skm.roc_auc_score(wrong, hardness))


def difficulty_inversion_by_layer(scores: torch.Tensor, correct: torch.Tensor, higher_is_easier: bool) -> list[float]:
    """DIS of every layer: scores [N, M], correct [N, M] -> M values (NaN where undefined)."""
    return [difficulty_inversion_score(scores[:, m], correct[:, m], higher_is_easier) for m in range(scores.shape[1])]


def exit_counts_by_label(exit_layers: torch.Tensor, labels: torch.Tensor, num_layers: int,
                         num_classes: int) -> torch.Tensor:
    """How many samples of each gold label leave at each layer: [T, N] x [N] -> [T, C, M]."""
    el = _as_tensor(exit_layers).long()
    el = el.unsqueeze(0) if el.dim() == 1 else el
    idx = _as_tensor(labels).long().to(el.device).unsqueeze(0) * num_layers + (el - 1)
    counts = torch.zeros(el.shape[0], num_classes * num_layers, dtype=torch.long, device=el.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    return counts.view(el.shape[0], num_classes, num_layers)


def exit_decision_rates(exit_layers: torch.Tensor, correct: torch.Tensor):
    """Premature and delayed exiting rates for a [T, N] exit-layer tensor.

    ``correct`` [N, M]: is layer m's prediction right. A sample that leaves at m* took "continue"
    decisions at internal layers < m* and an "exit" decision at m* if m* < M.
    Premature = exits taken at a wrong layer / all exits at internal layers.
    Delayed = continues taken at an already-right layer / all continues.
    Returns two [T] tensors (NaN where there were no such decisions).
    """
    n, m = correct.shape
    el = exit_layers.long()  # [T, N]
    # right_before[n, k] = how many of layers 1..k are right (k = 0..M-1), read at k = m* - 1
    right_before = torch.zeros(n, m, dtype=torch.long, device=correct.device)
    right_before[:, 1:] = correct[:, : m - 1].long().cumsum(1)
    delayed_n = right_before.T.gather(0, el - 1).sum(1).double()
    n_cont = (el - 1).sum(1).double()
    internal_exit = el < m
    wrong_at_exit = ~correct.T.gather(0, el - 1)
    premature = (internal_exit & wrong_at_exit).sum(1).double() / internal_exit.sum(1).double()
    return premature, delayed_n / n_cont
