"""Operating points chosen on data they are not scored on, with an optional finite-sample guarantee.

"Metric at 2x" read off a sweep is an *oracle*: the threshold is chosen on the dev set it is
scored on. This module does the honest equivalent from cached dev logits [N, M, C]:

* **Held-out choice.** The dev set is split (seeded, stratified by label; scikit-learn's
  ``StratifiedShuffleSplit``, or ``StratifiedKFold`` for cross-fitting) into a calibration and an
  evaluation part. A threshold is chosen on calibration only (its threshold grid too) and the
  metric and the speed-up it actually reaches are measured on evaluation. With k folds, each
  fold is scored with the threshold chosen on the other k - 1 folds and the metric and speed-up
  are computed over the pooled predictions (every example scored once, never by a threshold it
  helped choose). Repeated over R random splits: mean and standard deviation.
* **Targets.** ``speedup``: the calibration point of best metric among those at least ``speedup``
  times faster (the oracle's rule, applied to calibration only). ``drop``: the fastest threshold
  whose calibration metric is at most ``drop`` below the final layer's. ``epsilon`` / ``delta``:
  the guarantee below.
* **Guarantee** (Learn-then-Test, Angelopoulos et al. 2021; CALM, Schuster et al. 2022). The risk
  of a threshold is the fraction of examples on which early exit *disagrees with the final
  layer* (``risk="disagreement"``), or on which the final layer is right and the exit is wrong
  (``risk="accuracy-loss"``, an upper bound on the accuracy lost). Each candidate threshold's
  null hypothesis "risk > epsilon" is tested with a one-sided upper confidence bound on the
  calibration part: exact Clopper-Pearson (``scipy.stats.beta``, default) or Hoeffding. The
  multiple testing over the grid is handled by **fixed-sequence testing** (default): thresholds
  are tested in an order fixed before any label is seen, from conservative (no one exits) to
  aggressive, each at level delta, stopping at the first that fails; the last one passed is
  returned. Alternatively **Bonferroni**: every threshold at delta / T, the fastest that passes.
  Either way, with probability at least 1 - delta over the draw of the calibration part, the
  returned threshold's risk on the distribution the data came from is at most epsilon. The
  threshold that lets no one exit has risk 0 by construction and is always admissible (it is
  returned, at speed-up 1, when nothing else can be certified).

The exit rule itself is ``eebench.exits.rule`` (one place); this module only selects among
thresholds. Everything is vectorised over the threshold grid: one [T, N] simulation per split.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from eebench.data.metrics import get_metric
from eebench.errors import EebenchError
from eebench.exits.metrics import speedup_ratios
from eebench.exits.policies import ExitPolicy, get_policy
from eebench.exits.rule import exit_layers_from_scores, predictions_at_exit, threshold_grid
from eebench.exits.signals import Signal

Risk = Literal["disagreement", "accuracy-loss"]
Bound = Literal["clopper-pearson", "hoeffding"]
Correction = Literal["fixed-sequence", "bonferroni"]
RISKS = ("disagreement", "accuracy-loss")
BOUNDS = ("clopper-pearson", "hoeffding")
CORRECTIONS = ("fixed-sequence", "bonferroni")


@dataclass(frozen=True)
class SplitSpec:
    """How the dev set is split: a calibration fraction, or ``folds`` >= 2 for cross-fitting;
    ``repeats`` random splits from ``seed``."""

    cal_fraction: float = 0.5
    folds: int | None = None
    repeats: int = 20
    seed: int = 0

    def check(self) -> None:
        if self.folds is not None:
            if int(self.folds) != self.folds or self.folds < 2:
                raise EebenchError(f"--folds must be an integer >= 2, got {self.folds}")
        elif not 0.0 < self.cal_fraction < 1.0:
            raise EebenchError(f"--cal-fraction must lie in (0, 1), got {self.cal_fraction}")
        if int(self.repeats) != self.repeats or self.repeats < 1:
            raise EebenchError(f"--repeats must be an integer >= 1, got {self.repeats}")

    def describe(self) -> str:
        how = f"{self.folds}-fold cross-fitting" if self.folds else f"calibration {self.cal_fraction:g} of dev"
        return f"{how}, stratified by label, {self.repeats} random split(s) from seed {self.seed}"


@dataclass(frozen=True)
class Target:
    """What a threshold must achieve: exactly one of ``speedup``, ``drop`` or ``epsilon``
    (with ``delta``, ``risk``, ``bound`` and ``correction`` for the guarantee)."""

    speedup: float | None = None
    drop: float | None = None
    epsilon: float | None = None
    delta: float = 0.05
    risk: Risk = "disagreement"
    bound: Bound = "clopper-pearson"
    correction: Correction = "fixed-sequence"

    def check(self) -> None:
        given = [k for k in ("speedup", "drop", "epsilon") if getattr(self, k) is not None]
        if len(given) != 1:
            raise EebenchError("give exactly one operating-point target: a speed-up, a drop against the final layer "
                               f"(--target-drop) or a guarantee (--epsilon/--delta); got {', '.join(given) or 'none'}")
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup >= 1.0):
            raise EebenchError(f"target speed-up must be a number >= 1, got {self.speedup}")
        if self.drop is not None and not 0.0 <= self.drop <= 1.0:
            raise EebenchError(f"--target-drop must lie in [0, 1] (a fraction of the metric, 0.01 = one point), got {self.drop}")
        if self.epsilon is not None and not 0.0 < self.epsilon < 1.0:
            raise EebenchError(f"--epsilon must lie in (0, 1), got {self.epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise EebenchError(f"--delta must lie in (0, 1), got {self.delta}")
        for name, val, ok in (("risk", self.risk, RISKS), ("bound", self.bound, BOUNDS),
                              ("correction", self.correction, CORRECTIONS)):
            if val not in ok:
                raise EebenchError(f"unknown {name} {val!r}; known: {', '.join(ok)}")

    @property
    def kind(self) -> str:
        return "speedup" if self.speedup is not None else "drop" if self.drop is not None else "guarantee"

    def describe(self) -> str:
        if self.kind == "speedup":
            return f"best calibration point at >= {self.speedup:g}x"
        if self.kind == "drop":
            return f"fastest threshold within {self.drop:g} of the final layer on calibration"
        return (f"fastest threshold with {self.risk} <= {self.epsilon:g} at confidence {1 - self.delta:g} "
                f"({self.bound}, {self.correction})")


# --------------------------------------------------------------------------- splits


def dev_splits(labels, spec: SplitSpec) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per repeat, the (calibration, evaluation) index pairs: one pair for a shuffle split, k
    pairs (evaluation = one fold, calibration = the others) for cross-fitting.

    Promises: stratified by label, reproducible from ``spec.seed``, and every class of ``labels``
    present in both parts of every pair (else an ``EebenchError`` naming the class)."""
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

    spec.check()
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    classes, counts = np.unique(y, return_counts=True)
    need = spec.folds or 2
    rare = [f"{c} ({n} example{'s' * (n != 1)})" for c, n in zip(classes.tolist(), counts.tolist(), strict=True) if n < need]
    if rare:
        raise EebenchError(f"cannot split the dev set ({len(y)} examples) so that every class is in both parts: class(es) "
                           f"{', '.join(rare)} have fewer than {need} examples; use fewer --folds or a larger dev set")
    out = []
    x = np.zeros(len(y))
    for r in range(spec.repeats):
        try:
            if spec.folds:
                splitter = StratifiedKFold(n_splits=int(spec.folds), shuffle=True, random_state=spec.seed + r)
                pairs = [(cal, ev) for cal, ev in splitter.split(x, y)]
            else:
                splitter = StratifiedShuffleSplit(n_splits=1, train_size=spec.cal_fraction, random_state=spec.seed + r)
                pairs = list(splitter.split(x, y))
        except ValueError as e:
            raise EebenchError(f"cannot split the dev set ({len(y)} examples, classes {classes.tolist()}) with "
                               f"{spec.describe()}: {e}") from None
        for cal, ev in pairs:
            for part, idx in (("calibration", cal), ("evaluation", ev)):
                missing = sorted(set(classes.tolist()) - set(np.unique(y[idx]).tolist()))
                if missing:
                    raise EebenchError(f"{spec.describe()} leaves class(es) {missing} out of the {part} part "
                                       f"({len(idx)} examples); use a --cal-fraction nearer 0.5, fewer --folds or a larger dev set")
        out.append(pairs)
    return out


