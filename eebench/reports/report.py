"""Tables (pandas + tabulate: markdown, LaTeX, CSV) and Pareto plots from results JSON or MLflow."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from eebench.data.metrics import get_metric, majority_score
from eebench.errors import EebenchError
from eebench.exits.operating import SplitSpec, Target
from eebench.exits.rule import metric_at_speedup
from eebench.model.accel import describe_cpu
from eebench.reports.analyses import _mean_std as _seed_mean_std
from eebench.reports.grouping import group_cells  # noqa: F401 - re-exported
from eebench.runs.plots import (  # noqa: F401 - re-exported: the report's plots and sweep tables
    FIXED_POINT_MATCH,
    _front,
    _method_order,  # noqa: F401 - re-exported
    fixed_note,
    full_model_point,
    is_fixed,
    mean_curves,
    plot_pareto,
    plot_pareto_panels,
    seed_summary,
    staircase,
    sweep_frame,
)
from eebench.runs.results import CellResult, SignalSweep, find_results

ABLATION = ["cosee", "cosee-no-swm", "cosee-no-osc", "vanilla"]


#: The speed-ups of the report's ablation and versus tables (Fig. 4's x axis).
SPEEDUPS = (1.5, 2.0, 3.0, 4.0)


def _over_seeds(xs: list[float]) -> tuple[float, float | None, int] | None:
    """(mean, sample std or None for one value, count) of the values that are not NaN; None when
    none is. The statistic is the analyses' (``analyses._mean_std``), so the tables and the CSVs
    behind the figures cannot drift apart."""
    m, sd, n = _seed_mean_std(xs)
    if n == 0:
        return None
    return m, (None if n == 1 else sd), n


def _mean_std(xs: list[float]) -> str:
    """Mean ± sample std (x100) with the number of seeds behind it; "n/a" when none has a value."""
    got = _over_seeds(xs)
    if got is None:
        return "n/a"
    m, sd, n = got
    return f"{100 * m:.1f} (n=1)" if sd is None else f"{100 * m:.1f} ± {100 * sd:.1f} (n={n})"


def _at(sw: SignalSweep, metric: str, target: float) -> float:
    return metric_at_speedup([p["speedup"] for p in sw.points], [p[metric] for p in sw.points], target)


def _fixed_cells(points: list[tuple[float, float]], target: float) -> str:
    """Mean ± std (x100, n) of fixed-point metrics, with their mean speed-up and the note."""
    pts = [(v, s) for v, s in points if not (math.isnan(v) or math.isnan(s))]
    if not pts:
        return "n/a"
    head = _mean_std([v for v, _ in pts])
    sp = sum(s for _, s in pts) / len(pts)
    return f"{head} [{fixed_note(sp, target)}]"


class HeldOut:
    """Held-out operating points of cells (``eebench.exits.operating``), computed from each cell's cached
    dev logits when ``logits`` knows where they are (cell id -> dev_logits.safetensors), else read
    from the held-out summary the run stored (only for speed-up targets with the same split).

    ``cell`` returns ``(n, mean, std, mean speed-up)`` over the splits of one cell (metric and
    speed-up on the evaluation parts), or None when the target was never reached / unknown."""

    def __init__(self, split: SplitSpec | None = None, logits: dict[str, Path] | None = None, num_thresholds: int = 100,
                 prefetch: tuple[Target, ...] = ()):
        self.split = split or SplitSpec()
        self.split.check()
        self.logits = logits or {}
        self.num_thresholds = num_thresholds
        #: targets computed together with any asked-for one from a cell's logits (the report's
        #: speed-ups): one simulation of the splits serves them all, with the same results
        self.prefetch = tuple(prefetch)
        self._cache: dict = {}
        self._splits: dict = {}  # dev labels -> their splits (the cells of a task share them)

    def _dev_splits(self, labels) -> list:
        from eebench.exits.operating import dev_splits

        key = hashlib.sha256(labels.numpy().tobytes()).hexdigest()
        if key not in self._splits:
            self._splits[key] = dev_splits(labels, self.split)
        return self._splits[key]

    def describe(self) -> str:
        return self.split.describe()

    def cell(self, r: CellResult, signal: str, target: Target) -> tuple[int, float, float, float] | None:
        from dataclasses import asdict

        metric = r.config["main_metric"]
        sw = r.sweeps[signal]
        if r.method == "final-only":  # nothing is chosen: the final layer on the whole dev set
            v = sw.points[0][metric]
            return (1, v, 0.0, sw.points[0]["speedup"])
        key = (r.cell_id, signal, target)
        if key in self._cache:
            return self._cache[key]
        out = None
        if r.cell_id in self.logits:
            from safetensors.torch import load_file

            cached = load_file(self.logits[r.cell_id])
            scale = r.model.get("backbone_layers", 1) / r.model.get("num_layers", 1)
            # the grid size the run used, so that recomputed and stored held-out points agree
            grid = int(sw.heldout.get("num_thresholds", self.num_thresholds))
            from eebench.exits.operating import held_out_many
            from eebench.runs.runner import cell_policy

            # a method's own policy (values cached beside the logits) as well as a signal
            targets = [target, *(t for t in self.prefetch if t != target and (r.cell_id, signal, t) not in self._cache)]
            ops = held_out_many(cached["logits"], cached["labels"], cell_policy(r, signal), targets, self.split,
                                metric, grid, scale, cached.get(f"score.{signal}"), self._dev_splits(cached["labels"]))
            for t, op in zip(targets, ops, strict=True):
                s = op.summary()
                self._cache[(r.cell_id, signal, t)] = (
                    (op.reached, s["metric"], s["metric_std"], s["speedup"]) if s["metric"] is not None else None)
            return self._cache[key]
        elif target.kind == "speedup" and sw.heldout.get("split") == asdict(self.split) and is_fixed(sw):
            mean = sw.summary.get(f"heldout_{metric}")  # a fixed point: the same for every target
            if mean is not None:
                out = (self.split.repeats, mean, sw.summary.get(f"heldout_{metric}_std") or 0.0,
                       sw.summary.get("heldout_speedup"))
        elif target.kind == "speedup" and sw.heldout.get("split") == asdict(self.split):
            mean = sw.summary.get(f"heldout_{metric}_at_{target.speedup:g}x")
            if mean is not None:
                pts = [p for p in sw.heldout.get("points", []) if p.get("target", {}).get("speedup") == target.speedup]
                n = int(pts[0]["reached"]) if pts else self.split.repeats
                out = (n, mean, sw.summary.get(f"heldout_{metric}_at_{target.speedup:g}x_std") or 0.0,
                       sw.summary.get(f"heldout_speedup_at_{target.speedup:g}x"))
        self._cache[key] = out
        return out

    def point(self, r: CellResult, signal: str, target: float) -> tuple[float, float]:
        """(mean metric, mean speed-up reached) for ``analyses.cross_task_table``; NaN when unknown."""
        got = self.cell(r, signal, Target(speedup=target) if target >= 1.0 else Target(speedup=1.0))
        return (got[1], got[3]) if got is not None else (float("nan"), float("nan"))


def _pooled(parts: list, fixed_target: float | None = None) -> str:
    """Mean ± std over the pooled splits of several cells (exact from each cell's n, mean, std),
    and the mean speed-up reached on evaluation; ``fixed_target``: the cells are a fixed
    operating point, marked as such against that target speed-up (``fixed_note``)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return "n/a"
    n = sum(p[0] for p in parts)
    m = sum(p[0] * p[1] for p in parts) / n
    ss = sum((p[0] - 1) * p[2] ** 2 + p[0] * (p[1] - m) ** 2 for p in parts)
    sp = sum(p[0] * p[3] for p in parts) / n
    # one value (a final-only cell: nothing is chosen, so there is no split to vary) has no spread
    head = f"{100 * m:.1f}" if n == 1 else f"{100 * m:.1f} ± {100 * (ss / (n - 1)) ** 0.5:.1f}"
    if fixed_target is not None:
        return f"{head} ({fixed_note(sp, fixed_target)})"
    return f"{head} ({sp:.2f}x)"


def logits_index(root: str | Path | None) -> dict[str, Path]:
    """Cell id -> cached dev logits, for every cell folder under ``root`` (<method>-s<seed>-<id>/)."""
    if not root or not Path(root).exists():
        return {}
    root = Path(root)
    files = [root / "dev_logits.safetensors"] if (root / "dev_logits.safetensors").exists() else root.rglob("dev_logits.safetensors")
    return {p.parent.name.rsplit("-", 1)[-1]: p for p in files if (p.parent / "result.json").exists()}


def main_table(results: list[CellResult], speedup: float, operating: HeldOut | None = None,
               target: Target | None = None) -> pd.DataFrame:
    """Task metric (x100) at a matched speed-up, per configuration (``group_cells``) x exit signal.

    ``operating`` None: the oracle (best dev point at or above ``speedup``), mean ± std over seeds
    with their number. Else held out: the threshold for ``target`` (default: ``speedup``) is chosen
    on calibration and scored on evaluation (mean ± std over seeds x splits, speed-up reached)."""
    cells: dict[tuple[str, str], list] = {}
    fixed: set[tuple[str, str]] = set()  # fixed operating points: their own speed-up, marked
    labels = []
    tgt = target or Target(speedup=speedup)
    for g in group_cells(results):
        labels.append(g.label)
        for r in g.cells:
            metric = r.config["main_metric"]
            for s, sw in r.sweeps.items():
                if is_fixed(sw) and r.method != "final-only":
                    fixed.add((g.label, s))
                if operating is not None:
                    cells.setdefault((g.label, s), []).append(operating.cell(r, s, tgt))
                    continue
                if (g.label, s) in fixed:  # its one point, whatever its speed-up
                    cells.setdefault((g.label, s), []).append((sw.points[0][metric], sw.points[0]["speedup"]))
                    continue
                t = speedup if r.method != "final-only" else 0.0
                cells.setdefault((g.label, s), []).append(_at(sw, metric, t))
    if not cells:
        raise EebenchError("no sweeps in these results; run `eebench run` or `eebench sweep` first")
    rows = [lbl for lbl in labels if any(k[0] == lbl for k in cells)]
    signals = sorted({k[1] for k in cells})
    # the target a fixed point is compared with: the speed-up target (other targets: the matched one)
    ft = tgt.speedup if tgt.kind == "speedup" else speedup

    def fmt(key) -> str:
        vals = cells.get(key, [])
        if key in fixed:
            return _fixed_cells(vals, speedup) if operating is None else _pooled(vals, ft)
        return _mean_std(vals) if operating is None else _pooled(vals)

    df = pd.DataFrame({s: [fmt((m, s)) for m in rows] for s in signals}, index=rows)
    df.index.name = "method \\ exit signal"
    return df


def ablation_table(results: list[CellResult], signal: str = "energy", speedups=SPEEDUPS,
                   operating: HeldOut | None = None) -> pd.DataFrame:
    """COSEE, its two ablations and the conventional method at several speed-ups (one signal),
    one row per configuration; oracle points when ``operating`` is None, else held-out ones."""
    rows = {}
    for m in ABLATION:
        for g in group_cells(results):
            rs = [r for r in g.cells if signal in r.sweeps]
            if g.method != m or not rs:
                continue
            metric = rs[0].config["main_metric"]
            if operating is not None:
                rows[g.label] = [_pooled([operating.cell(r, signal, Target(speedup=x)) for r in rs]) for x in speedups]
                continue
            rows[g.label] = [_mean_std([_at(r.sweeps[signal], metric, x) for r in rs]) for x in speedups]
    df = pd.DataFrame.from_dict(rows, orient="index", columns=[f"{x:g}x" for x in speedups])
    df.index.name = f"method ({signal})"
    return df


MAJORITY_ROW = "majority class (constant answer)"


def _majority(results: list[CellResult]) -> float | None:
    """Dev score of always answering the dev set's most frequent class, from the per-label exit
    counts a sweep records (every cell of a task shares one dev set; ``group_cells`` checks it).
    None for regression tasks and for results whose sweeps predate those counts."""
    for r in results:
        metric = r.config["main_metric"]
        if get_metric(metric).regression:
            return None
        for sw in r.sweeps.values():
            by_label = sw.points[0].get("exit_counts_by_label") if sw.points else None
            if by_label:
                counts = [sum(c) for c in by_label]
                return majority_score(metric, np.repeat(np.arange(len(counts)), counts))
    return None


def layer_table(results: list[CellResult]) -> pd.DataFrame:
    """Dev score (x100) of every exit classifier, per configuration (mean ± std over seeds, n),
    and a last row with the score of always answering the majority class: a layer at or below it
    has learned nothing its exit can use."""
    rows = {}
    for g in group_cells(results):
        rs = g.cells
        metric = rs[0].config["main_metric"]
        n = len(rs[0].layers)
        rows[g.label] = [_mean_std([r.layers[i][metric] for r in rs if len(r.layers) == n]) for i in range(n)]
    n = max(len(v) for v in rows.values())
    rows = {k: v + [""] * (n - len(v)) for k, v in rows.items()}
    base = _majority(results)
    if base is not None:
        rows[MAJORITY_ROW] = [f"{100 * base:.1f}"] * n
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"L{i + 1}" for i in range(n)])


