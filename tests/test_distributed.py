"""Ray executor and Ray Tune search (issue 7), on a tiny random BERT and a toy CSV task.

Tests that need Ray skip cleanly without the ``eebench[ray]`` extra. One local Ray (2 CPUs,
bound to 127.0.0.1) serves the module; the head-node test runs first, alone, and stops its own
cluster.
"""

import os

# Before Ray is imported: a local Ray started here binds the loopback interface only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import json  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from eebench.cli import main  # noqa: E402
from eebench.errors import EebenchError  # noqa: E402

VOLATILE = {"created", "timings", "mlflow_run_id", "git_commit"}


def _run_args(task, model, out, *extra):
    return ["run", "--task", str(task), "--model", str(model), "--signals", "energy", "--epochs", "1", "--batch-size", "16",
            "--lr", "3e-3", "--pooling", "mean", "--output", str(out), *extra]


def _stable(result: dict) -> dict:
    """A result JSON without what legitimately differs between two runs (times, run ids)."""
    out = {k: v for k, v in result.items() if k not in VOLATILE}
    out["training"] = {k: v for k, v in out["training"].items() if k != "seconds"}
    return out


def _results(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))
            if (p.parent / "cell_config.json").exists()}


def _mlflow_runs(output: Path, experiment: str = "eebench-toy"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(output.resolve() / 'mlflow.db').as_posix()}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def _session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getsid(int(d)) == sid and Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(d))
            except OSError:
                pass
    return out