# --------------------------------------------------------------------------- bounds


def upper_bound(k, n: int, delta, bound: Bound = "clopper-pearson") -> np.ndarray:
    """One-sided (1 - delta) upper confidence bound on a rate from k successes out of n.

    Clopper-Pearson: the exact binomial bound, ``Beta(1 - delta; k + 1, n - k)`` (1 when k = n).
    Hoeffding: ``k / n + sqrt(log(1 / delta) / (2 n))`` (clipped to 1)."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=float)
    delta = np.broadcast_to(np.asarray(delta, dtype=float), k.shape)
    if n <= 0:
        return np.ones_like(k)
    if bound == "hoeffding":
        return np.minimum(1.0, k / n + np.sqrt(np.log(1.0 / delta) / (2.0 * n)))
    if bound != "clopper-pearson":
        raise EebenchError(f"unknown bound {bound!r}; known: {', '.join(BOUNDS)}")
    out = np.ones_like(k)
    ok = k < n
    out[ok] = beta.ppf(1.0 - delta[ok], k[ok] + 1.0, n - k[ok])
    return out


# --------------------------------------------------------------------------- choosing


@dataclass
class Candidates:
    """A threshold grid ordered from conservative to aggressive, simulated on every example."""

    thresholds: torch.Tensor  # [T] float64; index 0 lets no one exit
    exit_layers: torch.Tensor  # [T, N]
    preds: torch.Tensor  # [T, N]
    #: Index of the policy's fixed operating point (``ExitPolicy.fixed_threshold``), else None.
    fixed: int | None = None


def candidates(logits: torch.Tensor, scores: torch.Tensor, sig: Signal, cal: np.ndarray,
               num_thresholds: int = 100) -> Candidates:
    """The grid of ``threshold_grid`` over the *calibration* scores only, plus a threshold no
    score can meet (so that "no one exits" is always available, whatever the evaluation part
    holds), ordered from conservative to aggressive (the order fixed-sequence testing uses)."""
    grid = threshold_grid(scores[torch.as_tensor(cal)], sig, num_thresholds)
    never = torch.tensor([math.inf if sig.higher_is_easier else -math.inf], dtype=torch.float64)
    grid = torch.cat([never, grid.double()])
    # Exits when score < tau: a larger tau lets more leave; when score > tau: a smaller one does.
    grid = grid.sort(descending=sig.higher_is_easier).values
    el = exit_layers_from_scores(scores, sig, grid)
    fixed = getattr(sig, "fixed_threshold", None)
    # A fixed operating point: the grid is [no one exits, the fixed point] (threshold_grid).
    return Candidates(grid, el, predictions_at_exit(logits, el), None if fixed is None else 1)


def _risk_losses(c: Candidates, final_pred: torch.Tensor, labels: torch.Tensor, risk: Risk) -> torch.Tensor:
    """Per-example 0/1 losses, [T, N]."""
    if risk == "disagreement":
        return c.preds != final_pred
    if risk == "accuracy-loss":
        return (final_pred == labels) & (c.preds != labels)
    raise EebenchError(f"unknown risk {risk!r}; known: {', '.join(RISKS)}")


def choose(c: Candidates, idx: np.ndarray, labels: torch.Tensor, final_pred: torch.Tensor, target: Target,
           metric: str = "accuracy", num_layers: int | None = None, scale: float = 1.0) -> dict:
    """Pick one candidate using the examples ``idx`` only.

    Returns ``{"index", "threshold", "reached", "cal_speedup", "cal_metric", "cal_risk",
    "certified", "fixed", "met_target"}``; ``reached`` is False (and ``index`` None) when no
    threshold meets a speed-up target on these examples. Ties: higher metric, then faster, then
    the earlier (more conservative) candidate.

    A policy with a fixed operating point (``c.fixed``) has nothing to choose for a speed-up
    target: its one point is returned (``fixed`` True) and ``met_target`` says whether it reaches
    the target on these examples; it is never replaced by another point. Drop and guarantee
    targets choose between it and "no one exits", as for any grid."""
    ix = torch.as_tensor(idx)
    m = num_layers or int(c.exit_layers.max())
    el = c.exit_layers[:, ix]
    speed = speedup_ratios(el, m) * scale  # [T]
    score = get_metric(metric).batched(c.preds[:, ix], labels[ix]).double()  # [T]
    out = {"certified": None, "cal_risk": None, "fixed": c.fixed is not None, "met_target": None}
    if target.kind == "speedup" and c.fixed is not None:
        i = c.fixed
        out["met_target"] = bool(speed[i] >= target.speedup - 1e-9)
    elif target.kind == "speedup":
        ok = speed >= target.speedup - 1e-9
        if not bool(ok.any()):
            return {**out, "index": None, "threshold": None, "reached": False, "cal_speedup": float(speed.max()),
                    "cal_metric": None}
        key = torch.where(ok, score, torch.full_like(score, -math.inf))
        best = key.max()
        i = int(torch.nonzero((key == best) & (speed == speed[key == best].max()))[0])
    elif target.kind == "drop":
        final = float(get_metric(metric).batched(final_pred[ix][None], labels[ix])[0])
        ok = score >= final - target.drop - 1e-12
        ok[0] = True  # no one exits: exactly the final layer
        key = torch.where(ok, speed, torch.full_like(speed, -math.inf))
        top = key == key.max()
        i = int(torch.nonzero(top & (score == score[top].max()))[0])
    else:
        losses = _risk_losses(c, final_pred, labels, target.risk)[:, ix]
        k = losses.sum(1).cpu().numpy()
        n = len(idx)
        t = len(k)
        if target.correction == "fixed-sequence":
            ucb = upper_bound(k, n, target.delta, target.bound)
            passed = ucb <= target.epsilon
            passed[0] = True  # no one exits: risk 0 by construction, nothing to test
            fails = np.nonzero(~passed)[0]
            i = int(fails[0] - 1) if len(fails) else t - 1
        elif target.correction == "bonferroni":
            ucb = upper_bound(k, n, target.delta / max(t - 1, 1), target.bound)
            passed = ucb <= target.epsilon
            passed[0] = True
            key = torch.where(torch.as_tensor(passed), speed, torch.full_like(speed, -math.inf))
            i = int(torch.nonzero(key == key.max())[0])
        else:
            raise EebenchError(f"unknown correction {target.correction!r}; known: {', '.join(CORRECTIONS)}")
        out["cal_risk"] = float(k[i] / n)
        out["certified"] = int(passed[1:].sum()) if target.correction == "bonferroni" else int(i)
    return {**out, "index": i, "threshold": float(c.thresholds[i]), "reached": True, "cal_speedup": float(speed[i]),
            "cal_metric": float(score[i])}


@dataclass
class OperatingPoint:
    """Held-out operating point of one signal on one cell: per-repeat figures and their spread."""

    signal: str
    target: dict
    split: dict
    metric: str
    repeats: list[dict] = field(default_factory=list)  # threshold(s), eval metric / speed-up / risk, ...

    @property
    def fixed(self) -> bool:
        """Whether the policy has a fixed operating point (its one point is scored, not chosen)."""
        return any(r.get("fixed") for r in self.repeats)

    def _vals(self, key: str) -> list[float]:
        return [r[key] for r in self.repeats if r.get(key) is not None and not math.isnan(r[key])]

    @property
    def reached(self) -> int:
        return sum(1 for r in self.repeats if r["reached"])

    def mean(self, key: str) -> float:
        v = self._vals(key)
        return float(np.mean(v)) if v else float("nan")

    def std(self, key: str) -> float:
        v = self._vals(key)
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 if v else float("nan")

    def summary(self) -> dict[str, float | None]:
        """Means and standard deviations over repeats (None where no repeat reached the target)."""
        out = {"metric": self.mean("eval_metric"), "metric_std": self.std("eval_metric"),
               "speedup": self.mean("eval_speedup"), "speedup_std": self.std("eval_speedup"),
               "reached": float(self.reached), "repeats": float(len(self.repeats))}
        if self.fixed:
            # a fixed operating point: scored whatever the target; how many repeats met it
            out["fixed_point"] = 1.0
            if self.target.get("speedup") is not None:
                out["met_target"] = float(sum(1 for r in self.repeats if r.get("met_target")))
        if self.target.get("epsilon") is not None:
            out["risk"] = self.mean("eval_risk")
            out["violation_rate"] = self.mean("violated")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}

    def to_dict(self) -> dict:
        return {"signal": self.signal, "target": self.target, "split": self.split, "metric": self.metric,
                "summary": self.summary(), "repeats": self.repeats}


def held_out(logits: torch.Tensor, labels, signal: str | Signal, target: Target, split: SplitSpec = SplitSpec(),
             metric: str = "accuracy", num_thresholds: int = 100, scale: float = 1.0) -> OperatingPoint:
    """Choose a threshold on calibration, score it on evaluation, over ``split.repeats`` splits.

    ``logits`` [N, M, C] are a cell's cached dev logits; ``scale`` multiplies layer speed-ups
    (budget exiting reports against the full depth). Per repeat the result holds the chosen
    threshold(s), the calibration figures, and on evaluation the metric, the speed-up reached,
    the risk against the final layer (guarantee targets) and whether it broke the promise."""
    return held_out_many(logits, labels, signal, [target], split, metric, num_thresholds, scale)[0]


def held_out_many(logits: torch.Tensor, labels, signal: str | Signal | ExitPolicy, targets: list[Target],
                  split: SplitSpec = SplitSpec(), metric: str = "accuracy", num_thresholds: int = 100,
                  scale: float = 1.0, scores: torch.Tensor | None = None,
                  splits: list | None = None) -> list[OperatingPoint]:
    """``held_out`` for several targets on the same splits (one simulation per split; each target's
    result is the same as alone). ``scores`` [N, M]: an exit policy's cached values (policies that
    read a method's modules); ``splits``: ``dev_splits(labels, split)`` when the caller has it
    already (every cell of a task shares its dev labels)."""
    for t in targets:
        t.check()
    sig = get_policy(signal)
    sig.check_task(logits.shape[-1])
    get_metric(metric)
    labels = torch.as_tensor(labels).long()
    if scores is None:
        scores = sig.scores(logits)
    m = logits.shape[1]
    final_pred = logits[:, -1].argmax(-1)
    ops = [OperatingPoint(sig.name, asdict(t), asdict(split), metric) for t in targets]
    for pairs in dev_splits(labels, split) if splits is None else splits:
        cands = [(candidates(logits, scores, sig, cal, num_thresholds), cal, ev) for cal, ev in pairs]
        for target, op in zip(targets, ops, strict=True):
            op.repeats.append(_score_split(cands, logits, labels, final_pred, target, metric, m, scale))
    return ops


def _score_split(cands, logits, labels, final_pred, target: Target, metric: str, m: int, scale: float) -> dict:
    """One repeat: choose on each calibration part, pool the evaluation parts, score them."""
    n = len(labels)
    el = torch.empty(n, dtype=torch.long)
    pred = torch.empty(n, dtype=torch.long)
    scored = np.zeros(n, dtype=bool)
    picks = []
    for c, cal, ev in cands:
        ch = choose(c, cal, labels, final_pred, target, metric, m, scale)
        picks.append(ch)
        if not ch["reached"]:
            break
        ix = torch.as_tensor(ev)
        el[ix] = c.exit_layers[ch["index"], ix]
        pred[ix] = c.preds[ch["index"], ix]
        scored[ev] = True
    rec = {"reached": all(p["reached"] for p in picks), "thresholds": [p["threshold"] for p in picks],
           "cal_speedup": float(np.mean([p["cal_speedup"] for p in picks])),
           "cal_metric": None, "eval_metric": None, "eval_speedup": None}
    if picks and picks[0]["fixed"]:
        rec["fixed"] = True
    if not rec["reached"]:
        return rec
    ev = torch.as_tensor(np.nonzero(scored)[0])
    rec["cal_metric"] = float(np.mean([p["cal_metric"] for p in picks]))
    # the vectorised metric, as on calibration (``choose``) and in sweeps: scikit-learn's input
    # checks cost more than the metric itself, once per split, target, signal and cell of a report.
    # Accuracy and F1 are the same float as scikit-learn's; MCC can differ in the last bit (torch's
    # float64 sqrt is not always correctly rounded on the CPU), far below any printed digit.
    rec["eval_metric"] = float(get_metric(metric).batched(pred[ev][None], labels[ev])[0])
    rec["eval_speedup"] = float(speedup_ratios(el[ev], m)) * scale
    rec["n_eval"] = int(len(ev))
    if rec.get("fixed") and target.kind == "speedup":
        # whether the fixed point reaches the target where it is scored (never pretended)
        rec["met_target"] = bool(rec["eval_speedup"] >= target.speedup - 1e-9)
    if target.kind == "guarantee":
        if target.risk == "disagreement":
            lost = pred[ev] != final_pred[ev]
        else:
            lost = (final_pred[ev] == labels[ev]) & (pred[ev] != labels[ev])
        rec["eval_risk"] = float(lost.double().mean())
        rec["violated"] = float(rec["eval_risk"] > target.epsilon)
        rec["cal_risk"] = float(np.mean([p["cal_risk"] for p in picks]))
    return rec


def pick_threshold_held_out(logits: torch.Tensor, labels, signal: str | Signal | ExitPolicy, target: Target,
                            split: SplitSpec = SplitSpec(repeats=1), metric: str = "accuracy",
                            num_thresholds: int = 100, scores: torch.Tensor | None = None,
                            ) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """One threshold chosen on the calibration part of the first split (shuffle split only):
    ``(threshold, cal_idx, eval_idx, record)``, for ``eebench bench`` and the Python API.
    Raises ``EebenchError`` when the target is not reached on calibration."""
    if split.folds:
        raise EebenchError("a single threshold needs a calibration / evaluation split, not --folds")
    split = SplitSpec(split.cal_fraction, None, 1, split.seed)
    sig = get_policy(signal)
    labels = torch.as_tensor(labels).long()
    scores = sig.scores(logits) if scores is None else scores
    ((cal, ev),) = dev_splits(labels, split)[0]
    c = candidates(logits, scores, sig, cal, num_thresholds)
    ch = choose(c, cal, labels, logits[:, -1].argmax(-1), target, metric, logits.shape[1])
    # A fixed operating point is always "reached": its own speed-up, met_target says the rest.
    if not ch["reached"]:
        raise EebenchError(f"no threshold of signal {sig.name} reaches {target.describe()} on the calibration part "
                           f"(fastest: {ch['cal_speedup']:.2f}x); choose a lower target")
    return ch["threshold"], cal, ev, ch


def violation_check(logits: torch.Tensor, labels, signal: str | Signal, target: Target,
                    split: SplitSpec, num_thresholds: int = 100) -> dict:
    """The empirical check of a guarantee: over ``split.repeats`` random splits, how often the
    evaluation part's risk exceeds epsilon (should be <= delta up to sampling noise), with a
    95% Clopper-Pearson interval on that rate, and the mean speed-up kept.

    The promise is about the distribution the examples come from; the evaluation part only
    estimates the risk, with a standard error of about sqrt(epsilon / n_eval). A threshold whose
    true risk sits just below epsilon breaks the promise on a small evaluation part far more
    often than delta, so a tight check needs a large evaluation part (a small ``cal_fraction``)."""
    from scipy.stats import beta

    if target.kind != "guarantee":
        raise EebenchError("the violation check needs a guarantee target (--epsilon/--delta)")
    op = held_out(logits, labels, signal, target, split, num_thresholds=num_thresholds)
    v = int(sum(r["violated"] for r in op.repeats))
    r = len(op.repeats)
    lo = 0.0 if v == 0 else float(beta.ppf(0.025, v, r - v + 1))
    hi = 1.0 if v == r else float(beta.ppf(0.975, v + 1, r - v))
    return {"violations": v, "repeats": r, "rate": v / r, "rate_ci95": [lo, hi], "delta": target.delta,
            "epsilon": target.epsilon, "mean_eval_risk": op.mean("eval_risk"), "mean_cal_risk": op.mean("cal_risk"),
            "mean_eval_speedup": op.mean("eval_speedup"), "std_eval_speedup": op.std("eval_speedup"),
            "mean_eval_metric": op.mean("eval_metric")}


# --------------------------------------------------------------------------- summaries


def sweep_summary(logits: torch.Tensor, labels, signal: str | Signal | ExitPolicy, speedups,
                  split: SplitSpec = SplitSpec(), guarantee: Target | None = None, metric: str = "accuracy",
                  num_thresholds: int = 100, scale: float = 1.0,
                  scores: torch.Tensor | None = None) -> tuple[dict[str, float | None], dict]:
    """Held-out summary keys of one signal sweep, and the settings that produced them.

    Keys: ``heldout_<metric>_at_<x>x`` (mean over repeats of the evaluation metric at the
    threshold chosen on calibration for >= x), ``..._std``, ``heldout_speedup_at_<x>x`` (the
    speed-up actually reached on evaluation); with ``guarantee`` also ``guaranteed_<metric>``,
    ``guaranteed_speedup``, ``guaranteed_risk`` (evaluation risk against the final layer) and
    ``guaranteed_violation_rate``. None where no repeat reached the target. A policy with a
    fixed operating point has ``heldout_<metric>`` (+ ``_std``), ``heldout_speedup`` and, per
    target, ``heldout_met_<x>x`` (the fraction of splits where its point reached x) instead."""
    targets = [Target(speedup=float(x)) for x in speedups] + ([guarantee] if guarantee else [])
    ops = held_out_many(logits, labels, signal, targets, split, metric, num_thresholds, scale, scores)
    out: dict[str, float | None] = {}
    for x, op in zip(speedups, ops, strict=False):
        s = op.summary()
        if op.fixed:
            # A fixed operating point is the same point for every target: its figures once, and
            # per target the fraction of splits in which it reached it (no "metric at Xx").
            out[f"heldout_{metric}"] = s["metric"]
            out[f"heldout_{metric}_std"] = s["metric_std"]
            out["heldout_speedup"] = s["speedup"]
            out[f"heldout_met_{x:g}x"] = s["met_target"] / s["repeats"] if s["repeats"] else None
            continue
        out[f"heldout_{metric}_at_{x:g}x"] = s["metric"]
        out[f"heldout_{metric}_at_{x:g}x_std"] = s["metric_std"]
        out[f"heldout_speedup_at_{x:g}x"] = s["speedup"]
    if guarantee:
        s = ops[-1].summary()
        out.update({f"guaranteed_{metric}": s["metric"], "guaranteed_speedup": s["speedup"],
                    "guaranteed_risk": s["risk"], "guaranteed_violation_rate": s["violation_rate"]})
    detail = {"split": asdict(split), "num_thresholds": num_thresholds,
              "guarantee": asdict(guarantee) if guarantee else None,
              "points": [{"target": op.target, **op.summary()} for op in ops]}
    return out, detail


def mlflow_summary(summary: dict[str, float | None]) -> dict[str, float]:
    """Summary keys as MLflow metric names (without the signal prefix): the oracle readouts of the
    sweep (``<metric>_at_<x>x``, chosen and scored on the same dev set) become
    ``oracle_<metric>_at_<x>x``; held-out and guaranteed keys keep their names."""
    import re

    out = {}
    for k, v in summary.items():
        if v is None:
            continue
        out[f"oracle_{k}" if re.fullmatch(r"[a-z0-9]+_at_[0-9.]+x", k) else k] = float(v)
    return out
