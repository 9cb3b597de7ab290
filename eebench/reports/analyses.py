"""The COSEE paper's analyses, from cell results: each one a figure (PNG) and the table behind it
(CSV), seeds aggregated (mean ± std over the cells of one configuration).

Every function here takes *groups*: ``(label, cells)`` pairs, one per configuration (the same
training setup, several seeds), as ``eebench.reports.report`` groups them. Nothing here trains or runs a
model; everything is read from ``result.json`` (sweep points, per-layer DIS, per-epoch history).

- ``cross_task_table``: the paper's Table 2 layout (methods x tasks at a matched speed-up);
- ``ablation_curves``: cosee vs its ablations vs vanilla, metric against speed-up (Fig. 4);
- ``dis_heatmap``: difficulty inversion score per layer, configurations x layers (Fig. 5);
- ``training_curves``: per-layer dev metric per epoch (Fig. 6);
- ``exit_distribution``: exit layers at one operating point, split by gold label (Figs. 1, 7);
- ``exit_rates``: premature and delayed exiting rates against speed-up (Fig. 11);
- ``signals_compared``: every exit signal's front under one training method (Figs. 8, 9).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from eebench.runs.plots import fixed_note, is_fixed
from eebench.runs.results import CellResult

Group = tuple[str, list[CellResult]]

ABLATION = ("cosee", "cosee-no-swm", "cosee-no-osc", "vanilla")


# --------------------------------------------------------------------------- aggregation helpers


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (NaN for one value: one seed says nothing about the spread) and count of
    the finite values."""
    xs = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if xs.size == 0:
        return float("nan"), float("nan"), 0
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else math.nan, int(xs.size)


def speedup_grid(groups: Sequence[Group], signal: str, n: int = 121) -> np.ndarray:
    """Speed-ups from 1 to the largest one reached by any cell of these groups."""
    top = 1.0
    for _, cells in groups:
        for c in cells:
            if signal in c.sweeps:
                top = max(top, max(p["speedup"] for p in c.sweeps[signal].points))
    return np.linspace(1.0, top, n)


def front_staircase(cell: CellResult, signal: str, metric: str, grid: np.ndarray) -> np.ndarray:
    """Best metric among the points at least ``x`` times faster, for every ``x`` of the grid
    (NaN where no point is that fast): the staircase that the "metric at Xx" summaries read."""
    pts = cell.sweeps[signal].points
    s = np.asarray([p["speedup"] for p in pts], dtype=float)
    v = np.asarray([p[metric] for p in pts], dtype=float)
    order = np.argsort(-s)
    best = np.maximum.accumulate(v[order])  # best score among points at least as fast
    s_desc = s[order]
    # for each x, the last index in descending order whose speed-up is >= x
    k = np.searchsorted(-s_desc, -grid + 1e-9, side="right") - 1
    out = np.where(k >= 0, best[np.clip(k, 0, None)], np.nan)
    return out


def rate_curve(cell: CellResult, signal: str, key: str, grid: np.ndarray) -> np.ndarray:
    """A per-point rate (premature / delayed) as a function of speed-up, linearly interpolated
    between the swept points, NaN outside the range the cell reached."""
    pts = [p for p in cell.sweeps[signal].points if p.get(key) is not None and not math.isnan(p[key])]
    if not pts:
        return np.full_like(grid, np.nan)
    s = np.asarray([p["speedup"] for p in pts], dtype=float)
    v = np.asarray([p[key] for p in pts], dtype=float)
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    # several thresholds can share one speed-up; average them so interpolation is well defined
    us, inv = np.unique(s, return_inverse=True)
    uv = np.bincount(inv, weights=v) / np.bincount(inv)
    out = np.interp(grid, us, uv)
    out[(grid < us[0] - 1e-9) | (grid > us[-1] + 1e-9)] = np.nan
    return out


def _stack_mean_std(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.vstack(rows)
    n = np.sum(~np.isnan(a), axis=0)
    with np.errstate(all="ignore"):
        mean = np.where(n > 0, np.nansum(a, axis=0) / np.maximum(n, 1), np.nan)
        sq = np.nansum((a - mean) ** 2, axis=0)
        std = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)), np.nan)  # one seed: no spread known
    return mean, std, n


