"""The paper's analyses (eebench.reports.analyses), recipes and COSEE's protocol warning.

Figures are checked through the CSV behind them, against values computed here by brute force."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from eebench.exits.metrics import difficulty_inversion_by_layer, exit_counts_by_label
from eebench.exits.rule import simulate_exits, sweep
from eebench.exits.signals import get_signal
from eebench.reports import analyses as A
from eebench.runs.results import CellResult, SignalSweep


def _cell(method: str, seed: int, points: list[dict], task: str = "t", history=None, dis=None, signal="energy",
          num_layers: int = 4, **config) -> CellResult:
    return CellResult(
        cell_id=f"{method}-{seed}", task=task, method=method, seed=seed,
        config={"main_metric": "accuracy", "model": "m", **config}, data={},
        model={"pooling": "mean", "num_layers": num_layers, "backbone_layers": num_layers},
        training={"history": history or []}, layers=[{"accuracy": 0.5}] * num_layers,
        sweeps={signal: SignalSweep(signal=signal, points=points, summary={}, dis=dis or [])},
    )


def _pts(pairs):
    return [{"threshold": i, "speedup": s, "accuracy": a, "exit_counts": [], "premature_rate": 0.1 * i,
             "delayed_rate": 0.5 - 0.05 * i, "pareto": True} for i, (s, a) in enumerate(pairs)]


def test_front_staircase_is_best_score_at_or_above_each_speedup():
    pairs = [(1.0, 0.90), (1.5, 0.88), (1.6, 0.80), (2.0, 0.85), (3.0, 0.70), (4.0, 0.50)]
    c = _cell("vanilla", 1, _pts(pairs))
    grid = np.array([1.0, 1.2, 1.5, 1.55, 2.0, 2.5, 3.0, 3.9, 4.0, 4.5])
    got = A.front_staircase(c, "energy", "accuracy", grid)
    for x, g in zip(grid, got, strict=True):
        ok = [a for s, a in pairs if s >= x - 1e-9]
        assert (math.isnan(g) and not ok) or g == max(ok)


def test_exit_counts_by_label_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    el = torch.randint(1, 5, (7, 50), generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    got = exit_counts_by_label(el, y, 4, 3)
    for t in range(7):
        for c in range(3):
            for m in range(1, 5):
                assert got[t, c, m - 1] == sum(1 for n in range(50) if el[t, n] == m and y[n] == c)


def test_dis_per_layer_counts_inverted_pairs():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(30, 3, generator=g)
    scores[:5, 0] = scores[5:10, 0]  # ties count half
    correct = torch.rand(30, 3, generator=g) > 0.4
    for higher_is_easier in (False, True):
        got = difficulty_inversion_by_layer(scores, correct, higher_is_easier)
        for m in range(3):
            right = [float(s) for s, c in zip(scores[:, m], correct[:, m], strict=True) if c]
            wrong = [float(s) for s, c in zip(scores[:, m], correct[:, m], strict=True) if not c]
            total = 0.0
            for r, w in itertools.product(right, wrong):
                harder_w = w < r if higher_is_easier else w > r  # the wrong one ranked harder
                total += 1.0 if harder_w else 0.5 if w == r else 0.0
            assert got[m] == pytest.approx(total / (len(right) * len(wrong)))


def test_sweep_records_exits_by_label_and_dis():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 4, 2, generator=g) * 3
    labels = torch.randint(0, 2, (40,), generator=g)
    sw = sweep(logits, labels, "entropy", num_thresholds=10)
    rec = sw.records()
    el = simulate_exits(logits, "entropy", sw.thresholds)
    for t, r in enumerate(rec):
        for c in range(2):
            assert r["exit_counts_by_label"][c] == [int(((el[t] == m) & (labels == c)).sum()) for m in range(1, 5)]
        assert [sum(x) for x in zip(*r["exit_counts_by_label"], strict=True)] == r["exit_counts"]
    assert len(sw.dis) == 4 and all(0 <= d <= 1 for d in sw.dis if not math.isnan(d))
    sig = get_signal("entropy")
    assert sw.dis == difficulty_inversion_by_layer(sig.score(logits), logits.argmax(-1) == labels[:, None], False)


def test_ablation_curves_average_seeds_with_bands(tmp_path):
    groups = [("cosee", [_cell("cosee", 1, _pts([(1.0, 0.9), (2.0, 0.8)])),
                         _cell("cosee", 2, _pts([(1.0, 0.7), (2.0, 0.6), (3.0, 0.5)]))]),
              ("vanilla", [_cell("vanilla", 1, _pts([(1.0, 0.9), (2.5, 0.4)]))]),
              ("weighted", [_cell("weighted", 1, _pts([(1.0, 0.9)]))])]  # not part of the ablation
    files = A.ablation_curves(groups, tmp_path, "energy", "t")
    assert [f.name for f in files] == ["ablation_energy.png", "ablation_energy.csv"]
    df = pd.read_csv(files[1])
    assert set(df["config"]) == {"cosee", "vanilla"}
    at2 = df[(df["config"] == "cosee") & (np.isclose(df["speedup"], 2.0))].iloc[0]
    assert at2["metric_mean"] == pytest.approx(0.7) and at2["metric_std"] == pytest.approx(np.std([0.8, 0.6], ddof=1), rel=1e-5)
    assert at2["n"] == 2
    at3 = df[(df["config"] == "cosee") & (np.isclose(df["speedup"], 3.0))].iloc[0]
    assert at3["metric_mean"] == pytest.approx(0.5) and at3["n"] == 1  # only seed 2 reaches 3x
    # one seed says nothing about the spread: its std is empty in the CSV, never a reassuring 0
    assert math.isnan(at3["metric_std"])
    assert df[df["config"] == "vanilla"]["metric_std"].isna().all()


def test_dis_heatmap_and_exit_distribution(tmp_path):
    p1 = _pts([(1.0, 0.9), (2.0, 0.8)])
    p1[1]["exit_counts_by_label"] = [[6, 0, 0, 4], [2, 2, 0, 6]]
    p2 = _pts([(1.0, 0.9), (1.9, 0.8)])
    p2[1]["exit_counts_by_label"] = [[4, 0, 0, 6], [2, 2, 0, 6]]
    groups = [("cosee", [_cell("cosee", 1, p1, dis=[0.9, 0.7, None, 0.6]), _cell("cosee", 2, p2, dis=[0.7, 0.7, 0.8, 0.5])]),
              ("final-only", [_cell("final-only", 1, _pts([(1.0, 0.9)]))])]
    f = A.dis_heatmap(groups, tmp_path, "energy", "t")
    df = pd.read_csv(f[1])
    assert list(df["layer"]) == [1, 2, 3]  # internal layers only; final-only has no exits
    assert df.loc[0, "dis_mean"] == pytest.approx(0.8) and df.loc[2, "n"] == 1
    f = A.exit_distribution(groups, tmp_path, "energy", 2.0, "t", label_names=["neg", "pos"])
    df = pd.read_csv(f[1])
    row = df[(df["gold_label"] == "neg") & (df["layer"] == 1)].iloc[0]
    assert row["share_mean"] == pytest.approx(0.5) and row["speedup"] == pytest.approx(1.95)
    assert df[(df["gold_label"] == "pos") & (df["layer"] == 4)].iloc[0]["share_mean"] == pytest.approx(0.6)


def test_training_curves_and_rates(tmp_path):
    hist = [{"phase": "joint", "epoch": e, "layers": [{"accuracy": 0.5 + 0.1 * e + 0.01 * m} for m in range(4)]}
            for e in (1, 2)]
    groups = [("vanilla", [_cell("vanilla", 1, _pts([(1.0, 0.9), (2.0, 0.8), (3.0, 0.6)]), history=hist)])]
    df = pd.read_csv(A.training_curves(groups, tmp_path, "t")[1])
    assert len(df) == 8 and df[(df["epoch"] == 2) & (df["layer"] == 3)].iloc[0]["accuracy_mean"] == pytest.approx(0.72)
    df = pd.read_csv(A.exit_rates(groups, tmp_path, "energy", "t")[1])
    mid = df[np.isclose(df["speedup"], 2.5)].iloc[0]  # halfway between the points at 2x and 3x
    assert mid["premature_mean"] == pytest.approx(0.15) and mid["delayed_mean"] == pytest.approx(0.425)


def test_identical_fronts_are_labelled(tmp_path):
    pts = _pts([(1.0, 0.9), (2.0, 0.8)])
    c = _cell("vanilla", 1, pts)
    c.sweeps["softmax"] = SignalSweep(signal="softmax", points=pts, summary={})
    c.sweeps["patience"] = SignalSweep(signal="patience", points=_pts([(1.0, 0.9), (1.5, 0.5)]), summary={})
    files = A.signals_compared([("vanilla", [c])], tmp_path, "t")
    assert files[0].stat().st_size > 0
    assert A._identical_fronts([c], "accuracy") == {"softmax": "energy"}
    df = pd.read_csv(files[1])
    assert set(df["signal"]) == {"energy", "softmax", "patience"}


def test_cross_task_table_reference_rows_and_matched_speedup():
    full = _cell("final-only", 1, _pts([(1.0, 0.91)]))
    budget = _cell("final-only", 1, _pts([(2.0, 0.86)]), num_layers=2)
    v1 = _cell("vanilla", 1, _pts([(1.0, 0.9), (1.8, 0.89), (2.1, 0.85), (3.0, 0.7)]))
    v2 = _cell("vanilla", 2, _pts([(1.0, 0.9), (2.4, 0.83)]))
    df = A.cross_task_table({"rte": [("final-only", [full]), ("final-only (2 of 4 layers)", [budget]),
                                     ("vanilla", [v1, v2])], "mrpc": [("vanilla", [v1])]}, "energy", 2.0)
    assert list(df.columns) == ["rte", "mrpc"]
    assert df.loc["final-only", "rte"] == "91.0 (1.00x, n=1)"
    assert df.loc["final-only (2 of 4 layers)", "rte"] == "86.0 (2.00x, n=1)"
    assert df.loc["vanilla / energy", "rte"] == f"84.0 ± {100 * np.std([0.85, 0.83], ddof=1):.1f} (2.25x, n=2)"
    assert df.loc["final-only", "mrpc"] == "—"


def test_recipes_are_listed_and_resolve(tmp_path, capsys):
    from eebench.cli import main
    from eebench.errors import EebenchError
    from eebench.runs.runner import list_recipes, run_config_from

    assert {"paper", "cpu"} <= set(list_recipes())
    assert main(["list"]) == 0
    assert "paper" in capsys.readouterr().out
    paper = run_config_from({"task": "rte"}, "paper", [])
    assert (paper.epochs, paper.batch_size, paper.lr, paper.max_seq_length, paper.group_by_length) == (10, 128, 2e-5,
                                                                                                       128, False)
    assert paper.method_params["cosee"] == {"alpha": 0.1, "beta0": 10.0, "margin": 0.3, "num_thresholds": 5}
    # explicit flags and overrides win over the recipe
    mine = run_config_from({"task": "rte", "epochs": 3}, "paper", ["batch_size=64", "cosee.alpha=0.01"])
    assert (mine.epochs, mine.batch_size, mine.method_params["cosee"]["alpha"]) == (3, 64, 0.01)
    # per-task values of the cpu recipe apply to their task only, below explicit flags
    cpu_sst2 = run_config_from({"task": "sst2"}, "cpu", [])
    assert cpu_sst2.train_samples == 20000 and cpu_sst2.epochs == 2
    assert run_config_from({"task": "rte"}, "cpu", []).train_samples is None
    assert run_config_from({"task": "sst2", "epochs": 1}, "cpu", []).epochs == 1
    with pytest.raises(EebenchError, match="neither a file nor a recipe; recipes: .*paper"):
        run_config_from({}, "no-such-recipe", [])
    assert main(["run", "--config", "no-such-recipe"]) == 2


def test_cosee_warns_when_trained_for_one_epoch():
    from eebench.strategy import build_strategy

    assert "one epoch" in build_strategy("cosee").protocol_warnings(1)[0]
    assert build_strategy("cosee").protocol_warnings(3) == []
    assert build_strategy("cosee-no-swm").protocol_warnings(1) == []  # no SWM: no threshold range to calibrate
    assert build_strategy("vanilla").protocol_warnings(1) == []
