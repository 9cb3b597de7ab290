"""Sweep tables, Pareto staircases and plots of cells: what the tracker logs per cell and the
reports draw (their own module, so that tracking and reports do not import each other)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from eebench.runs.results import CellResult, SignalSweep


def _method_order(m: str) -> tuple[int, str]:
    order = ["final-only", "two-stage", "vanilla", "weighted", "cosee-no-swm", "cosee-no-osc", "cosee"]
    return (order.index(m) if m in order else len(order), m)

#: A fixed operating point within this relative distance of the target speed-up counts as matched.
FIXED_POINT_MATCH = 0.05


def is_fixed(sw: SignalSweep) -> bool:
    """Whether a sweep is of a policy with a fixed operating point (one point per model; the
    runner records its threshold as the summary key ``fixed_threshold``)."""
    return sw.summary.get("fixed_threshold") is not None


def fixed_note(speedup: float, target: float) -> str:
    """How a table marks a fixed operating point: its own speed-up, and when it is farther than
    ``FIXED_POINT_MATCH`` from the target, that the target was not matched (never interpolated)."""
    far = abs(speedup - target) > FIXED_POINT_MATCH * target
    return f"{speedup:.2f}x fixed point" + (f", not {target:g}x" if far else "")


def sweep_frame(sw: SignalSweep, digits: int = 4) -> pd.DataFrame:
    """One row per threshold, readable: the metric columns first, then speed-up, threshold,
    Pareto flag, the premature / delayed rates and the exit counts per layer; floats rounded
    (thresholds to 6 significant digits, since energies can be tiny). ``layer_speedup`` only
    appears when it differs from ``speedup`` (budget exiting with --num-layers)."""
    rows = []
    for p in sw.points:
        r = {k: v for k, v in p.items() if k != "exit_counts"}
        for m, c in enumerate(p["exit_counts"], start=1):
            r[f"exits_layer{m}"] = c
        rows.append(r)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if "layer_speedup" in df and (df["layer_speedup"] - df["speedup"]).abs().max() < 1e-12:
        df = df.drop(columns="layer_speedup")
    fixed = ["threshold", "speedup", "layer_speedup", "pareto", "premature_rate", "delayed_rate"]
    metrics = [c for c in df.columns if c not in fixed and not c.startswith("exits_layer")]
    order = metrics + [c for c in ["speedup", "layer_speedup", "threshold", "pareto", "premature_rate", "delayed_rate"]
                       if c in df] + [c for c in df.columns if c.startswith("exits_layer")]
    df = df[order]
    for c in df.columns:
        if c == "threshold":
            # a fixed operating point (final-only, a router) has no threshold: kept empty
            df[c] = [None if x is None else float(f"{x:.6g}") for x in df[c]]
        elif df[c].dtype.kind == "f":
            df[c] = df[c].round(digits)
    return df


def _front(sw: SignalSweep, metric: str) -> tuple[list[float], list[float]]:
    pts = sorted((p["speedup"], p[metric]) for p in sw.points if p.get("pareto"))
    return [p[0] for p in pts], [p[1] for p in pts]


def staircase(xs: list[float], ys: list[float], start: float = 1.0) -> tuple[list[float], list[float]]:
    """The path of "best score at speed-up >= x" through front points (speed-up ascending, score
    descending), from ``start`` on: flat at each point's score up to its speed-up, then down to the
    next one. This is the curve whose area ``area_under_front`` measures and from which
    "score at Xx" is read."""
    if not xs:
        return [], []
    px, py = [min(start, xs[0])], [ys[0]]
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        px.append(x)
        py.append(y)
        if i + 1 < len(xs):
            px.append(x)
            py.append(ys[i + 1])
    return px, py


def full_model_point(sw: SignalSweep, metric: str) -> float | None:
    """The score of the full model (every input leaves at the last layer: speed-up 1.0), if swept."""
    vals = [p[metric] for p in sw.points if abs(p["speedup"] - 1.0) < 1e-9]
    return max(vals) if vals else None


def mean_curves(cells: dict[str, list[SignalSweep]], metric: str
                ) -> tuple[dict[str, SignalSweep], dict[str, tuple[list[float], list[float], list[float]]]]:
    """Seeds aggregated for a plot: per label, its sweeps' mean Pareto front (``mean_front``, with
    the mean full-model point at 1.0x when every seed has one) and the (speed-ups, min, max) band;
    a fixed operating point keeps one marker per seed and has no band."""
    from eebench.exits.rule import mean_front

    curves, bands = {}, {}
    for label, sws in cells.items():
        if not sws:
            continue
        if all(is_fixed(sw) for sw in sws):  # one point per seed: markers, no mean curve
            curves[label] = SignalSweep(signal=sws[0].signal, points=[p for sw in sws for p in sw.points],
                                        summary={"fixed_threshold": sws[0].summary["fixed_threshold"]})
            continue
        xs, mean, lo, hi = mean_front([_front(sw, metric) for sw in sws])
        points = [{"speedup": x, metric: y, "pareto": True} for x, y in zip(xs, mean, strict=True)]
        fulls = [full_model_point(sw, metric) for sw in sws]
        if fulls and all(f is not None for f in fulls):
            points.append({"speedup": 1.0, metric: sum(fulls) / len(fulls), "pareto": False})
        curves[label] = SignalSweep(signal=sws[0].signal, points=points, summary={})
        bands[label] = (xs, lo, hi)
    return curves, bands


#: Line styles that, with the ten default colours, tell up to 40 curves apart.
_STYLES = ["-", "--", ":", "-."]


def _draw_pareto(ax, curves: dict[str, SignalSweep], metric: str,
                 bands: dict[str, tuple[list[float], list[float], list[float]]] | None = None,
                 look: dict[str, tuple[str, str, float]] | None = None) -> None:
    """Draw ``plot_pareto``'s curves on one axes. ``look`` fixes a label's (colour, line style,
    width) (the same configuration looks the same in every panel); without it labels
    "method / signal[ / seed]" are coloured by signal and styled by method, so that curves that
    coincide (entropy and max softmax are monotone in each other for 2 classes) stay visible."""
    import matplotlib.pyplot as plt

    parts = {label: [p.strip() for p in label.split("/")] for label in curves}
    methods = list(dict.fromkeys(p[0] for p in parts.values()))
    signals = list(dict.fromkeys(p[1] if len(p) > 1 else p[0] for p in parts.values()))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax.axvline(1.0, color="0.6", linewidth=0.8, linestyle=":", zorder=0)
    full_marked = False
    for label, sw in curves.items():
        fixed = is_fixed(sw)
        # a fixed operating point: every point (one per model / seed) as a marker, never a line
        xs, ys = ([p["speedup"] for p in sw.points], [p[metric] for p in sw.points]) if fixed else _front(sw, metric)
        if not xs:
            continue
        if look and label in look:
            colour, style, width = look[label]
        else:
            p = parts[label]
            colour = colours[signals.index(p[1] if len(p) > 1 else p[0]) % len(colours)]
            style = _STYLES[methods.index(p[0]) % len(_STYLES)]
            width = 1.2 + 0.8 * (methods.index(p[0]) % 2)
        if fixed or len(xs) == 1:
            # a star only for a fixed operating point; a tunable policy whose front is one point
            # (every other threshold dominated) gets a diamond, so the two never look alike
            ax.plot(xs, ys, marker="*" if fixed else "D", markersize=11 if fixed else 6, linestyle="none",
                    color=colour, label=label)
        else:
            sx, sy = staircase(xs, ys)
            ax.plot(sx, sy, linestyle=style, linewidth=width, color=colour, label=label)
            ax.plot(xs, ys, marker="o", markersize=2.5, linestyle="none", color=colour)
        if bands and label in bands and not fixed:
            bx, lo, hi = bands[label]
            if len(bx) > 1:  # the same staircase as the curve: flat from 1.0x to the first point
                start = [min(1.0, bx[0])]
                ax.fill_between(start + list(bx), lo[:1] + list(lo), hi[:1] + list(hi), step="pre", color=colour,
                                alpha=0.12, linewidth=0)
        full = None if fixed else full_model_point(sw, metric)
        if full is not None:
            ax.plot([1.0], [full], marker="s", markersize=7, markerfacecolor="none", markeredgecolor="black",
                    linestyle="none", label=None if full_marked else "full model (1.0x)")
            full_marked = True
    ax.set_xlabel("speed-up (layers, Eq. 12)")
    ax.set_ylabel(f"dev {metric}")
    ax.grid(alpha=0.3)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from eebench.util import atomic_write as _atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def plot_pareto(curves: dict[str, SignalSweep], path: str | Path, title: str = "", metric: str = "accuracy",
                bands: dict[str, tuple[list[float], list[float], list[float]]] | None = None) -> Path:
    """One staircase per label (its Pareto front, drawn as the step function the summaries read),
    metric against speed-up, with the full model (1.0x) marked; a fixed operating point
    (``is_fixed``: one point per model) is drawn as star markers only, a tunable front of one point
    as a diamond; ``bands`` optionally shades a
    (speed-ups, low, high) range around a label's curve (seeds). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    _draw_pareto(ax, curves, metric, bands)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return _save(fig, path)