def _metric(cells: list[CellResult]) -> str:
    return cells[0].config["main_metric"]


def _with_signal(groups: Sequence[Group], signal: str) -> list[Group]:
    out = []
    for label, cells in groups:
        cs = [c for c in cells if signal in c.sweeps]
        if cs:
            out.append((label, cs))
    return out


def _trains_exits(cells: list[CellResult]) -> bool:
    return cells[0].method != "final-only"


def _seeds_note(cells: list[CellResult]) -> str:
    return f"n={len(cells)}"


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from eebench.util import atomic_write as _atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, lambda p: fig.savefig(p, format="png"))
    _plt().close(fig)
    return path


def _save_csv(df: pd.DataFrame, path: Path) -> Path:
    from eebench.util import atomic_write as _atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    text = df.to_csv(index=False, float_format="%.6g")
    _atomic(path, lambda p: Path(p).write_text(text))
    return path


def _colours(n: int) -> list:
    plt = _plt()
    base = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [base[i % len(base)] for i in range(n)]


def _panels(n: int, width: float, height: float, dpi: int = 110):
    """A figure with ``n`` panels, three to a row, sharing the y axis; the unused ones hidden."""
    plt = _plt()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=dpi, squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def curves_frame(groups: Sequence[Group], signal: str, value: Callable[[CellResult, np.ndarray], np.ndarray],
                 grid: np.ndarray, name: str) -> pd.DataFrame:
    """One row per (group, speed-up): mean, std and number of cells of ``value`` on the grid."""
    rows = []
    for label, cells in groups:
        mean, std, n = _stack_mean_std([value(c, grid) for c in cells])
        for x, m, s, k in zip(grid, mean, std, n, strict=True):
            rows.append({"config": label, "signal": signal, "speedup": float(x), f"{name}_mean": m,
                         f"{name}_std": s, "n": int(k)})
    return pd.DataFrame(rows)


def _draw_bands(ax, df: pd.DataFrame, name: str, scale: float = 100.0, styles=None) -> None:
    labels = list(dict.fromkeys(df["config"]))
    for i, (label, colour) in enumerate(zip(labels, _colours(len(labels)), strict=True)):
        d = df[(df["config"] == label) & (df["n"] > 0)]
        if d.empty:
            continue
        n = int(d["n"].max())
        style = (styles or {}).get(label, "-")
        ax.plot(d["speedup"], scale * d[f"{name}_mean"], style, color=colour, linewidth=1.6 + 0.4 * (i % 2),
                label=f"{label} ({'seed' if n == 1 else 'seeds'}: {n})", drawstyle="steps-post" if name == "metric" else None)
        if n > 1:
            ax.fill_between(d["speedup"], scale * (d[f"{name}_mean"] - d[f"{name}_std"]),
                            scale * (d[f"{name}_mean"] + d[f"{name}_std"]), color=colour, alpha=0.15,
                            step="post" if name == "metric" else None)