def _training_seconds(t: dict) -> str:
    """A cell's training seconds for the cells table: a lower bound ("≥") when it resumed from a
    checkpoint that did not record the earlier processes' time (cells written before it did)."""
    if t.get("seconds") is None:
        return "n/a"
    partial = t.get("resumed_from_step") and t.get("seconds_before_resume") is None
    return f"{'≥ ' if partial else ''}{t['seconds']:.0f}"


def cells_table(results: list[CellResult], signal: str | None = None, operating: HeldOut | None = None,
                target: Target | None = None) -> pd.DataFrame:
    """One row per cell, in the tables' order: what a report is made of and where it came from.

    Configuration label, seed, cell id, final-layer dev score (x100), optimiser steps, training
    seconds (over all the processes of a cell that resumed, ``resumed from step``; "≥ s" where its
    checkpoint predates that record and only the last process's time is known), the machine and thread
    count it trained on (numbers are bit-reproducible only on the same kind of CPU), and whether
    early exit at the confirmed thresholds matched the simulation (mismatches / thresholds). With
    ``signal`` and ``operating``, also each cell's own held-out point for ``target`` (mean ± std
    over its splits, speed-up reached): the seed-to-seed spread the other tables average over."""
    rows = []
    for g in group_cells(results):
        for r in sorted(g.cells, key=lambda r: r.seed):
            metric = r.config["main_metric"]
            mach = r.model.get("machine") or {}
            where = str(r.model.get("device", "?"))
            if mach.get("gpu"):
                where += f", {mach['gpu']}"
            if mach.get("cpu_model"):
                where += f", {describe_cpu(mach)}, {mach.get('torch_threads', '?')} thread(s)"
            confirm = [c for sw in r.sweeps.values() for c in sw.confirm]
            bad = sum(c["exit_mismatches"] + c["prediction_mismatches"] for c in confirm)
            t = r.training or {}
            rows.append({"configuration": g.label, "seed": r.seed, "cell": r.cell_id,
                         f"final layer {metric}": f"{100 * r.layers[-1][metric]:.1f}" if r.layers else "n/a",
                         "steps": t.get("steps", "n/a"),
                         "training s": _training_seconds(t),
                         "resumed from step": t.get("resumed_from_step", 0) or "",
                         **({f"held-out {metric}, {signal}, {_short(target)}": _pooled(
                             [operating.cell(r, signal, target)] if signal in r.sweeps else [],
                             fixed_target=target.speedup if signal in r.sweeps and is_fixed(r.sweeps[signal])
                             and r.method != "final-only" and target.kind == "speedup" else None)}
                            if signal and operating is not None and target is not None else {}),
                         "trained on": where,
                         "early exit == simulation": (f"{bad} mismatches / {len(confirm)} threshold{'s' * (len(confirm) != 1)}"
                                                      if confirm else "not confirmed")})
    df = pd.DataFrame(rows).set_index("configuration")
    df.attrs["as_text"] = True  # "61.0" stays "61.0" (tabulate would print 61)
    return df


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (one family: every test of one table), in their
    order: the k-th smallest p times (m - k + 1), made monotone and capped at 1. It controls the
    chance of any false "p < 0.05" in the family, where a table of dozens of raw p-values gives
    one or two by chance."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [1.0] * len(pvalues), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - k) * pvalues[i]))
        out[i] = running
    return out


