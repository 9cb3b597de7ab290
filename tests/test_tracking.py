"""MLflow run lifecycle (issue 16): a child run spans its cell, per-epoch metrics arrive while the
cell trains, failures end FAILED; readable sweep CSVs; the staircase and seed-mean fronts."""

import random
import time

import pytest

from eebench.cli import main
from tests.test_cli import _run_args


def _client(out):
    import mlflow

    return mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def test_child_run_is_open_while_its_cell_trains(tmp_path, tiny_backbone_dir, toy_task, monkeypatch):
    import eebench.runs.tracking as tracking

    out = tmp_path / "runs"
    seen = []
    real = tracking.Tracker.log_epoch

    def spy(self, run_id, epoch, entry):
        real(self, run_id, epoch, entry)
        # Read back from the store itself (a second client), as the UI would during training.
        c = _client(out)
        run = c.get_run(run_id)
        steps = [m.step for m in c.get_metric_history(run_id, "dev_layer1_accuracy")]
        seen.append((epoch, run.info.status, steps, time.time()))

    monkeypatch.setattr(tracking.Tracker, "log_epoch", spy)
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy",
                          "--epochs", "2")) == 0
    assert [(e, s, st) for e, s, st, _ in seen] == [(1, "RUNNING", [1]), (2, "RUNNING", [1, 2])]
    c = _client(out)
    exp = c.get_experiment_by_name("eebench-toy").experiment_id
    (child,) = [r for r in c.search_runs([exp]) if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED"
    hist = sorted(c.get_metric_history(child.info.run_id, "dev_layer1_accuracy"), key=lambda m: m.step)
    # each epoch stamped when it happened: inside the run, in order, and not after we read it back
    assert child.info.start_time <= hist[0].timestamp <= hist[1].timestamp <= child.info.end_time
    assert hist[0].timestamp <= seen[0][3] * 1000 + 1 and hist[1].timestamp <= seen[1][3] * 1000 + 1
    assert hist[0].timestamp < seen[1][3] * 1000 - 1  # epoch 1 was logged before epoch 2 ended


def test_failed_cell_ends_failed(tmp_path, tiny_backbone_dir, toy_task, monkeypatch):
    import eebench.runs.runner as runner

    out = tmp_path / "runs"

    def boom(*a, **k):
        raise RuntimeError("sweep exploded")

    monkeypatch.setattr(runner.Runner, "sweep_cell", boom)
    with pytest.raises(RuntimeError, match="sweep exploded"):
        main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy"))
    c = _client(out)
    runs = c.search_runs([c.get_experiment_by_name("eebench-toy").experiment_id])
    status = {("child" if "mlflow.parentRunId" in r.data.tags else "parent"): r.info.status for r in runs}
    assert status == {"child": "FAILED", "parent": "FAILED"}


def test_sweep_csv_is_readable():
    from eebench.reports.report import sweep_frame
    from eebench.runs.results import SignalSweep

    pts = [{"threshold": 0.123456789, "speedup": 1.23456789, "layer_speedup": 1.23456789, "exit_counts": [3, 1],
            "premature_rate": 0.1, "delayed_rate": 0.2, "pareto": True, "accuracy": 0.812345678, "f1": 0.7},
           {"threshold": 1.5e-7, "speedup": 2.0, "layer_speedup": 2.0, "exit_counts": [4, 0],
            "premature_rate": 0.0, "delayed_rate": 0.0, "pareto": False, "accuracy": 0.5, "f1": 0.4}]
    df = sweep_frame(SignalSweep(signal="energy", points=pts, summary={}))
    assert list(df.columns)[:4] == ["accuracy", "f1", "speedup", "threshold"]
    assert "layer_speedup" not in df.columns  # equal to speedup here: not repeated
    assert df["accuracy"].tolist() == [0.8123, 0.5] and df["threshold"].tolist() == [0.123457, 1.5e-7]
    assert df["exits_layer1"].tolist() == [3, 4]
    pts[0]["layer_speedup"] = 0.617  # budget exiting: the two differ, both stay
    assert "layer_speedup" in sweep_frame(SignalSweep(signal="energy", points=pts, summary={})).columns


def _best_at(xs, ys, x):  # the definition, written out: best score among points at least x fast
    ok = [y for s, y in zip(xs, ys, strict=True) if s >= x - 1e-9]
    return max(ok) if ok else float("nan")


def test_staircase_is_the_curve_the_summaries_read():
    from eebench.reports.report import staircase

    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 6)
        xs = sorted(rng.uniform(1, 6) for _ in range(n))
        ys = sorted((rng.random() for _ in range(n)), reverse=True)
        px, py = staircase(xs, ys)
        for _ in range(20):
            x = rng.uniform(1, xs[-1])
            # the path's value at x: the last segment start at or before x, taking the lower end of a drop
            i = max(j for j in range(len(px)) if px[j] <= x + 1e-12 and (j + 1 == len(px) or px[j + 1] >= x))
            if any(abs(x - s) < 1e-12 for s in xs):
                continue  # on a vertical drop
            assert py[i] == pytest.approx(_best_at(xs, ys, x))


def test_mean_front_averages_seed_staircases():
    from eebench.exits.rule import mean_front

    rng = random.Random(1)
    for _ in range(30):
        curves = []
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(1, 5)
            curves.append((sorted(rng.uniform(1, 5) for _ in range(n)), sorted((rng.random() for _ in range(n)),
                                                                              reverse=True)))
        xs, mean, lo, hi = mean_front(curves)
        reach = min(max(c[0]) for c in curves)
        assert xs and max(xs) == pytest.approx(reach)  # up to where every seed has a point
        for x, m, a, b in zip(xs, mean, lo, hi, strict=True):
            vals = [_best_at(s, v, x) for s, v in curves]
            assert m == pytest.approx(sum(vals) / len(vals)) and a == pytest.approx(min(vals))
            assert b == pytest.approx(max(vals))