def ablation_curves(groups: Sequence[Group], out: Path, signal: str = "energy", task: str = "") -> list[Path]:
    """COSEE, cosee-no-swm, cosee-no-osc and vanilla: metric against speed-up, seeds as bands."""
    sel = [(label, cells) for label, cells in _with_signal(groups, signal) if cells[0].method in ABLATION]
    if not sel:
        return []
    sel.sort(key=lambda g: ABLATION.index(g[1][0].method))
    metric = _metric(sel[0][1])
    grid = speedup_grid(sel, signal)
    df = curves_frame(sel, signal, lambda c, g: front_staircase(c, signal, metric, g), grid, "metric")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    _draw_bands(ax, df, "metric")
    ax.set_xlabel("speed-up (layers, Eq. 12)")
    ax.set_ylabel(f"dev {metric} (x100), best point at >= x")
    ax.set_title(f"{task}: ablation of COSEE ({signal} exits); bands: ± 1 std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    return [_save(fig, out / f"ablation_{signal}.png"), _save_csv(df, out / f"ablation_{signal}.csv")]


def dis_frame(groups: Sequence[Group], signal: str) -> pd.DataFrame:
    """Mean ± std over seeds of the DIS of every internal layer (the final layer never exits)."""
    rows = []
    for label, cells in _with_signal(groups, signal):
        if not _trains_exits(cells):
            continue
        per_cell = [c.sweeps[signal].dis for c in cells if c.sweeps[signal].dis]
        if not per_cell:
            continue
        m = len(per_cell[0])
        for layer in range(m - 1):
            mean, std, n = _mean_std([d[layer] if d[layer] is not None else float("nan") for d in per_cell])
            rows.append({"config": label, "signal": signal, "layer": layer + 1, "dis_mean": mean, "dis_std": std, "n": n})
    return pd.DataFrame(rows)


def dis_heatmap(groups: Sequence[Group], out: Path, signal: str = "energy", task: str = "") -> list[Path]:
    """Difficulty inversion score per internal layer, configurations x layers (higher is better)."""
    df = dis_frame(groups, signal)
    if df.empty:
        return []
    table = df.pivot(index="config", columns="layer", values="dis_mean")
    table = table.loc[list(dict.fromkeys(df["config"]))]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * table.shape[1], 1.2 + 0.45 * table.shape[0]), dpi=120)
    values = table.to_numpy(dtype=float)
    low = min(0.5, float(np.nanmin(values))) if np.isfinite(values).any() else 0.5
    im = ax.imshow(values, cmap="viridis", vmin=low, vmax=1.0, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [f"L{c}" for c in table.columns])
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table.iat[i, j]
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (low + 1.0) / 2 else "black")
    fig.colorbar(im, ax=ax, label="DIS (0.5: knows nothing)")
    ax.set_title(f"{task}: difficulty inversion score, {signal} (mean over seeds)", fontsize=9)
    fig.tight_layout()
    return [_save(fig, out / f"dis_{signal}.png"), _save_csv(df, out / f"dis_{signal}.csv")]


def training_frame(groups: Sequence[Group]) -> pd.DataFrame:
    """Per-layer dev metric after every epoch (and phase), mean ± std over seeds."""
    rows = []
    for label, cells in groups:
        metric = _metric(cells)
        by_point: dict[tuple[int, str, int], list[float]] = {}
        for c in cells:
            for k, entry in enumerate(c.training.get("history", [])):
                for layer, scores in enumerate(entry.get("layers", []), start=1):
                    key = (k, str(entry.get("phase", "")), layer)
                    by_point.setdefault(key, []).append(scores.get(metric, float("nan")))
        for (k, phase, layer), vals in sorted(by_point.items()):
            mean, std, n = _mean_std(vals)
            rows.append({"config": label, "epoch": k + 1, "phase": phase, "layer": layer, f"{metric}_mean": mean,
                         f"{metric}_std": std, "n": n})
    return pd.DataFrame(rows)