def _stop_session(proc: subprocess.Popen) -> list[int]:
    """Stop a process started with start_new_session and everything in its session; what is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.time() + wait
        while time.time() < deadline and _session_processes(proc.pid):
            time.sleep(0.2)
        if not _session_processes(proc.pid):
            break
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return _session_processes(proc.pid)


# ------------------------------------------------------------------------------ no Ray needed
def test_executor_ray_without_ray_exits_2(tiny_backbone_dir, toy_task, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "runs", "--methods", "vanilla", "--executor", "ray"))
    assert code == 2
    err = capsys.readouterr().err
    assert "pip install 'eebench[ray]'" in err and "Traceback" not in err
    code = main(["tune", "--task", str(toy_task), "--model", str(tiny_backbone_dir), "--method", "cosee",
                 "--grid", "alpha=0.01,0.1", "--output", str(tmp_path / "runs")])
    assert code == 2 and "pip install 'eebench[ray]'" in capsys.readouterr().err


def test_ray_flags_need_the_ray_executor(tiny_backbone_dir, toy_task, tmp_path, capsys):
    code = main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "runs", "--gpus-per-cell", "0.5"))
    assert code == 2 and "--gpus-per-cell only apply with --executor ray" in capsys.readouterr().err


def test_search_space_and_objective_parsing():
    from eebench.scale.tune import Objective, objective_from_points, parse_objective, parse_space

    space = parse_space(["lr=1e-5,2e-5", "cosee.alpha=0.01,0.1", "beta0=1,10", "batch=16"], {"alpha": 0.1, "beta0": 10.0},
                        "grid")
    assert space == {"lr": {"values": [1e-5, 2e-5]}, "alpha": {"values": [0.01, 0.1]}, "beta0": {"values": [1, 10]},
                     "batch_size": {"values": [16]}}
    assert parse_space(["lr=1e-5:1e-3"], {}, "random") == {"lr": {"range": (1e-5, 1e-3)}}
    for bad, search in (["gamma=1,2"], "grid"), (["lr=1e-5:1e-3"], "grid"), (["lr"], "grid"), ([], "grid"):
        with pytest.raises(EebenchError):
            parse_space(bad, {"alpha": 0.1}, search)
    assert parse_objective("metric@2x") == Objective("at", None, 2.0)
    assert parse_objective("f1@1.5x", ["accuracy", "f1"]) == Objective("at", "f1", 1.5)
    assert parse_objective("auc").label("accuracy") == "accuracy_auc"
    for bad in ("accuracy", "mcc@2x", "metric@0.5x"):
        with pytest.raises(EebenchError):
            parse_objective(bad, ["accuracy", "f1"])
    pts = [{"speedup": 1.0, "accuracy": 0.9}, {"speedup": 2.2, "accuracy": 0.8}, {"speedup": 3.5, "accuracy": 0.6}]
    assert objective_from_points(pts, Objective("at", None, 2.0), "accuracy", 4) == pytest.approx(0.8)
    assert objective_from_points(pts, Objective("at", None, 4.0), "accuracy", 4) is None
    # staircase: 0.8 on [1, 2.2], 0.6 on [2.2, 3.5], 0 beyond; divided by M - 1 = 3
    assert objective_from_points(pts, Objective("auc"), "accuracy", 4) == pytest.approx((1.2 * 0.8 + 1.3 * 0.6) / 3)


# ------------------------------------------------------------------------------- Ray fixtures
@pytest.fixture(scope="module")
def ray_mod():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(ray_mod):
    """A local Ray of 2 CPUs, started by eebench itself and kept for the module."""
    from eebench.scale.executor import init_ray

    if not ray_mod.is_initialized():
        init_ray(None, num_cpus=2)
    assert ray_mod.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    return ray_mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ a head node
def test_grid_on_a_head_node_started_with_ray_start(ray_mod, tiny_backbone_dir, toy_task, tmp_path):
    """`ray start --head` on 127.0.0.1, then the same `eebench run` with --ray-address, then stop it."""
    if ray_mod.is_initialized():  # one Ray cluster at a time on this machine
        ray_mod.shutdown()
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="eeray")  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp,
                             "--block"], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, head.stdout.read() if head.poll() else "timeout"
                time.sleep(0.5)
        out = tmp_path / "runs"
        # A fresh driver process, as a user would run it against the cluster.
        proc = subprocess.run([sys.executable, "-m", "eebench.cli", *_run_args(
            toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--seeds", "1,2", "--executor", "ray",
            "--ray-address", f"127.0.0.1:{port}")], env=env, capture_output=True, text=True, timeout=150)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "[ray] 2 cell(s) submitted" in proc.stdout
        results = _results(out)
        assert len(results) == 2 and all(r["mlflow_run_id"] for r in results.values())
        _, runs = _mlflow_runs(out)
        assert sum("mlflow.parentRunId" in r.data.tags for r in runs) == 2
    finally:
        # `ray stop` stops every Ray process of this user on the machine; stop just this head
        # (`ray start` ran in a session of its own: its raylet, GCS, workers and agents).
        left = _stop_session(head)
        shutil.rmtree(temp, ignore_errors=True)
    assert left == []


# ---------------------------------------------------------------------------- a local Ray
def test_ray_grid_matches_local_executor(local_ray, tiny_backbone_dir, toy_task, tmp_path):
    import torch

    args = ("--methods", "vanilla,cosee", "--seeds", "3")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU Ray cell: float reductions then round the same way, bit for bit
    try:
        assert main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "local", *args)) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "ray", *args, "--executor", "ray")) == 0
    local, ray_ = _results(tmp_path / "local"), _results(tmp_path / "ray")
    assert sorted(local) == sorted(ray_) and len(local) == 2  # same cells, same hashes
    for name in local:
        assert _stable(ray_[name]) == _stable(local[name]), name
        assert ray_[name]["mlflow_run_id"]
    client, runs = _mlflow_runs(tmp_path / "ray")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.info.run_id for r in children} == {r["mlflow_run_id"] for r in ray_.values()}
    assert all(r.data.metrics.get("energy_auc") is not None for r in children)
    # a second run finds every cell finished and changes nothing
    assert main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "ray", *args, "--executor", "ray")) == 0
    assert {k: _stable(v) for k, v in _results(tmp_path / "ray").items()} == {k: _stable(v) for k, v in ray_.items()}
    # ... but is one more `eebench run`: a new parent whose two children are the reused cells
    _, runs = _mlflow_runs(tmp_path / "ray")
    assert len(runs) == 6
    newest = max((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    reused = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == newest.info.run_id]
    assert len(reused) == 2 and all(r.data.tags["eebench_reused"] == "true" for r in reused)


def test_two_one_cpu_cells_run_concurrently(local_ray, tiny_backbone_dir, toy_task, tmp_path):
    from eebench.runs.runner import RunConfig
    from eebench.scale.executor import RayOptions, run_on_ray

    cfg = RunConfig(task=str(toy_task), model=str(tiny_backbone_dir), methods=["vanilla"], seeds=[1, 2], signals=["energy"],
                    epochs=3, batch_size=16, lr=3e-3, pooling="mean", output=str(tmp_path / "runs"), no_mlflow=True,
                    progress=False)
    a, b = run_on_ray(cfg, RayOptions(cpus_per_cell=1))
    assert a.result is not None and b.result is not None and a.pid != b.pid
    assert a.start < b.end and b.start < a.end, (a.start, a.end, b.start, b.end)


def test_lost_worker_is_retried_from_the_cell_checkpoint(local_ray, tiny_backbone_dir, toy_task, tmp_path, monkeypatch):
    from eebench.runs.runner import RunConfig
    from eebench.scale.executor import RayOptions, run_on_ray

    marker = tmp_path / "killed"
    monkeypatch.setenv("EEBENCH_TEST_KILL_AFTER_EPOCH", str(marker))  # the worker dies once, at an epoch end
    cfg = RunConfig(task=str(toy_task), model=str(tiny_backbone_dir), methods=["vanilla"], seeds=[5], signals=["energy"],
                    epochs=2, batch_size=16, lr=3e-3, pooling="mean", output=str(tmp_path / "runs"), no_mlflow=True,
                    checkpoint_every=2, progress=False)
    (out,) = run_on_ray(cfg, RayOptions(cpus_per_cell=1, max_retries=1))
    assert marker.exists() and out.error is None
    assert out.pid != int(marker.read_text())  # a new worker finished it ...
    assert out.result.training["resumed_from_step"] > 0  # ... from the checkpoint the lost one wrote
    t = out.result.training  # its training seconds count the lost worker's, up to that checkpoint
    assert 0 < t["seconds_before_resume"] < t["seconds"]
    assert len(out.result.training["history"]) == 2


def test_a_raising_cell_exits_2_naming_it(local_ray, tiny_backbone_dir, toy_task, tmp_path, capsys):
    # batch 16 with micro-batches of 6 is refused when training starts, in the worker
    code = main(_run_args(toy_task, tiny_backbone_dir, tmp_path / "runs", "--methods", "vanilla", "--executor", "ray",
                          "--micro-batch-size", "6"))
    err = capsys.readouterr().err
    assert code == 2 and "1 of 1 cell(s) failed on Ray: [vanilla seed 42]" in err
    assert "not a multiple of micro-batch size 6" in err and "Traceback" not in err


def test_tune_grid_2x2_logs_four_child_runs_and_names_the_best(local_ray, tiny_backbone_dir, toy_task, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["tune", "--task", str(toy_task), "--model", str(tiny_backbone_dir), "--method", "cosee",
            "--grid", "lr=3e-3,1e-2", "alpha=0.01,0.1", "--epochs", "1", "--batch-size", "16", "--pooling", "mean",
            "--objective", "metric@1.5x", "--output", str(out), "--name", "grid"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[tune] best: lr=" in text and "accuracy@1.5x" in text
    exp = out / "tune" / "grid"
    import pandas as pd

    table = pd.read_csv(exp / "trials.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok"}
    assert sorted(zip(table["lr"], table["alpha"], strict=True)) == [(3e-3, 0.01), (3e-3, 0.1), (1e-2, 0.01), (1e-2, 0.1)]
    best = json.loads((exp / "best.json").read_text())
    assert best["objective"] == pytest.approx(table["accuracy@1.5x"].max())
    assert set(best["config"]) == {"lr", "alpha"} and "cosee.alpha=" in " ".join(best["run_overrides"])
    client, runs = _mlflow_runs(out)
    parent = [r for r in runs if r.data.tags.get("eebench_kind") == "tune"]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert all("tune_objective" in r.data.metrics for r in children)
    assert parent[0].data.tags["best_trial"] == best["trial_id"]
    # the same command again restores the finished experiment: nothing retrained, nothing logged twice
    assert main(argv) == 0
    assert "resuming" in capsys.readouterr().out
    assert len(_mlflow_runs(out)[1]) == 5


def test_tune_trial_that_raises_is_reported_and_the_others_finish(local_ray, tiny_backbone_dir, toy_task, tmp_path,
                                                                 capsys):
    out = tmp_path / "runs"
    # micro-batches of 8: batch 16 trains, batch 12 raises in its worker when training starts
    assert main(["tune", "--task", str(toy_task), "--model", str(tiny_backbone_dir), "--method", "vanilla",
                 "--grid", "batch_size=16,12", "--micro-batch-size", "8", "--epochs", "1", "--lr", "3e-3",
                 "--pooling", "mean", "--output", str(out), "--name", "fails"]) == 0
    captured = capsys.readouterr()
    assert "1 trial(s) failed" in captured.err and "not a multiple of micro-batch size 8" in captured.err
    import pandas as pd

    table = pd.read_csv(out / "tune" / "fails" / "trials.csv").set_index("batch_size")
    assert table.loc[16, "status"] == "ok" and table.loc[12, "status"] == "failed"
    assert "not a multiple" in table.loc[12, "error"]
    _, runs = _mlflow_runs(out)
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and "not a multiple" in failed[0].data.tags["error"]
    assert json.loads((out / "tune" / "fails" / "best.json").read_text())["config"] == {"batch_size": 16}


def test_tune_trial_whose_worker_dies_is_retried_from_the_cell_checkpoint(local_ray, tiny_backbone_dir, toy_task,
                                                                         tmp_path, monkeypatch):
    from eebench.runs.runner import RunConfig
    from eebench.scale.executor import RayOptions
    from eebench.scale.tune import tune

    marker = tmp_path / "killed"
    monkeypatch.setenv("EEBENCH_TEST_KILL_AFTER_EPOCH", str(marker))  # the trial's worker dies once
    out = tmp_path / "runs"
    cfg = RunConfig(task=str(toy_task), model=str(tiny_backbone_dir), epochs=2, batch_size=16, pooling="mean",
                    output=str(out), checkpoint_every=2, progress=False)
    summary = tune(cfg, "vanilla", ["lr=3e-3"], opts=RayOptions(max_retries=1), name="lost", verbose=0)
    assert marker.exists()
    (row,) = summary.table.to_dict("records")
    assert row["status"] == "ok" and row["epochs"] == 2
    result = json.loads((Path(summary.best["cell_dir"]) / "result.json").read_text())
    assert result["training"]["resumed_from_step"] > 0  # Tune restarted the trial; its cell resumed
    _, runs = _mlflow_runs(out)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # the tune run and its one trial