def _paired_frame(rows: dict[str, list[list[float]]], columns: list[str], index_name: str,
                  scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
    """Paired differences (one list per row and column, one value per seed) as "mean ± std (n, p,
    Holm)": the two-sided p of a one-sample t-test of the differences against 0 (scipy; the paired
    t-test of the two sides), and the same p adjusted by ``holm`` over every test of the table.
    A difference seen on one seed has no p; no difference at all is "n/a"."""
    from scipy import stats

    def test(diffs: list[float]):
        got = _over_seeds(diffs)
        if got is None:
            return None
        m, sd, n = got
        p = None if sd is None else stats.ttest_1samp(diffs, 0.0).pvalue if sd > 0 else (1.0 if m == 0 else 0.0)
        return m, sd, n, p

    tested = {k: [test(d) for d in v] for k, v in rows.items()}
    adjusted = iter(holm([t[3] for v in tested.values() for t in v if t is not None and t[3] is not None]))
    out = {}
    for k, v in tested.items():
        cells = []
        for t in v:  # the same order as the p-values handed to holm
            if t is None:
                cells.append("n/a")
                continue
            m, sd, n, p = t
            head = f"{scale * m:+.{digits}f}"
            cells.append(f"{head} (n=1)" if p is None
                         else f"{head} ± {scale * sd:.{digits}f} (n={n}, p={p:.2f}, Holm {next(adjusted):.2f})")
        out[k] = cells
    df = pd.DataFrame.from_dict(out, orient="index", columns=columns)
    df.index.name = index_name
    return df


#: How a paired table reads; ``{family}``: what Holm's adjustment runs over (a table, or a claim).
PAIRED_NOTE_FOR = ("paired by seed (mean ± std over seeds; p: two-sided paired t-test over seeds: with 3 seeds only "
                   "|t| > 4.30 gives p < 0.05; Holm: that p adjusted for every test of this {family}, by Holm's "
                   "step-down method: of many raw p-values about one in twenty is below 0.05 by chance, the "
                   "adjusted one is below 0.05 only when some difference is real at that level)")
PAIRED_NOTE = PAIRED_NOTE_FOR.format(family="table")
#: DIS is a fraction: shown as is, with three decimals (the other paired tables: x100, one decimal)
DIS_FORMAT = {"scale": 1.0, "digits": 3}


def _fronts(results: list[CellResult], reference: str):
    """The groups that have an exit front (final-only rows are a full model or a budget, not a
    front) and the one labelled ``reference``; None when there is no such group."""
    groups = [g for g in group_cells(results) if g.method != "final-only"]
    ref = next((g for g in groups if g.label == reference), None)
    return (groups, ref) if ref is not None else None


def _front_value(r: CellResult, s: str, x: float, operating: HeldOut | None = None) -> float:
    """Cell ``r``'s main metric with ``s`` exits at speed-up ``x``: held out when ``operating`` is
    given, else oracle, read off its swept front (a final-only cell's one point is its value
    wherever it is asked). NaN when ``r`` has no ``s`` sweep, ``s`` has a fixed operating point (no
    front), or the held-out rule cannot reach ``x``."""
    sw = r.sweeps.get(s)
    if sw is None or is_fixed(sw):
        return float("nan")
    if operating is not None:
        got = operating.cell(r, s, Target(speedup=x))
        return float("nan") if got is None else got[1]
    if r.method == "final-only":
        return sw.points[0][r.config["main_metric"]]
    return _at(sw, r.config["main_metric"], x)


def versus_table(results: list[CellResult], reference: str = "cosee", signal: str = "energy",
                 speedups=SPEEDUPS, operating: HeldOut | None = None) -> pd.DataFrame | None:
    """Every (configuration, exit signal) against one reference (``_versus_rows``), as a table of
    paired differences with one Holm family (``_paired_frame``)."""
    got = _versus_rows(results, reference, signal, speedups, operating)
    return None if got is None else _paired_frame(*got)


def _versus_rows(results: list[CellResult], reference: str = "cosee", signal: str = "energy",
                 speedups=SPEEDUPS, operating: HeldOut | None = None):
    """Every (configuration, exit signal) against one reference (configuration ``reference`` with
    ``signal`` exits), paired by seed: the mean ± std over seeds of (its metric - the reference's)
    at each speed-up (x100), held out when ``operating`` is given, else oracle, with the two-sided
    p-value of a paired t-test over the seeds (scipy) and its Holm adjustment (``_paired_frame``).
    A seed missing on either side, or a target one side does not reach, drops that pair. Full-model
    / budget rows (final-only) and fixed operating points have no front to compare at a speed-up and
    are left out. None when no configuration is labelled ``reference`` or it has no ``signal`` sweep."""
    got = _fronts(results, reference)
    if got is None:
        return None
    groups, ref = got
    if not any(signal in r.sweeps and not is_fixed(r.sweeps[signal]) for r in ref.cells):
        return None

    def diffs(g, s: str, x: float) -> list[float]:
        base = {r.seed: _front_value(r, signal, x, operating) for r in ref.cells}
        return [d for d in (_front_value(r, s, x, operating) - base[r.seed] for r in sorted(g.cells, key=lambda r: r.seed)
                            if r.seed in base) if not math.isnan(d)]

    rows = {}
    for g in groups:
        for s in sorted({s for r in g.cells for s, sw in r.sweeps.items() if not is_fixed(sw)}):
            if g is ref and s == signal:
                continue
            rows[f"{g.label} / {s}"] = [diffs(g, s, x) for x in speedups]
    if not rows:
        return None
    return rows, [f"{x:g}x" for x in speedups], f"configuration / exit signal, minus {reference} / {signal}"


def dis_versus_table(results: list[CellResult], reference: str = "cosee", signal: str = "energy") -> pd.DataFrame | None:
    """DIS per internal layer minus the reference's (``_dis_rows``), paired by seed, one Holm family."""
    got = _dis_rows(results, reference, signal)
    return None if got is None else _paired_frame(*got, **DIS_FORMAT)


def _dis_rows(results: list[CellResult], reference: str = "cosee", signal: str = "energy"):
    """The difficulty inversion score (DIS, Fig. 5) of every configuration's internal layers minus
    the reference's, both with ``signal`` exits, paired by seed (``_paired_frame``; DIS is a
    fraction, shown with three decimals). None when the reference has no DIS for ``signal``."""
    got = _fronts(results, reference)
    if got is None:
        return None
    groups, ref = got
    base = {r.seed: r.sweeps[signal].dis for r in ref.cells if signal in r.sweeps and r.sweeps[signal].dis}
    if not base:
        return None
    layers = max(len(d) for d in base.values()) - 1  # the final layer never exits: no DIS

    def diffs(g, layer: int) -> list[float]:
        out = []
        for r in sorted(g.cells, key=lambda r: r.seed):
            d, b = (r.sweeps[signal].dis if signal in r.sweeps else []), base.get(r.seed)
            if b and len(d) == len(b) and d[layer] is not None and b[layer] is not None:
                out.append(d[layer] - b[layer])
        return out

    rows = {g.label: [diffs(g, i) for i in range(layers)] for g in groups if g is not ref}
    rows = {k: v for k, v in rows.items() if any(v)}
    if not rows:
        return None
    return rows, [f"L{i + 1}" for i in range(layers)], f"configuration, DIS minus {reference}'s ({signal} exits)"


def exit_rates_versus_table(results: list[CellResult], reference: str = "cosee", signal: str = "energy",
                            speedups=SPEEDUPS) -> pd.DataFrame | None:
    """Premature and delayed exit rates minus the reference's (``_rates_rows``), paired by seed, one
    Holm family."""
    got = _rates_rows(results, reference, signal, speedups)
    return None if got is None else _paired_frame(*got)


def _rates_rows(results: list[CellResult], reference: str = "cosee", signal: str = "energy", speedups=SPEEDUPS):
    """Premature and delayed exiting rates (Fig. 11; x100, on the whole dev set) of every
    configuration minus the reference's at each speed-up, both with ``signal`` exits, paired by
    seed (``_paired_frame``). A rate at a speed-up is read off the cell's swept points by linear
    interpolation (``analyses.rate_curve``, the curve the figure draws); a speed-up one side never
    reaches drops that pair. None when the reference has no such rates."""
    import numpy as np

    from eebench.reports.analyses import rate_curve

    got = _fronts(results, reference)
    if got is None:
        return None
    groups, ref = got
    grid = np.asarray(speedups, dtype=float)

    def curves(g, key: str) -> dict[int, np.ndarray]:
        return {r.seed: rate_curve(r, signal, key, grid) for r in g.cells if signal in r.sweeps}

    rows = {}
    for key, what in (("premature_rate", "premature"), ("delayed_rate", "delayed")):
        base = curves(ref, key)
        if not any(np.isfinite(v).any() for v in base.values()):
            continue
        for g in groups:
            if g is ref:
                continue
            mine = curves(g, key)
            cols = [[float(v[j] - base[s][j]) for s, v in sorted(mine.items())
                     if s in base and np.isfinite(v[j]) and np.isfinite(base[s][j])] for j in range(len(grid))]
            if any(cols):
                rows[f"{g.label} / {what}"] = cols
    if not rows:
        return None
    return rows, [f"{x:g}x" for x in speedups], f"configuration / exit rate, minus {reference}'s ({signal} exits)"


#: The COSEE paper's claims that the study tests, each as the paired comparisons that make it up:
#: (kind, reference configuration, reference signal, rows of that kind's table). Kinds: ``versus``
#: (held-out front at 1.5x-4x, ``_versus_rows``), ``dis`` (DIS per layer, ``_dis_rows``), ``rates``
#: (premature / delayed rates, ``_rates_rows``); the parts of one claim are of one kind. A claim's tests
#: are one Holm family of their own.
CLAIMS: dict[str, tuple[str, list[tuple[str, str, str, list[str]]]]] = {
    "claim1": ("COSEE's energy front above vanilla's, PABEE's (weighted) and DeeBERT's (two-stage) (Table 2)",
               [("versus", "cosee", "energy", ["vanilla / energy", "weighted / energy", "two-stage / energy"])]),
    "claim2": ("SWM and OSC each help, most at high speed-ups (Fig. 4)",
               [("versus", "cosee", "energy", ["cosee-no-swm / energy", "cosee-no-osc / energy"])]),
    "claim3": ("COSEE raises DIS, mostly on shallow layers (Fig. 5)",
               [("dis", "cosee", "energy", ["vanilla", "weighted", "two-stage"])]),
    "claim4": ("COSEE lowers premature and delayed exits (Fig. 11)",
               [("rates", "cosee", "energy", [f"{m} / {k}" for m in ("vanilla", "weighted", "two-stage")
                                              for k in ("premature", "delayed")])]),
    "claim5": ("energy >= entropy >= max softmax under COSEE (Figs. 8, 9): each COSEE variant with the signal it "
               "was trained with",
               [("versus", "cosee", "energy", ["cosee-entropy / entropy"]),
                ("versus", "cosee-entropy", "entropy", ["cosee-softmax / softmax"])]),
}


def claims_tables(results: list[CellResult], operating: HeldOut | None = None) -> dict[str, tuple[str, pd.DataFrame]]:
    """One table per claim of ``CLAIMS`` that has at least one comparison in ``results``: name ->
    (the claim, its paired differences). Holm's adjustment runs over that claim's tests only, so a
    claim's verdict does not move when rows outside it (the baselines, other signals) join the
    study, as it does in ``versus_table``, whose family is every row of the table."""
    # kind -> (its rows against a reference, the index name, how values are shown)
    kinds = {"versus": (lambda ref, sig: _versus_rows(results, ref, sig, SPEEDUPS, operating), "comparison (x100)", {}),
             "dis": (lambda ref, sig: _dis_rows(results, ref, sig), "comparison, DIS per layer", DIS_FORMAT),
             "rates": (lambda ref, sig: _rates_rows(results, ref, sig, SPEEDUPS), "comparison, exit rate (x100)", {})}
    built: dict[tuple[str, str, str], tuple | None] = {}  # claims share references (cosee / energy)
    out = {}
    for name, (claim, parts) in CLAIMS.items():
        kind = parts[0][0]  # one kind per claim: its tests share the columns
        rows, columns = {}, None
        for k, ref, sig, wanted in parts:
            if (k, ref, sig) not in built:
                built[(k, ref, sig)] = kinds[k][0](ref, sig)
            got = built[(k, ref, sig)]
            if got is None:
                continue
            have, columns = got[0], got[1]
            rows.update({f"{row} minus {ref} / {sig}": have[row] for row in wanted if row in have})
        if rows:
            out[name] = (claim, _paired_frame(rows, columns, kinds[kind][1], **kinds[kind][2]))
    return out


def budget_versus_table(results: list[CellResult], operating: HeldOut | None = None) -> pd.DataFrame | None:
    """Early exit against a smaller model of the same speed: every (configuration, exit signal)
    row's metric at the speed-up of each budget row (final-only trained with ``--num-layers K`` of
    M layers: M / K, all inputs through K layers) minus that budget row's, paired by seed (x100;
    ``_paired_frame``), held out when ``operating`` is given, else oracle, read as in
    ``versus_table``. A row above zero is an early-exit model that beats simply training a smaller
    one. None when there is no budget row or nothing to compare it with."""
    groups = group_cells(results)
    budgets = [g for g in groups if g.method == "final-only"
               and g.cells[0].config.get("num_layers", 0) < g.cells[0].config.get("backbone_layers", 0)]
    fronts = [g for g in groups if g.method != "final-only"]
    if not budgets or not fronts:
        return None

    columns, base = [], []
    for b in budgets:
        first = next((r for r in b.cells if r.sweeps), None)
        if first is None:  # a hand-made cell with no sweep has no point to compare with
            continue
        s0 = sorted(first.sweeps)[0]  # a final-only cell's sweeps are one and the same point
        x = round(float(first.sweeps[s0].points[0]["speedup"]), 6)
        columns.append(f"{b.label} ({x:.2f}x)")
        base.append((x, {r.seed: _front_value(r, sorted(r.sweeps)[0], x, operating) for r in b.cells if r.sweeps}))
    if not base:
        return None
    rows = {}
    for g in fronts:
        for s in sorted({s for r in g.cells for s, sw in r.sweeps.items() if not is_fixed(sw)}):
            cols = []
            for x, ref in base:
                pairs = [(_front_value(r, s, x, operating), ref[r.seed]) for r in sorted(g.cells, key=lambda r: r.seed)
                         if r.seed in ref and s in r.sweeps and not is_fixed(r.sweeps[s])]
                cols.append([a - b for a, b in pairs if not (math.isnan(a) or math.isnan(b))])
            if any(cols):
                rows[f"{g.label} / {s}"] = cols
    if not rows:
        return None
    return _paired_frame(rows, columns, "configuration / exit signal, minus the budget row at its speed-up")


def _reference(results: list[CellResult], reference: str | None, signal: str) -> tuple[str, str]:
    """(configuration label, exit signal) of ``--reference LABEL[/SIGNAL]``: the signal defaults to
    the report's; None means cosee. A label or signal the results lack is one line naming those
    they have."""
    if reference is None:
        return "cosee", signal
    groups = [g for g in group_cells(results) if g.method != "final-only"]
    labels = list(dict.fromkeys(g.label for g in groups))
    if reference in labels:
        return reference, signal
    label, _, sig = reference.rpartition("/")
    if label not in labels:
        raise EebenchError(f"--reference {reference!r} is no configuration of these results; known: "
                           f"{', '.join(labels)} (each optionally /SIGNAL, e.g. cosee/entropy)")
    have = sorted({s for g in groups if g.label == label for r in g.cells for s, sw in r.sweeps.items()
                   if not is_fixed(sw)})
    if sig not in have:
        raise EebenchError(f"--reference {reference!r}: {label} has no {sig!r} front; its signals: {', '.join(have)}")
    return label, sig


def render(df: pd.DataFrame, fmt: str) -> str:
    if fmt == "markdown":
        return df.to_markdown(disable_numparse=bool(df.attrs.get("as_text")))
    if fmt == "latex":
        from tabulate import tabulate

        return tabulate(df, headers="keys", tablefmt="latex_booktabs", disable_numparse=bool(df.attrs.get("as_text")))
    if fmt == "csv":
        return df.to_csv()
    raise EebenchError(f"unknown format {fmt!r}; known: markdown, latex, csv")


def results_from_mlflow(tracking_uri: str, task: str | None = None) -> list[CellResult]:
    """Cell results logged to MLflow (the result.json artefact of every child run), each cell once:
    every command logs the cells it covered under its own parent, so a cell reused by several runs
    has several child runs; the newest finished one has every sweep the cell has. A child run that
    has not finished (a cell still training, or one that failed or was killed) has no result yet:
    it is left out, and said so on stderr."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exps = [e for e in client.search_experiments() if e.name.startswith("eebench-")
            and (task is None or e.name == f"eebench-{task}")]
    out, unfinished = [], []
    for e in exps:
        seen: set[str] = set()
        for run in client.search_runs([e.experiment_id], filter_string="tags.eebench_cell_id != ''",
                                      order_by=["attributes.start_time DESC"], max_results=50000):
            if run.data.tags.get("eebench_tune"):  # tune trials are not method results
                continue
            if run.info.status != "FINISHED":
                unfinished.append(f"{run.info.run_name} ({run.info.status.lower()})")
                continue
            if run.data.tags["eebench_cell_id"] in seen:
                continue
            seen.add(run.data.tags["eebench_cell_id"])
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                p = client.download_artifacts(run.info.run_id, "result.json", tmp)
                out.append(CellResult.model_validate(json.loads(Path(p).read_text())))
    if unfinished:
        print(f"note: left out {len(unfinished)} MLflow run(s) that have not finished: {', '.join(unfinished[:5])}"
              + (" ..." if len(unfinished) > 5 else ""), file=sys.stderr, flush=True)
    # the order of a results folder (find_results: <task>/<method>-s<seed>-<id>/, sorted), so that
    # sums over cells add up in the same order and both sources give the same bytes
    return sorted(out, key=lambda r: (r.task, f"{r.method}-s{r.seed}-{r.cell_id}"))


def pareto_panels(results: list[CellResult], metric: str) -> dict[str, tuple[dict, dict]]:
    """The report's Pareto figure (``plot_pareto_panels``): one panel per exit signal that two or
    more configurations were swept with, each configuration's mean oracle front over its seeds with
    a min-max band (``mean_curves``); the policies only one configuration has (a baseline's own
    exit rule) share a last panel, labelled "configuration / policy". With one configuration every
    signal has its own panel."""
    groups = group_cells(results)
    by_signal: dict[str, dict[str, list]] = {}
    for g in groups:
        label = g.label.replace("/", "|")  # " / " separates a configuration from its policy
        for r in sorted(g.cells, key=lambda r: r.seed):
            for s, sw in r.sweeps.items():
                by_signal.setdefault(s, {}).setdefault(label, []).append(sw)
    shared = {s: c for s, c in sorted(by_signal.items()) if len(c) > 1 or len(groups) == 1}
    own = {f"{label} / {s}": sws for s, c in sorted(by_signal.items()) if s not in shared for label, sws in c.items()}
    panels = {f"{s} exits": mean_curves(c, metric) for s, c in shared.items()}
    if own:
        panels["policies of one configuration"] = mean_curves(own, metric)
    return panels


def report(results: list[CellResult], out_dir: str | Path | None, fmt: str = "markdown", speedup: float = 2.0,
           signal: str = "energy", operating: str = "heldout", target: Target | None = None,
           split: SplitSpec | None = None, logits: dict[str, Path] | None = None, log_to: str | None = None,
           reference: str | None = None) -> str:
    """Every table for every task in ``results``; with ``out_dir``, also files and one Pareto plot per task.

    ``operating``: ``heldout`` (default: thresholds chosen on a calibration part of dev, scored on
    the rest; see ``HeldOut``), ``oracle`` (chosen and scored on the same dev set) or ``both``.
    ``target``: the main table's operating point (default: ``speedup``); ``logits``: where each
    cell's cached dev logits are (``logits_index``); ``reference``: the configuration label every
    other one is compared with, paired by seed (``versus_table``), with ``signal`` exits or, as
    ``LABEL/SIGNAL``, with that signal's; None: ``cosee`` where there is such a row. A reference
    that labels no row of any task is an error naming the labels."""
    if not results:
        raise EebenchError("no results to report")
    reference, ref_signal = _reference(results, reference, signal)
    if operating not in ("heldout", "oracle", "both"):
        raise EebenchError(f"unknown --operating {operating!r}; known: heldout, oracle, both")
    target = target or Target(speedup=speedup)
    target.check()
    held = (HeldOut(split, logits, prefetch=(target, *(Target(speedup=x) for x in SPEEDUPS)))
            if operating != "oracle" else None)
    from eebench.util import atomic_write as _atomic

    text = []
    written: dict[str, list[Path]] = {}
    tasks = sorted({r.task for r in results})
    for task in tasks:
        rs = [r for r in results if r.task == task]
        metric = rs[0].config["main_metric"]
        pool = sorted({str(r.model.get("pooling")) for r in rs})
        head_lr = sorted({str(r.model.get("head_lr")) for r in rs})
        seeds = sorted({r.seed for r in rs})
        batching = sorted({batching_of(r) for r in rs})
        hdr = (f"## {task}: dev {metric} (x100), model {rs[0].config['model']}, exit pooling {', '.join(pool)}, "
               f"head lr {', '.join(head_lr)}, training batches {' and '.join(batching)}, "
               f"seeds {', '.join(map(str, seeds))}")
        tables = {}
        name = (f"main_{target.speedup:g}x" if target.kind == "speedup" else f"main_drop{target.drop:g}"
                if target.kind == "drop" else f"main_eps{target.epsilon:g}_delta{target.delta:g}")
        if held is not None:
            tables[name] = (f"held-out {metric}: {target.describe()}, threshold chosen on a calibration part, scored on "
                            f"the evaluation part ({held.describe()}); mean ± std over seeds x splits, (speed-up reached "
                            "on evaluation); n/a: target not reached on calibration, or no cached logits",
                            main_table(rs, speedup, held, target))
        if held is None or operating == "both":
            tables[f"main_{speedup:g}x_oracle"] = (
                f"oracle {metric} at >= {speedup:g}x speed-up (best point of the Pareto front at or above it, chosen "
                "and scored on the same dev set: optimistic)", main_table(rs, speedup))
        tables["layers"] = ("per-layer dev score of each exit classifier (last row, where the task has classes: "
                            "always answering the dev set's majority class)", layer_table(rs))
        tables["cells"] = ("the cells behind these tables: training cost, machine, early exit checked against "
                           "the simulation", cells_table(rs, signal, held, target))
        if held is not None:
            abl = ablation_table(rs, signal, operating=held)
            if len(abl):
                tables[f"ablation_{signal}"] = (f"held-out ablation ({signal} exits) at several speed-ups "
                                                f"({held.describe()})", abl)
        if held is None or operating == "both":
            abl = ablation_table(rs, signal)
            if len(abl):
                tables[f"ablation_{signal}_oracle"] = (f"oracle ablation ({signal} exits) at several speed-ups", abl)
        ref_name = _file_part(reference) + (f"_{_file_part(ref_signal)}" if ref_signal != signal else "")
        for suffix, how in (([("", f"held out ({held.describe()})")] if held is not None else [])
                            + ([("_oracle" if held is not None else "", "oracle")]
                               if held is None or operating == "both" else [])):
            vs = versus_table(rs, reference, ref_signal, operating=held if how != "oracle" else None)
            if vs is not None:
                tables[f"versus_{ref_name}{suffix}"] = (
                    f"{how} difference from {reference} with {ref_signal} exits at several speed-ups (x100), "
                    f"{PAIRED_NOTE}", vs)
        budget = budget_versus_table(rs, held)
        if budget is not None:
            tables["versus_budget"] = (
                f"{'held out' if held is not None else 'oracle'} score of each configuration and exit signal at the "
                "speed-up of each budget row (final-only trained on fewer layers) minus that row's (x100; above 0: "
                f"early exit beats simply training a smaller model), {PAIRED_NOTE}", budget)
        dis = dis_versus_table(rs, reference, ref_signal)
        if dis is not None:
            tables[f"dis_versus_{ref_name}"] = (
                f"difficulty inversion score (Fig. 5) of each internal layer minus {reference}'s, {ref_signal} exits, "
                f"{PAIRED_NOTE}", dis)
        rates = exit_rates_versus_table(rs, reference, ref_signal)
        if rates is not None:
            tables[f"exit_rates_versus_{ref_name}"] = (
                f"premature and delayed exiting rates (Fig. 11; x100, whole dev set, lower is better) minus "
                f"{reference}'s at several speed-ups, {ref_signal} exits, {PAIRED_NOTE}", rates)
        for name, (claim, df) in claims_tables(rs, held).items():
            tables[name] = (f"the paper's {name.replace('claim', 'claim ')}: {claim}; its paired comparisons "
                            f"({'held out' if held is not None else 'oracle'} where a front is read), "
                            f"{PAIRED_NOTE_FOR.format(family='claim')}", df)
        text.append(hdr)
        for name, (caption, df) in tables.items():
            rendered = render(df, fmt)
            text += [f"\n### {caption}\n", rendered]
            if out_dir:
                ext = {"markdown": "md", "latex": "tex", "csv": "csv"}[fmt]
                p = Path(out_dir) / task / f"{name}.{ext}"
                p.parent.mkdir(parents=True, exist_ok=True)
                _atomic(p, lambda f, t=rendered: Path(f).write_text(t + "\n"))
        if out_dir:
            png = plot_pareto_panels(
                pareto_panels(rs, metric), Path(out_dir) / task / "pareto.png", metric=metric,
                title=f"{task}: {rs[0].config['model']}, {', '.join(pool)} pooling; oracle fronts, mean over seeds "
                      f"(band: min-max)")
            text.append(f"\nPareto plot (oracle fronts, one panel per exit signal, mean over seeds): {png}")
            from eebench.reports import analyses

            files = analyses.write_all(report_groups(rs), Path(out_dir) / task / "analyses", task,
                                       signals=[signal], target=speedup, label_names=_label_names(rs))
            written.setdefault(task, []).extend([Path(out_dir) / task / "pareto.png", *files])
            if files:
                text.append("Analyses (PNG + CSV): " + ", ".join(sorted({f.stem for f in files})) + f" in "
                            f"{Path(out_dir) / task / 'analyses'}")
        text.append("")
    from eebench.reports import analyses

    kinds = ([("", held.point, f"held-out ({held.describe()}; mean over seeds of the mean over splits)")]
             if held is not None else []) + (
        [("_oracle" if held is not None else "", None, "oracle: chosen and scored on the same dev set")]
        if held is None or operating == "both" else [])
    crosses = []
    for suffix, pick, how in kinds:
        df = analyses.cross_task_table({t: report_groups([r for r in results if r.task == t]) for t in tasks},
                                       signal=signal, speedup=speedup, operating_point=pick)
        caption = (f"Table 2 layout, {how}: dev metric (x100) at >= {speedup:g}x with {signal} exits (reached "
                   "speed-up and seeds in brackets); final-only rows are the full model (1.00x) and budget exiting")
        text += [f"## All tasks\n\n### {caption}\n", render(df, fmt), ""]
        crosses.append((suffix, df))
    for suffix, df in crosses if out_dir else []:
        base = Path(out_dir) / f"table2_{signal}_{speedup:g}x{suffix}"
        for f, ext in (("markdown", "md"), ("latex", "tex"), ("csv", "csv")):
            rendered = render(df, f)
            path = base.with_name(f"{base.name}.{ext}")
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic(path, lambda p, t=rendered: Path(p).write_text(t + "\n"))
            written.setdefault("", []).append(path)
    if log_to and out_dir:
        from eebench.runs.tracking import log_report

        for task, files in written.items():
            url = log_report(log_to, task or None, files, Path(out_dir) / task if task else Path(out_dir))
            text.append(f"logged {len(files)} report files to MLflow: {url}")
    return "\n".join(text)


def _short(target: Target) -> str:
    """A target in a column header: ">= 2x", "drop 0.01", "eps 0.05 / delta 0.1"."""
    if target.kind == "speedup":
        return f">= {target.speedup:g}x"
    return f"drop {target.drop:g}" if target.kind == "drop" else f"eps {target.epsilon:g} / delta {target.delta:g}"


def _file_part(label: str) -> str:
    """A configuration label as part of a file name (letters, digits, '-', '.', '=' kept)."""
    import re

    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")


def batching_of(r: CellResult) -> str:
    """How a cell's training batches were formed. Cells written before the option was recorded
    used length-grouped batches (the default then and now)."""
    return "length-grouped" if r.config.get("group_by_length", True) else "random"


def report_groups(results: list[CellResult]) -> list[tuple[str, list[CellResult]]]:
    """(label, cells) per configuration, as ``group_cells`` groups and labels them, in the tables' order."""
    return [(g.label, list(g.cells)) for g in group_cells(results)]


def _label_names(results: list[CellResult]) -> list[str] | None:
    try:
        from eebench.data import get_task

        spec = get_task(results[0].data.get("task_source", results[0].task))
        return list(spec.label_names) if spec.label_names else None
    except Exception:  # noqa: BLE001 - label names only decorate a figure
        return None


def load_results(results_dir: str | None, tracking_uri: str | None, task: str | None) -> list[CellResult]:
    """Cell results from a folder (an unreadable cell is named on stderr and left out) or an
    MLflow store (an unreachable one is one line naming it)."""
    if tracking_uri:
        rs = _results_from_mlflow_or_say_why(tracking_uri, task)
    else:
        if not results_dir or not Path(results_dir).exists():
            raise EebenchError(f"results folder {results_dir} does not exist; pass --results DIR or --tracking-uri URI")
        skipped: list[tuple[Path, str]] = []
        rs = find_results(results_dir, skipped)
        for _, why in skipped:
            print(f"warning: skipped {why}; rerun `eebench run` with this cell's settings to rebuild it",
                  file=sys.stderr, flush=True)
    if task:
        rs = [r for r in rs if r.task == task]
    if not rs:
        raise EebenchError(f"no eebench results found in {tracking_uri or results_dir}" + (f" for task {task}" if task else ""))
    return rs


def _results_from_mlflow_or_say_why(tracking_uri: str, task: str | None) -> list[CellResult]:
    from eebench.runs.tracking import Tracker

    hint = "start it, or report from the local files with --results DIR"
    if tracking_uri.startswith(("http://", "https://")) and not Tracker._reachable(tracking_uri):
        raise EebenchError(f"MLflow tracking server {tracking_uri} is unreachable; {hint}")
    try:
        return results_from_mlflow(tracking_uri, task)
    except EebenchError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types (MlflowException, requests, sqlalchemy)
        raise EebenchError(f"cannot read results from MLflow at {tracking_uri} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); {hint}") from None
