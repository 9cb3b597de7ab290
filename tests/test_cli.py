"""End-to-end CLI: eebench run / sweep / report / list on a tiny model and a tiny CSV task."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from eebench.cli import main
from eebench.runs.results import find_results


def _run_args(task, model, out, *extra):
    return ["run", "--task", str(task), "--model", str(model), "--epochs", "1", "--batch-size", "16", "--lr", "3e-3",
            "--pooling", "mean", "--num-thresholds", "20", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_backbone_dir):
    from tests.conftest import write_toy_task

    toy_task = write_toy_task(tmp_path_factory.mktemp("toy"))
    out = tmp_path_factory.mktemp("finished") / "runs"
    rc = main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla,cosee", "--signals", "energy,entropy",
                        "--seeds", "1,2"))
    assert rc == 0
    return out, toy_task


def test_run_writes_results_mlflow_and_report(finished_run, tmp_path, capsys):
    import mlflow

    finished_run, _ = finished_run
    results = find_results(finished_run)
    assert sorted((r.method, r.seed) for r in results) == [("cosee", 1), ("cosee", 2), ("vanilla", 1), ("vanilla", 2)]
    r = results[0]
    assert r.schema_version == 1 and r.eebench_version and r.data["train_fingerprint"]
    assert set(r.sweeps) == {"energy", "entropy"}
    sw = r.sweeps["energy"]
    assert len(sw.points) >= 10 and {"threshold", "speedup", "exit_counts", "accuracy", "f1", "pareto"} <= set(sw.points[0])
    assert {"accuracy_at_1.5x", "accuracy_at_2x", "accuracy_at_3x", "accuracy_at_4x", "auc"} <= set(sw.summary)
    assert {"heldout_accuracy_at_2x", "heldout_accuracy_at_2x_std", "heldout_speedup_at_2x"} <= set(sw.summary)
    assert sw.heldout["split"] == {"cal_fraction": 0.5, "folds": None, "repeats": 20, "seed": 0}
    assert sw.confirm and all(c["exit_mismatches"] == 0 and c["prediction_mismatches"] == 0 for c in sw.confirm)
    assert r.model["pooling"] == "mean" and r.model["head_lr"] == 3e-3
    assert len(r.layers) == 4 and len(r.training["history"]) == 1

    # MLflow: one experiment per task, a parent run, one child per cell with params/metrics/artefacts.
    uri = f"sqlite:///{finished_run / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["eebench-toy"], output_format="pandas")
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(children) == 4 and len(parents) == 1
    assert set(children["params.method"]) == {"vanilla", "cosee"}
    assert "params.method_params.alpha" in children.columns
    # one name per meaning: `pooling` / `head_lr` are what was used, no *_used duplicates or tags
    assert children["params.pooling"].eq("mean").all() and children["params.head_lr"].eq("0.003").all()
    assert "params.pooling_used" not in children.columns and "tags.pooling" not in children.columns
    for k in ("eval_samples", "num_thresholds", "micro_batch_size", "group_by_length", "train_rows", "dev_rows",
              "train_fingerprint", "dev_fingerprint"):
        assert f"params.{k}" in children.columns, k
    assert children["params.num_thresholds"].eq("20").all() and children["params.dev_rows"].eq("48").all()
    assert children["tags.mlflow.source.name"].str.startswith("eebench ").all()
    assert sorted(children["tags.mlflow.runName"]) == ["cosee-s1 lr=0.003 batch_size=16 pooling=mean",
                                                       "cosee-s2 lr=0.003 batch_size=16 pooling=mean",
                                                       "vanilla-s1 lr=0.003 batch_size=16 pooling=mean",
                                                       "vanilla-s2 lr=0.003 batch_size=16 pooling=mean"]
    assert parents["tags.mlflow.runName"].iloc[0].startswith("toy vanilla+cosee 20")
    assert children["metrics.energy_oracle_accuracy_at_1.5x"].notna().all()
    assert "metrics.energy_heldout_accuracy_at_1.5x" in children.columns
    assert "metrics.energy_accuracy_at_1.5x" not in children.columns  # the oracle is always labelled
    assert children["metrics.dev_layer1_accuracy"].notna().all()
    client = mlflow.tracking.MlflowClient(uri)
    cid = children["run_id"].iloc[0]
    arts = {a.path for a in client.list_artifacts(cid)} | {a.path for a in client.list_artifacts(cid, "sweeps")}
    assert {"result.json", "sweeps/sweep_energy.csv", "pareto_energy.png"} <= arts  # plots at the top: Compare shows them
    hist = client.get_metric_history(cid, "dev_layer4_accuracy")
    assert [m.step for m in hist] == [1]

    # The parent: per signal, the seed-aggregated Pareto plot and summary table, and the means as metrics.
    pid = parents["run_id"].iloc[0]
    assert {"pareto_energy.png", "pareto_entropy.png", "summary_energy.csv", "summary_entropy.csv"} <= {
        a.path for a in client.list_artifacts(pid)}
    import pandas as pd

    summary = pd.read_csv(client.download_artifacts(pid, "summary_energy.csv", str(tmp_path)))
    pmetrics = client.get_run(pid).data.metrics
    for method in ("vanilla", "cosee"):
        aucs = [x.sweeps["energy"].summary["auc"] for x in results if x.method == method]
        expected = sum(aucs) / len(aucs)  # the oracle: the mean over seeds of each cell's JSON
        assert pmetrics[f"{method}/energy_auc"] == pytest.approx(expected, abs=1e-9)
        row = summary[summary["method"] == method].iloc[0]
        assert row["seeds"] == 2 and row["auc_mean"] == pytest.approx(expected, abs=1e-4)

    # Report from local results and from MLflow.
    rep = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", "--results", str(finished_run), "--out", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy: best calibration point at >= 2x" in text and "±" in text and "exit pooling mean" in text
    assert "oracle" not in text.split("Pareto plot")[0]  # held-out by default
    assert (rep / "toy" / "pareto.png").stat().st_size > 1000
    assert {"main_2x.md", "layers.md", "ablation_energy.md"} <= {p.name for p in (rep / "toy").iterdir()}
    assert main(["report", "--results", str(finished_run), "--operating", "both"]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and "oracle accuracy at >= 2x speed-up" in text
    # From MLflow there are no cached logits: the held-out summaries stored by the run are used.
    assert main(["report", "--tracking-uri", uri, "--format", "latex"]) == 0
    out = capsys.readouterr().out
    assert "\\toprule" in out and "held-out" in out
    assert main(["report", "--tracking-uri", uri, "--format", "csv"]) == 0
    from_mlflow = capsys.readouterr().out
    assert main(["report", "--results", str(finished_run), "--format", "csv"]) == 0
    assert capsys.readouterr().out.split("Pareto")[0] == from_mlflow.split("Pareto")[0]
    # in the folder's order (MLflow's own is newest first), so that sums over cells add up alike:
    # a std of three equal rates printed 8.8e-17 from one source and 9.6e-17 from the other
    from eebench.reports.report import results_from_mlflow

    assert [r.cell_id for r in results_from_mlflow(uri)] == [r.cell_id for r in find_results(finished_run)]
    assert main(["report", "--results", str(finished_run), "--format", "csv"]) == 0

    # A cell still training (its child run open, no result.json yet), here a newer run of a cell
    # that has a finished one: left out with a note, the tables are the same (on a copy of the store).
    import shutil

    shutil.copy(finished_run / "mlflow.db", tmp_path / "copy.db")
    copy_uri = f"sqlite:///{tmp_path / 'copy.db'}"
    copy = mlflow.tracking.MlflowClient(copy_uri)
    exp = copy.get_experiment_by_name("eebench-toy").experiment_id
    busy = copy.create_run(exp, tags={"eebench_cell_id": results[0].cell_id}, run_name="vanilla-s9 in training")
    capsys.readouterr()
    assert main(["report", "--tracking-uri", copy_uri, "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.split("Pareto")[0] == from_mlflow.split("Pareto")[0]
    assert "left out 1 MLflow run(s) that have not finished: vanilla-s9 in training (running)" in err
    assert copy.get_run(busy.info.run_id).info.status == "RUNNING"


def test_second_identical_run_trains_nothing(finished_run, tiny_backbone_dir, capsys, monkeypatch):
    import eebench.training.trainer as tr

    finished_run, toy_task = finished_run
    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(tr.Trainer, "train", boom)
    cells = [p for p in finished_run.rglob("result.json") if (p.parent / "cell_config.json").exists()]
    before = {p: p.stat().st_mtime_ns for p in cells}
    assert main(_run_args(toy_task, tiny_backbone_dir, finished_run, "--methods", "vanilla,cosee",
                          "--signals", "energy,entropy", "--seeds", "1,2")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in cells}
    # a new signal is swept from the cached logits, still without training
    assert main(_run_args(toy_task, tiny_backbone_dir, finished_run, "--methods", "vanilla", "--signals",
                          "energy,entropy,patience", "--seeds", "1")) == 0
    r = [r for r in find_results(finished_run) if r.method == "vanilla" and r.seed == 1][0]
    assert set(r.sweeps) == {"energy", "entropy", "patience"}

    # One `eebench run` = one parent whose children are the cells it covered, new or reused; the
    # newest parent (the signal-adding run) has the one reused cell, with its new sweep.
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{finished_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eebench-toy").experiment_id
    runs = client.search_runs([exp], order_by=["attributes.start_time DESC"])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    kids = {p.info.run_id: [x for x in runs if x.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents}
    assert all(kids[p.info.run_id] for p in parents)  # no empty parent
    (newest,) = kids[parents[0].info.run_id]
    assert newest.data.tags["eebench_cell_id"] == r.cell_id and newest.data.tags["eebench_reused"] == "true"
    assert "patience_auc" in newest.data.metrics and newest.info.status == "FINISHED"
    assert len(kids[parents[1].info.run_id]) == 4  # the identical re-run covered all four cells
    # reports from MLflow count each cell once, with its newest sweeps
    from eebench.reports.report import load_results

    cells = load_results(None, f"sqlite:///{finished_run / 'mlflow.db'}", "toy")
    assert sorted((x.method, x.seed) for x in cells) == [("cosee", 1), ("cosee", 2), ("vanilla", 1), ("vanilla", 2)]
    assert "patience" in [x for x in cells if x.method == "vanilla" and x.seed == 1][0].sweeps


def test_sweep_command_adds_signals(finished_run):
    finished_run, _ = finished_run
    cell = next(p.parent for p in finished_run.rglob("result.json") if "cosee-s1" in str(p))
    assert main(["sweep", str(cell), "--signals", "softmax", "--no-mlflow"]) == 0
    assert "softmax" in json.loads((cell / "result.json").read_text())["sweeps"]


def test_interrupted_cell_resumes_without_corrupt_files(tmp_path, tiny_backbone_dir, toy_task, monkeypatch):
    import eebench.runs.runner as runner

    out = tmp_path / "runs"
    real = runner.Runner.sweep_cell

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "sweep_cell", die)
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy")) == 130
    assert not list(out.rglob("result.json")) and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(runner.Runner, "sweep_cell", real)
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy")) == 0
    assert len(find_results(out)) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "nope"], "unknown method 'nope'; known: "),
        (["--signals", "confidence"], "unknown exit policy 'confidence'; known: energy, entropy, lte, patience, pi-exit, q-exit, raw-entropy, softmax"),
        (["--seeds", ""], "--seeds is empty"),
        (["epochs"], "override 'epochs' is not key=value"),
        (["cosee.gamma=1"], "method 'cosee' has no hyper-parameter 'gamma'"),
        (["cosee.alpha=abc"], "cosee.alpha='abc' is not a number"),
        (["cosee.swm=maybe"], "cosee.swm='maybe' is not true or false"),
        (["colour=red"], "known keys"),
        (["--precision", "fp16", "--device", "cpu"], "precision fp16 needs a CUDA device"),
        (["attn_implementation=flash"], "unknown attention implementation 'flash'; known: auto, eager, sdpa"),
    ],
)
def test_bad_input_exits_2(tmp_path, tiny_backbone_dir, toy_task, capsys, args, message):
    rc = main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "runs", "--methods", "vanilla", "--signals", "energy")
              + args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_task_model_and_output(tmp_path, tiny_backbone_dir, toy_task, capsys):
    assert main(["run", "--task", "sst3", "--output", str(tmp_path / "r")]) == 2
    assert "unknown task 'sst3'" in capsys.readouterr().err
    assert main(_run_args(toy_task, tmp_path / "no-such-model", tmp_path / "r", "--methods", "vanilla")) == 2
    assert "cannot load" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a file as the folder instead
            ro = tmp_path / "file"
            ro.write_text("")
        assert main(_run_args(toy_task, tiny_backbone_dir, ro / "out", "--methods", "vanilla")) == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert main(["run", "--task", "stsb", "--signals", "energy", "--output", str(tmp_path / "r")]) == 2
    assert "regression" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path, tiny_backbone_dir, toy_task):
    from eebench.runs.runner import run_config_from

    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text(f"task: {toy_task}\nmodel: {tiny_backbone_dir}\nmethods: [cosee]\nepochs: 3\n")
    cfg = run_config_from({"epochs": None, "lr": 1e-3}, str(cfg_file), ["epochs=2", "cosee.alpha=0.01", "seeds=[1,2]"])
    assert cfg.epochs == 2 and cfg.lr == 1e-3 and cfg.methods == ["cosee"] and cfg.seeds == [1, 2]
    assert cfg.method_params == {"cosee": {"alpha": 0.01}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    from eebench.errors import EebenchError

    with pytest.raises(EebenchError, match="not valid YAML"):
        run_config_from({}, str(bad), [])


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("cosee-no-swm", "two-stage", "final-only", "patience", "sst2", "minilm-l6"):
        assert word in out


def test_unreachable_tracking_server_still_finishes(tmp_path, tiny_backbone_dir, toy_task, capsys):
    port = _free_port()
    rc = main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "runs", "--methods", "vanilla", "--signals", "energy",
                        "--tracking-uri", f"http://127.0.0.1:{port}"))
    out = capsys.readouterr().out
    assert rc == 0 and out.count("is unreachable") == 1 and "nothing is lost" in out
    assert f"eebench log {tmp_path / 'runs'} --tracking-uri http://127.0.0.1:{port}" in out
    assert len(find_results(tmp_path / "runs")) == 1
    # ... and that command logs them later: a fresh store gets a parent with the cell as its child.
    store = f"sqlite:///{tmp_path / 'later.db'}"
    assert main(["log", str(tmp_path / "runs"), "--tracking-uri", store]) == 0
    import mlflow

    client = mlflow.tracking.MlflowClient(store)
    exp = client.get_experiment_by_name("eebench-toy")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    (child,) = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert child.data.params["method"] == "vanilla" and "energy_auc" in child.data.metrics
    assert "summary_energy.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert main(["log", str(tmp_path / "nothing-here"), "--tracking-uri", store]) == 2


def test_custom_csv_task_trains_and_evaluates(tmp_path, tiny_backbone_dir, toy_task):
    out = tmp_path / "runs"
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "weighted", "--signals", "softmax",
                          "--no-mlflow")) == 0
    (r,) = find_results(out)
    assert r.task == "toy" and r.data["train_rows"] == 96 and r.data["dev_rows"] == 48
    assert 0.0 <= r.layers[-1]["accuracy"] <= 1.0 and "f1" in r.layers[-1]
    assert not (out / "mlflow.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_mlflow_server(tmp_path, tiny_backbone_dir, toy_task, capsys):
    """A real `mlflow server` on 127.0.0.1: the run logs to it and search_runs finds the cells."""
    import mlflow

    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'db.sqlite'}", "--artifacts-destination", str(store / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        for _ in range(120):
            try:
                with urllib.request.urlopen(uri + "/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        capsys.readouterr()
        assert main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "runs", "--methods", "vanilla,cosee",
                              "--signals", "energy", "--tracking-uri", uri)) == 0
        captured = capsys.readouterr()
        # eebench's output only: MLflow's own "View run" lines are off; eebench prints its links once.
        assert "View run" not in captured.out + captured.err
        assert captured.out.count(f"MLflow parent run:  {uri}/#/experiments/") == 1
        assert f"{uri}/#/experiments/" in captured.out and "runs?workflowType=machine_learning" in captured.out
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=["eebench-toy"])
        children = runs[runs["tags.mlflow.parentRunId"].notna()]
        assert len(children) == 2 and children["metrics.energy_auc"].notna().all()
        client = mlflow.tracking.MlflowClient(uri)
        assert "result.json" in {a.path for a in client.list_artifacts(children["run_id"].iloc[0])}
        assert main(["report", "--tracking-uri", uri, "--task", "toy"]) == 0
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_bench_command_records_wall_clock(finished_run, capsys):
    finished_run, _ = finished_run
    cell = next(p.parent for p in finished_run.rglob("result.json") if "vanilla-s1" in str(p))
    assert main(["bench", str(cell), "--signal", "entropy", "--target-speedup", "1.5", "--repeats", "1",
                 "--samples", "16", "--batch-size", "4", "--threads", "1"]) == 0
    assert "wall speed-up" in capsys.readouterr().out
    (b,) = json.loads((cell / "result.json").read_text())["bench"]
    assert b["signal"] == "entropy" and b["num_inputs"] == 16
    # held out by default: chosen on 24 calibration inputs, benched on (16 of) the other 24
    op = b["operating_point"]
    assert op["calibration_rows"] == op["evaluation_rows"] == 24 and op["threshold"] == b["runs"][0]["threshold"]
    assert all(v["exit_layers"] == 1.0 and v["predictions"] == 1.0 for v in b["runs"][0]["matches_simulation"].values())
    assert b["split_gain"] == 0.05  # streaming's default padding-aware split, recorded
    assert main(["bench", str(finished_run), "--no-mlflow"]) == 2
    assert "is not a finished eebench cell" in capsys.readouterr().err
    assert main(["bench", str(cell), "--split-gain", "1.5", "--no-mlflow"]) == 2
    assert capsys.readouterr().err.strip().endswith("give a share in [0, 1) (0: never split)")


def test_reference_points_final_only_and_budget_exiting(tmp_path, tiny_backbone_dir, toy_task):
    """final-only is the 1.00x row; with --num-layers K it is the budget row at M / K."""
    out = tmp_path / "runs"
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "final-only", "--signals", "entropy",
                          "--no-mlflow")) == 0
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "final-only", "--signals", "entropy",
                          "--num-layers", "2", "--no-mlflow")) == 0
    by_layers = {r.model["num_layers"]: r for r in find_results(out)}
    for k, speedup in ((4, 1.0), (2, 2.0)):
        (point,) = by_layers[k].sweeps["entropy"].points
        assert point["speedup"] == pytest.approx(speedup)
        assert point["exit_counts"][-1] == 48  # every input leaves at the last kept layer
        assert point["accuracy"] == pytest.approx(by_layers[k].layers[-1]["accuracy"])
    # The report keeps the two reference points apart: two rows, each its own number.
    from eebench.reports.report import main_table

    df = main_table(find_results(out), 2.0)
    assert list(df.index) == ["final-only", "final-only (2 of 4 layers)"]
    for label, k in (("final-only", 4), ("final-only (2 of 4 layers)", 2)):
        assert df.loc[label, "entropy"] == f"{100 * by_layers[k].layers[-1]['accuracy']:.1f} (n=1)"
    assert main(["report", "--results", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "final-only (2 of 4 layers)" in (tmp_path / "rep" / "toy" / "main_2x.md").read_text()
    # ... and both log to MLflow afterwards (their one point has no threshold; this used to fail)
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    assert main(["log", str(out), "--tracking-uri", uri]) == 0
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("eebench-toy").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}


def test_report_writes_the_papers_analyses_and_logs_them(finished_run, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    finished_run, _ = finished_run
    cosee = [r for r in find_results(finished_run) if r.method == "cosee"]
    assert all(any("trained for one epoch" in w for w in r.warnings) for r in cosee)
    assert not any("one epoch" in w for r in find_results(finished_run) if r.method == "vanilla" for w in r.warnings)
    rep, uri = tmp_path / "rep", f"sqlite:///{tmp_path / 'reports.db'}"
    assert main(["report", "--results", str(finished_run), "--out", str(rep), "--log-mlflow", uri]) == 0
    text = capsys.readouterr().out
    assert "Table 2 layout" in text and "logged" in text
    an = rep / "toy" / "analyses"
    for stem in ("training_curves", "signals_compared", "ablation_energy", "dis_energy", "exit_distribution_energy",
                 "exit_rates_energy"):
        assert (an / f"{stem}.png").stat().st_size > 1000 and (an / f"{stem}.csv").stat().st_size > 0, stem
    assert {"table2_energy_2x.md", "table2_energy_2x.tex", "table2_energy_2x.csv"} <= {p.name for p in rep.iterdir()}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("eebench-toy")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.eebench_report = '1'")
    assert len(runs) == 1
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "analyses")}
    assert "analyses/dis_energy.png" in logged and "analyses/training_curves.csv" in logged
    assert main(["report", "--results", str(finished_run), "--log-mlflow", uri]) == 2
    assert "--log-mlflow needs --out" in capsys.readouterr().err


def test_attention_and_precision_are_recorded_and_in_the_cell_identity(finished_run, tiny_backbone_dir):
    from eebench.runs.runner import RunConfig, Runner

    out, toy_task = finished_run
    (r, *_) = [x for x in find_results(out) if x.method == "vanilla" and x.seed == 1]
    assert r.config["attn_implementation"] == "eager" and r.config["precision"] == "fp32"  # auto on the CPU
    assert r.model["attn_implementation"] == "eager" and r.model["precision"] == "fp32"
    assert {"cpu_model", "cpu_flags", "native_bf16"} <= set(r.model["machine"])
    base = dict(task=str(toy_task), model=str(tiny_backbone_dir), methods=["vanilla"], seeds=[1], epochs=1,
                batch_size=16, lr=3e-3, pooling="mean", output=str(out), no_mlflow=True)
    same = Runner(RunConfig(**base, attn_implementation="eager")).cells()[0][3]
    assert same == r.cell_id  # auto resolved to eager: the same cell
    assert Runner(RunConfig(**base, attn_implementation="sdpa")).cells()[0][3] != r.cell_id