def training_curves(groups: Sequence[Group], out: Path, task: str = "") -> list[Path]:
    """One panel per configuration: every layer's dev metric after each epoch."""
    df = training_frame(groups)
    if df.empty:
        return []
    labels = list(dict.fromkeys(df["config"]))
    metric = [c for c in df.columns if c.endswith("_mean")][0][: -len("_mean")]
    fig, axes = _panels(len(labels), 4.2, 3.2)
    for ax, label in zip(axes.flat, labels, strict=False):
        d = df[df["config"] == label]
        layers = sorted(d["layer"].unique())
        for layer, colour in zip(layers, _colours(len(layers)), strict=True):
            e = d[d["layer"] == layer]
            ax.plot(e["epoch"], 100 * e[f"{metric}_mean"], "o-", color=colour, markersize=3, label=f"L{layer}")
            if int(e["n"].max()) > 1:
                ax.fill_between(e["epoch"], 100 * (e[f"{metric}_mean"] - e[f"{metric}_std"]),
                                100 * (e[f"{metric}_mean"] + e[f"{metric}_std"]), color=colour, alpha=0.15)
        ax.set_title(f"{label} (n={int(d['n'].max())})", fontsize=8)
        ax.set_xlabel("epoch (phase by phase)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"dev {metric} (x100)")
    _legend(axes[0, 0])
    fig.suptitle(f"{task}: per-layer dev {metric} during training", fontsize=10)
    fig.tight_layout()
    return [_save(fig, out / "training_curves.png"), _save_csv(df, out / "training_curves.csv")]


def _nearest_point(cell: CellResult, signal: str, target: float) -> dict:
    pts = cell.sweeps[signal].points
    return min(pts, key=lambda p: (abs(p["speedup"] - target), -p["speedup"]))


def exit_distribution_frame(groups: Sequence[Group], signal: str, target: float, label_names=None) -> pd.DataFrame:
    """Share of each gold label's dev samples leaving at each layer, at the threshold whose
    speed-up is nearest ``target`` in each cell (mean ± std over seeds)."""
    rows = []
    for label, cells in _with_signal(groups, signal):
        if not _trains_exits(cells):
            continue
        shares: dict[tuple[int, int], list[float]] = {}
        reached = []
        for c in cells:
            p = _nearest_point(c, signal, target)
            by_label = p.get("exit_counts_by_label")
            if by_label is None:
                continue
            reached.append(p["speedup"])
            for y, counts in enumerate(by_label):
                total = sum(counts)
                for layer, k in enumerate(counts, start=1):
                    shares.setdefault((y, layer), []).append(k / total if total else float("nan"))
        sp, _, _ = _mean_std(reached)
        for (y, layer), vals in sorted(shares.items()):
            mean, std, n = _mean_std(vals)
            name = label_names[y] if label_names and y < len(label_names) else str(y)
            rows.append({"config": label, "signal": signal, "speedup": sp, "gold_label": name, "layer": layer,
                         "share_mean": mean, "share_std": std, "n": n})
    return pd.DataFrame(rows)


def exit_distribution(groups: Sequence[Group], out: Path, signal: str = "energy", target: float = 2.0,
                      task: str = "", label_names=None) -> list[Path]:
    """Exit-layer histograms split by gold label, one panel per configuration."""
    df = exit_distribution_frame(groups, signal, target, label_names)
    if df.empty:
        return []
    labels = list(dict.fromkeys(df["config"]))
    fig, axes = _panels(len(labels), 4.2, 3.0)
    for ax, label in zip(axes.flat, labels, strict=False):
        d = df[df["config"] == label]
        golds = list(dict.fromkeys(d["gold_label"]))
        width = 0.8 / len(golds)
        for i, (g, colour) in enumerate(zip(golds, _colours(len(golds)), strict=True)):
            e = d[d["gold_label"] == g]
            ax.bar(e["layer"] + (i - (len(golds) - 1) / 2) * width, 100 * e["share_mean"], width=width, color=colour,
                   yerr=100 * e["share_std"].fillna(0), capsize=2, label=f"gold {g}")
        ax.set_title(f"{label}, {d['speedup'].iloc[0]:.2f}x (n={int(d['n'].max())})", fontsize=8)
        ax.set_xlabel("exit layer")
        ax.set_xticks(sorted(d["layer"].unique()))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("% of the label's dev samples")
    _legend(axes[0, 0])
    fig.suptitle(f"{task}: exit layers by gold label, {signal} exits at the threshold nearest {target:g}x", fontsize=10)
    fig.tight_layout()
    return [_save(fig, out / f"exit_distribution_{signal}.png"), _save_csv(df, out / f"exit_distribution_{signal}.csv")]


def _legend(ax) -> None:
    """A legend when something labelled was drawn (a task whose curves are all empty draws none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def exit_rates(groups: Sequence[Group], out: Path, signal: str = "energy", task: str = "") -> list[Path]:
    """Premature and delayed exiting rates against speed-up (lower is better for both)."""
    sel = [g for g in _with_signal(groups, signal) if _trains_exits(g[1])]
    if not sel:
        return []
    grid = speedup_grid(sel, signal)
    pre = curves_frame(sel, signal, lambda c, g: rate_curve(c, signal, "premature_rate", g), grid, "premature")
    dl = curves_frame(sel, signal, lambda c, g: rate_curve(c, signal, "delayed_rate", g), grid, "delayed")
    df = pre.merge(dl[["config", "speedup", "delayed_mean", "delayed_std"]], on=["config", "speedup"])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0), dpi=110)
    _draw_bands(axes[0], pre, "premature")
    _draw_bands(axes[1], dl, "delayed")
    for ax, what in zip(axes, ("premature", "delayed"), strict=True):
        ax.set_xlabel("speed-up (layers, Eq. 12)")
        ax.set_ylabel(f"{what} exiting rate (%)")
        ax.grid(alpha=0.3)
    _legend(axes[0])
    fig.suptitle(f"{task}: premature and delayed exits, {signal} (lower is better; bands: ± 1 std over seeds)",
                 fontsize=10)
    fig.tight_layout()
    return [_save(fig, out / f"exit_rates_{signal}.png"), _save_csv(df, out / f"exit_rates_{signal}.csv")]


def _signal_curves(cells: list[CellResult], metric: str):
    """Seed-averaged fronts of every swept signal on one common speed-up grid."""
    signals = sorted({s for c in cells for s in c.sweeps})
    grid = np.array([1.0])
    for s in signals:
        grid = np.union1d(grid, speedup_grid([("", cells)], s))
    curves = {}
    for s in signals:
        cs = [c for c in cells if s in c.sweeps]
        curves[s] = _stack_mean_std([front_staircase(c, s, metric, grid) for c in cs])
    return grid, curves


def _identical_fronts(cells: list[CellResult], metric: str) -> dict[str, str]:
    """Signals whose seed-averaged front equals an earlier signal's (name -> that signal)."""
    _, curves = _signal_curves(cells, metric)
    signals, same_as = list(curves), {}
    for i, s in enumerate(signals):
        for t in signals[:i]:
            if t not in same_as and np.array_equal(np.nan_to_num(curves[s][0], nan=-1),
                                                   np.nan_to_num(curves[t][0], nan=-1)):
                same_as[s] = t
                break
    return same_as


def signals_compared(groups: Sequence[Group], out: Path, task: str = "") -> list[Path]:
    """Every swept signal's front under each training configuration (one panel each).

    Curves that coincide (entropy and max softmax rank samples identically for two classes) are
    drawn with different line styles and markers and the legend says which is identical to which."""
    sel = [(label, cells) for label, cells in groups if _trains_exits(cells)]
    if not sel:
        return []
    frames = []
    fig, axes = _panels(len(sel), 4.4, 3.4)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "x"]
    for ax, (label, cells) in zip(axes.flat, sel, strict=False):
        metric = _metric(cells)
        grid, curves = _signal_curves(cells, metric)
        signals = list(curves)
        # fixed operating points (one point per model): the points themselves, drawn as markers
        fixed = {s: [(c.sweeps[s].points[0]["speedup"], c.sweeps[s].points[0][metric]) for c in cells if s in c.sweeps]
                 for s in signals if any(s in c.sweeps and is_fixed(c.sweeps[s]) for c in cells)}
        for s, (mean, std, n) in curves.items():
            if s in fixed:
                xs, ys = np.array(fixed[s]).T
                frames.append(pd.DataFrame({"config": label, "signal": s, "speedup": [xs.mean()], "metric_mean": [ys.mean()],
                                            "metric_std": [ys.std(ddof=1) if len(ys) > 1 else np.nan], "n": [len(ys)]}))
                continue
            frames.append(pd.DataFrame({"config": label, "signal": s, "speedup": grid, "metric_mean": mean,
                                        "metric_std": std, "n": n}))
        same_as = {k: v for k, v in _identical_fronts(cells, metric).items() if k not in fixed and v not in fixed}
        for i, (s, colour) in enumerate(zip(signals, _colours(len(signals)), strict=True)):
            if s in fixed:
                xs, ys = np.array(fixed[s]).T
                ax.plot(xs, 100 * ys, linestyle="none", marker="*", markersize=10, color=colour,
                        label=f"{s} (fixed operating point)")
                continue
            mean, std, n = curves[s]
            name = s + (f" (identical to {same_as[s]})" if s in same_as else "")
            ax.plot(grid, 100 * mean, linestyle=styles[i % 4], marker=markers[i % 4], markevery=max(len(grid) // 8, 1),
                    markersize=4, color=colour, linewidth=2.4 if s not in same_as else 1.2, drawstyle="steps-post",
                    label=name)
            if int(n.max()) > 1:
                ax.fill_between(grid, 100 * (mean - std), 100 * (mean + std), color=colour, alpha=0.12, step="post")
        ax.set_title(f"{label} (n={len(cells)})", fontsize=8)
        ax.set_xlabel("speed-up (layers, Eq. 12)")
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[0, 0].set_ylabel(f"dev {_metric(sel[0][1])} (x100)")
    fig.suptitle(f"{task}: exit signals compared under each training method", fontsize=10)
    fig.tight_layout()
    return [_save(fig, out / "signals_compared.png"), _save_csv(pd.concat(frames), out / "signals_compared.csv")]


# --------------------------------------------------------------------------- Table 2


def cross_task_table(groups_by_task: dict[str, Sequence[Group]], signal: str = "energy", speedup: float = 2.0,
                     operating_point: Callable[[CellResult, str, float], tuple[float, float]] | None = None
                     ) -> pd.DataFrame:
    """The paper's Table 2: rows = configurations, columns = tasks; each cell is the task metric
    (x100, mean ± std over seeds) at a matched speed-up, with the speed-up reached beside it.

    Reference rows come from ``final-only`` cells: the full model (1.00x) and budget exiting
    (``--num-layers K``, reported at its own speed-up). ``operating_point(cell, signal, target)``
    returns (metric, speed-up) of the chosen point; the default is the best swept point at or
    above the target (the oracle envelope)."""
    pick = operating_point or oracle_point
    data: dict[str, dict[str, str]] = {}
    order: list[str] = []
    for task, groups in groups_by_task.items():
        for label, cells in groups:
            ref = not _trains_exits(cells)
            # a method whose exit is a fixed operating point (a router) also gets a row with it
            own = sorted({k for c in cells for k, sw in c.sweeps.items() if is_fixed(sw) and k != signal}) if not ref else []
            for s in ([signal] if not ref else [next(iter(cells[0].sweeps), None)]) + own:
                cs = [c for c in cells if s is not None and s in c.sweeps]
                if not cs:
                    continue
                fixed = not ref and is_fixed(cs[0].sweeps[s])
                vals, sps = zip(*(pick(c, s, 0.0 if ref else speedup) for c in cs), strict=True)
                m, sd, n = _mean_std(vals)
                sp, _, _ = _mean_std(sps)
                row = label if ref else f"{label} / {s}"
                if row not in data:
                    data[row] = {}
                    order.append(row)
                reached = fixed_note(sp, speedup) if fixed else f"{sp:.2f}x"
                data[row][task] = ("n/a" if n == 0 else f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if n > 1 else "")
                                   + f" ({reached}, n={n})")
    df = pd.DataFrame.from_dict(data, orient="index").reindex(order)
    df = df[list(groups_by_task)] if not df.empty else df
    df.index.name = f"config \\ task (dev metric x100 at >= {speedup:g}x; reached speed-up, seeds)"
    return df.fillna("—")


