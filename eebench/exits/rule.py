"""The exit rule and the one-pass threshold sweep.

A sample leaves at the first internal layer m < M whose signal meets the exit condition, else at
layer M; its prediction is the argmax of that layer. The decision at m depends only on layers
1..m, so every threshold can be simulated from the logits of all layers computed in one pass.
Training (COSEE), sweeping, the inference engine and analysis all call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eebench.data.metrics import get_metric
from eebench.errors import EebenchError
from eebench.exits.metrics import (
    difficulty_inversion_by_layer,
    exit_counts,
    exit_counts_by_label,
    exit_decision_rates,
    speedup_ratios,
)
from eebench.exits.policies import ExitPolicy, get_policy
from eebench.exits.signals import Signal


def exit_layers_from_scores(scores: torch.Tensor, signal: Signal | ExitPolicy, thresholds) -> torch.Tensor:
    """Scores [N, M] and T thresholds -> LongTensor [T, N] of 1-based exit layers (``signal``: a
    signal or an exit policy: anything with ``meets``).

    Comparisons are made in float64, as in true early exit, so that a threshold is never
    rounded onto a score."""
    scores = scores.double()
    thr = torch.as_tensor(thresholds, dtype=torch.float64, device=scores.device).reshape(-1, 1, 1)
    m = scores.shape[-1]
    if m == 1:  # no internal exit (a 1-layer model): every sample leaves at its only layer
        return torch.ones(thr.shape[0], scores.shape[0], dtype=torch.long, device=scores.device)
    meets = signal.meets(scores[None, :, : m - 1], thr)  # [T, N, M-1]
    first = meets.to(torch.uint8).argmax(-1)  # first True (argmax returns the first maximum)
    return torch.where(meets.any(-1), first + 1, torch.full_like(first, m))


def simulate_exits(layer_logits, signal: str | Signal | ExitPolicy, thresholds) -> torch.Tensor:
    """1-based exit layers, LongTensor [T, N], for T thresholds: ``layer_logits`` is logits
    [N, M, C] or an ``ExitOutput`` (needed by policies that read exit features)."""
    pol = get_policy(signal)
    _check_inputs(pol, layer_logits)
    return exit_layers_from_scores(pol.scores(layer_logits), pol, thresholds)


def _check_inputs(pol: ExitPolicy, layer_logits) -> None:
    if pol.uses_model and (isinstance(layer_logits, torch.Tensor) or pol.model is None):
        raise EebenchError(
            f"exit policy {pol.name!r} reads the model's own modules: simulate it from the model's output "
            f"(ExitOutput) with get_policy({pol.name!r}, model=model), or sweep its cached values (scores=...)")


def predictions_at_exit(layer_logits: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
    """Argmax of the layer each sample left at: [N, M, C] + [T, N] -> [T, N]."""
    preds = layer_logits.argmax(-1)  # [N, M]
    return preds.T.gather(0, exit_layers - 1) if exit_layers.dim() == 2 else preds.gather(
        1, (exit_layers - 1).unsqueeze(1)
    ).squeeze(1)


def threshold_grid(scores: torch.Tensor, signal: Signal | ExitPolicy, n: int = 100) -> torch.Tensor:
    """Thresholds spread over the observed range of internal-layer scores.

    Continuous signals: quantiles of the observed values (so that points spread evenly over exit
    behaviour, not over raw values), widened just past both ends so that "nobody exits early"
    and "everybody exits at layer 1" are in the grid. Patience: every integer 1..M-1. A policy
    with a fixed operating point (``ExitPolicy.fixed_threshold``): that threshold only.
    """
    m = scores.shape[-1]
    fixed = getattr(signal, "fixed_threshold", None)
    if fixed is not None:
        return torch.tensor([float(fixed)], dtype=torch.float64)
    if signal.integer:
        return torch.arange(1, max(m, 2), dtype=torch.float64)
    vals = scores[:, : m - 1].reshape(-1).double()
    if vals.numel() == 0:
        return torch.tensor([0.5], dtype=torch.float64)
    q = torch.quantile(vals, torch.linspace(0, 1, max(n - 2, 1), dtype=torch.float64))
    span = (vals.max() - vals.min()).clamp_min(1e-6)
    ends = torch.stack([vals.min() - 1e-3 * span, vals.max() + 1e-3 * span])
    return torch.unique(torch.cat([ends, q]))


def pareto_front(speedups, scores) -> torch.Tensor:
    """Indices of non-dominated points (no other point is at least as fast and as good, and
    better in one), sorted by speed-up ascending."""
    s = torch.as_tensor(speedups, dtype=torch.float64)
    v = torch.as_tensor(scores, dtype=torch.float64)
    # Sort by speed-up descending, then score descending (two stable sorts); a point is on the
    # front when its score beats every faster (or equally fast, listed earlier) point's score.
    idx = torch.argsort(-v, stable=True)
    idx = idx[torch.argsort(-s[idx], stable=True)]
    vs = v[idx]
    best_before = torch.cat([vs.new_tensor([-float("inf")]), torch.cummax(vs, 0).values[:-1]])
    keep = idx[vs > best_before]
    return keep[torch.argsort(s[keep], stable=True)]


def metric_at_speedup(speedups, scores, target: float) -> float:
    """Best score among points at least ``target`` times faster (NaN if none reach it)."""
    s = torch.as_tensor(speedups, dtype=torch.float64)
    v = torch.as_tensor(scores, dtype=torch.float64)
    ok = s >= target - 1e-9
    return float(v[ok].max()) if ok.any() else float("nan")


def front_staircase(speedups, scores, grid) -> torch.Tensor:
    """The staircase the summaries use, "best score at speed-up >= x", at every x of ``grid``
    (NaN where no point is that fast): ``metric_at_speedup`` vectorised over targets."""
    s = torch.as_tensor(speedups, dtype=torch.float64)
    v = torch.as_tensor(scores, dtype=torch.float64)
    g = torch.as_tensor(grid, dtype=torch.float64)
    ok = s[None, :] >= g[:, None] - 1e-9  # [G, P]
    best = torch.where(ok, v[None, :], torch.full_like(ok, -torch.inf, dtype=torch.float64)).max(dim=1).values
    return torch.where(ok.any(dim=1), best, torch.full_like(best, torch.nan))


def mean_front(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Seeds aggregated: the mean (and min, max) over curves of their staircases, at every speed-up
    where one of them changes, up to the fastest speed-up that *every* curve reaches (beyond it a
    mean would silently drop seeds). Returns (speedups, mean, min, max), speed-up ascending."""
    grid = sorted({float(x) for s, _ in curves for x in s})
    if not grid:
        return [], [], [], []
    stairs = torch.stack([front_staircase(s, v, grid) for s, v in curves])  # [K, G]
    keep = ~stairs.isnan().any(dim=0)
    stairs, g = stairs[:, keep], torch.tensor(grid, dtype=torch.float64)[keep]
    return g.tolist(), stairs.mean(0).tolist(), stairs.min(0).values.tolist(), stairs.max(0).values.tolist()