def configuration_looks(bases: list[str]) -> dict[str, tuple]:
    """(colour, line style) of each configuration, distinct for up to 80. Up to ten: the default
    colours, solid lines; more (a study with its baselines): tab20's twenty (pairs of a dark and a
    light shade), every second one dashed, and past twenty the colours come round again with the
    next line style."""
    import matplotlib.pyplot as plt

    many = len(bases) > 10
    colours = list(plt.get_cmap("tab20").colors) if many else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {b: (colours[i % len(colours)],
                _STYLES[(i % 2 + i // len(colours)) % len(_STYLES)] if many else _STYLES[0])
            for i, b in enumerate(bases)}


def plot_pareto_panels(panels: dict[str, tuple[dict[str, SignalSweep], dict]], path: str | Path, title: str = "",
                       metric: str = "accuracy", ncols: int = 2) -> Path:
    """Several ``plot_pareto`` axes in one figure (e.g. one per exit signal: panel title ->
    (curves, bands)), one legend for all of them beside the panels. A label keeps its colour and
    line style in every panel; a label "X / signal" (a policy only one configuration has) takes
    X's. Written atomically."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(label.split(" / ")[0] for curves, _ in panels.values() for label in curves))
    looks = configuration_looks(bases)
    look = {label: (*looks[label.split(" / ")[0]], 1.4) for curves, _ in panels.values() for label in curves}
    n = max(1, len(panels))
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 2.8, 3.4 * rows + 0.5), dpi=120, squeeze=False,
                             layout="constrained")
    for ax, (name, (curves, bands)) in zip(axes.flat, panels.items(), strict=False):
        _draw_pareto(ax, curves, metric, bands, look)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def seed_summary(results: list[CellResult], signal: str, digits: int | None = 4) -> pd.DataFrame:
    """Per method: the number of seeds and the mean / std over seeds of every summary of one
    signal's sweep (``<metric>_at_<x>x``, ``auc``, ``best``; an unreached speed-up counts as missing,
    so its mean is over the seeds that reached it and ``<key>_n`` says how many did); rounded to
    ``digits`` unless None."""
    rows = []

    def rnd(x: float) -> float:
        return float(x) if digits is None else round(float(x), digits)

    for m in sorted({r.method for r in results if signal in r.sweeps}, key=_method_order):
        rs = [r for r in results if r.method == m and signal in r.sweeps]
        row: dict[str, object] = {"method": m, "seeds": len(rs)}
        keys = list(dict.fromkeys(k for r in rs for k in r.sweeps[signal].summary))
        for k in keys:
            xs = pd.Series([r.sweeps[signal].summary.get(k) for r in rs], dtype="float64").dropna()
            row[f"{k}_mean"] = rnd(xs.mean()) if len(xs) else None
            row[f"{k}_std"] = rnd(xs.std(ddof=1)) if len(xs) > 1 else None
            if len(xs) != len(rs):
                row[f"{k}_n"] = len(xs)
        rows.append(row)
    return pd.DataFrame(rows)