def oracle_point(cell: CellResult, signal: str, target: float) -> tuple[float, float]:
    """The best swept point at or above ``target`` (metric, its speed-up); NaN if none reaches it.
    A fixed operating point (one point per model) returns that point whatever its speed-up: the
    tables print that speed-up beside it and mark it (``report.fixed_note``)."""
    metric = cell.config["main_metric"]
    sw = cell.sweeps[signal]
    if sw.summary.get("fixed_threshold") is not None and len(sw.points) == 1:
        return sw.points[0][metric], sw.points[0]["speedup"]  # a fixed operating point: its one point
    ok = [p for p in sw.points if p["speedup"] >= target - 1e-9]
    if not ok:
        return float("nan"), float("nan")
    best = max(ok, key=lambda p: (p[metric], p["speedup"]))
    return best[metric], best["speedup"]


def write_all(groups: Sequence[Group], out: Path, task: str, signals: Sequence[str] = ("energy",),
              target: float = 2.0, label_names=None) -> list[Path]:
    """Every per-task analysis figure + CSV into ``out``; returns the files written."""
    files: list[Path] = []
    files += training_curves(groups, out, task)
    files += signals_compared(groups, out, task)
    for s in signals:
        files += ablation_curves(groups, out, s, task)
        files += dis_heatmap(groups, out, s, task)
        files += exit_distribution(groups, out, s, target, task, label_names)
        files += exit_rates(groups, out, s, task)
    return files