def area_under_front(speedups, scores, num_layers: int) -> float:
    """Area under the staircase "best score at speed-up >= s" for s in [1, M], divided by M - 1:
    a score-weighted mean over the whole range of possible speed-ups (unreached speed-ups count 0)."""
    front = pareto_front(speedups, scores)
    s = torch.as_tensor(speedups, dtype=torch.float64)[front]
    v = torch.as_tensor(scores, dtype=torch.float64)[front]
    if num_layers <= 1:
        return float(v.max())
    area, left = 0.0, 1.0
    for si, vi in zip(s.tolist(), v.tolist(), strict=True):  # ascending speed-up, descending score
        right = min(si, float(num_layers))
        if right > left:
            area += (right - left) * vi
            left = right
    return area / (num_layers - 1)


@dataclass
class Sweep:
    """Every threshold of one signal on one set of cached logits."""

    signal: str
    num_layers: int
    thresholds: torch.Tensor  # [T]
    exit_layers: torch.Tensor  # [T, N]
    counts: torch.Tensor  # [T, M]
    speedups: torch.Tensor  # [T]
    metrics: dict[str, torch.Tensor]  # name -> [T]
    premature: torch.Tensor  # [T]
    delayed: torch.Tensor  # [T]
    main_metric: str = "accuracy"
    counts_by_label: torch.Tensor | None = None  # [T, C, M]: exit layers split by gold label
    dis: list[float] = field(default_factory=list)  # [M]: difficulty inversion score of each layer
    extra: dict = field(default_factory=dict)

    def front(self) -> torch.Tensor:
        return pareto_front(self.speedups, self.metrics[self.main_metric])

    def at_speedup(self, target: float) -> float:
        return metric_at_speedup(self.speedups, self.metrics[self.main_metric], target)

    def area(self) -> float:
        return area_under_front(self.speedups, self.metrics[self.main_metric], self.num_layers)

    def records(self) -> list[dict]:
        """One plain dict per threshold (for JSON, CSV and MLflow)."""
        front = set(self.front().tolist())
        out = []
        for t in range(len(self.thresholds)):
            rec = {
                "threshold": float(self.thresholds[t]),
                "speedup": float(self.speedups[t]),
                "exit_counts": [int(c) for c in self.counts[t]],
                "premature_rate": float(self.premature[t]),
                "delayed_rate": float(self.delayed[t]),
                "pareto": t in front,
            }
            if self.counts_by_label is not None:
                rec["exit_counts_by_label"] = self.counts_by_label[t].tolist()
            rec.update({k: float(v[t]) for k, v in self.metrics.items()})
            out.append(rec)
        return out


def sweep(
    layer_logits: torch.Tensor,
    labels: torch.Tensor,
    signal: str | Signal | ExitPolicy,
    thresholds=None,
    metrics: tuple[str, ...] = ("accuracy",),
    num_thresholds: int = 100,
    scores: torch.Tensor | None = None,
) -> Sweep:
    """Simulate every threshold at once from cached logits [N, M, C] and score each.

    ``scores`` [N, M]: the policy's cached values (policies that read the method's modules);
    None: computed from the logits (signals)."""
    sig = get_policy(signal)
    sig.check_task(layer_logits.shape[-1])
    labels = torch.as_tensor(labels).to(layer_logits.device)
    if scores is None:
        _check_inputs(sig, layer_logits)
        scores = sig.scores(layer_logits)
    if thresholds is None:
        thresholds = threshold_grid(scores, sig, num_thresholds)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    m = layer_logits.shape[1]
    el = exit_layers_from_scores(scores, sig, thresholds.to(scores.device))
    preds = predictions_at_exit(layer_logits, el)
    correct = layer_logits.argmax(-1) == labels.unsqueeze(1)
    premature, delayed = exit_decision_rates(el, correct)
    by_label = None
    if not labels.is_floating_point():  # classification: exits split by gold label
        by_label = exit_counts_by_label(el, labels, m, layer_logits.shape[-1]).cpu()
    return Sweep(
        signal=sig.name,
        num_layers=m,
        thresholds=thresholds.cpu(),
        exit_layers=el.cpu(),
        counts=exit_counts(el, m).cpu(),
        speedups=speedup_ratios(el, m).cpu(),
        metrics={name: get_metric(name).batched(preds, labels).cpu() for name in metrics},
        premature=premature.cpu(),
        delayed=delayed.cpu(),
        main_metric=metrics[0],
        counts_by_label=by_label,
        dis=difficulty_inversion_by_layer(scores, correct, sig.higher_is_easier),
    )
