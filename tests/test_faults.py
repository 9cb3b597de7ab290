"""Faults and bad input (issue 13): kill -9 during a checkpoint write, corrupt or missing outputs,
validation before any side effect, impossible values, two runs on one folder, a dead tracking
server. Each test reproduces a fault observed on the earlier code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from eebench.cli import main
from eebench.runs.results import find_results
from tests.conftest import interrupted_at_step
from tests.test_cli import _free_port, _run_args

REPO = Path(__file__).resolve().parent.parent


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------- checkpoints

_TRAIN_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from transformers import AutoTokenizer
from eebench.data import get_task, load_task, tokenize
from eebench.model.backbone import MultiExitConfig, MultiExitModel
from eebench.strategy import build_strategy
from eebench.training.trainer import TrainConfig, Trainer, seed_everything
import safetensors.torch as st

real = st.save_file
calls = {{"n": 0}}

def save_file(tensors, path, *a, **k):
    # kill -9 in the middle of writing the optimiser file of the {kill_at}th checkpoint:
    # half the bytes on disk, no Python clean-up (os._exit runs no finally blocks).
    if "optimizer" in os.path.basename(str(path)):
        calls["n"] += 1
        if calls["n"] == {kill_at}:
            real(tensors, path, *a, **k)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            os._exit(9)
    return real(tensors, path, *a, **k)

st.save_file = save_file
tok = AutoTokenizer.from_pretrained({backbone!r})
spec = get_task({task!r})
train = tokenize(load_task({task!r}, "train"), tok, spec, 32)
dev = tokenize(load_task({task!r}, "dev"), tok, spec, 32)
seed_everything(7)
model = MultiExitModel.from_config(MultiExitConfig(model={backbone!r}, num_labels=2, pooling="mean"))
cfg = TrainConfig(lr=3e-3, epochs=2, batch_size=16, seed=7, progress=False, device="cpu", checkpoint_every=2)
Trainer(model, build_strategy("cosee"), cfg, tok, spec, out_dir={out!r}).train(train, dev)
"""


@pytest.fixture
def toy(tiny_backbone_dir, toy_task):
    from transformers import AutoTokenizer

    from eebench.data import get_task, load_task, tokenize

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    spec = get_task(str(toy_task))
    train = tokenize(load_task(str(toy_task), "train"), tok, spec, 32)
    dev = tokenize(load_task(str(toy_task), "dev"), tok, spec, 32)
    return tiny_backbone_dir, tok, spec, train, dev


def _train(toy, **kw):
    from tests.test_training import _train as train

    return train(toy, "cosee", epochs=2, checkpoint_every=2, **kw)


def test_kill_9_during_checkpoint_write_resumes_from_a_consistent_checkpoint(toy, tmp_path):
    """Killed while the step-8 checkpoint was half written: the rerun resumes from step 6 (the
    last complete checkpoint), ends bit for bit as an uninterrupted run, and leaves no temporary
    files behind."""
    full, _, _ = _train(toy, out=tmp_path / "a")
    backbone, _, spec, _, _ = toy
    task = str(spec.spec_file)
    out = tmp_path / "b"
    # checkpoints at steps 2, 4, 6 (end of epoch 1), 8: die inside the 4th
    script = _TRAIN_SCRIPT.format(repo=str(REPO), kill_at=4, backbone=str(backbone), task=task, out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert list(out.rglob("*.tmp")), "the kill should have left a half-written temporary file"
    resumed, _, res = _train(toy, out=out, resume=True)
    assert res.resumed_from_step == 6
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))
    # one generation remains: the newest
    states = list((out / "checkpoint").rglob("trainer_state.json"))
    assert len(states) == 1 and json.loads(states[0].read_text())["state"]["step"] == 12


def _interrupted(toy, out: Path, monkeypatch, at: int = 9):
    interrupted_at_step(monkeypatch, at, lambda: _train(toy, out=out))


@pytest.mark.parametrize("damage", ["truncate-weights", "garbage-state", "truncate-optimizer"])
def test_damaged_checkpoint_is_named_and_retrained(toy, tmp_path, monkeypatch, capsys, damage):
    """A truncated weights / optimiser file or garbage trainer state: no traceback; the rerun
    names the file, trains the cell from the start and ends exactly as an uninterrupted run."""
    full, _, _ = _train(toy, out=tmp_path / "a")
    out = tmp_path / "b"
    _interrupted(toy, out, monkeypatch)
    name = {"truncate-weights": "model.safetensors", "garbage-state": "trainer_state.json",
            "truncate-optimizer": "optimizer.safetensors"}[damage]
    files = list((out / "checkpoint").rglob(name))
    assert files
    for f in files:
        if damage == "garbage-state":
            f.write_text("{garbage")
        else:
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    capsys.readouterr()
    resumed, _, res = _train(toy, out=out, resume=True)
    assert res.resumed_from_step == 0
    out_err = capsys.readouterr()
    assert "checkpoint" in (out_err.out + out_err.err) and name in (out_err.out + out_err.err)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------------- finished cells


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_backbone_dir):
    """One finished cell (vanilla, seed 1) logged to the default SQLite MLflow store."""
    from tests.conftest import write_toy_task

    task = write_toy_task(tmp_path_factory.mktemp("toy"))
    out = tmp_path_factory.mktemp("done") / "runs"
    assert main(_run_args(task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy",
                          "--seeds", "1")) == 0
    return out, task


def _copy(done, tmp_path) -> tuple[Path, Path]:
    out, task = done
    dst = tmp_path / "runs"
    shutil.copytree(out, dst)
    (cell,) = [p.parent for p in dst.rglob("cell_config.json")]
    return dst, cell


def test_finished_cell_drops_optimizer_checkpoint_unless_asked(done, tmp_path, tiny_backbone_dir):
    out, _ = done
    (cell,) = [p.parent for p in out.rglob("cell_config.json")]
    assert (cell / "model" / "model.safetensors").exists() and (cell / "dev_logits.safetensors").exists()
    assert not (cell / "checkpoint").exists()
    from tests.conftest import write_toy_task

    task = write_toy_task(tmp_path / "toy")
    out2 = tmp_path / "keep"
    assert main(_run_args(task, tiny_backbone_dir, out2, "--methods", "vanilla", "--signals", "energy", "--seeds", "1",
                          "--no-mlflow", "--keep-checkpoint")) == 0
    (cell2,) = [p.parent for p in out2.rglob("cell_config.json")]
    assert list((cell2 / "checkpoint").rglob("optimizer.safetensors"))


def test_sweep_root_skips_mlflow_artifact_copies(done, tmp_path):
    out, cell = _copy(done, tmp_path)
    assert list(out.rglob("mlartifacts/**/result.json")), "the fixture should have MLflow artefact copies"
    assert main(["sweep", str(out), "--signals", "softmax", "--no-mlflow"]) == 0
    assert "softmax" in json.loads((cell / "result.json").read_text())["sweeps"]


def test_truncated_result_json(done, tmp_path, tiny_backbone_dir, capsys):
    """report skips and names the cell; sweep names it; run retrains it."""
    out, cell = _copy(done, tmp_path)
    _, task = done
    # a second, healthy cell so that report and sweep have something to show
    assert main(_run_args(task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy", "--seeds", "2",
                          "--no-mlflow")) == 0
    res = cell / "result.json"
    res.write_text(res.read_text()[:200])
    capsys.readouterr()
    assert main(["report", "--results", str(out)]) == 0
    cap = capsys.readouterr()
    assert str(res) in cap.err and "skipped" in cap.err and "Traceback" not in cap.err
    assert "vanilla" in cap.out
    assert main(["sweep", str(out), "--signals", "softmax", "--no-mlflow"]) == 0
    cap = capsys.readouterr()
    assert str(res) in cap.err and "Traceback" not in cap.err
    assert main(["sweep", str(cell), "--signals", "softmax", "--no-mlflow"]) == 2
    assert str(res) in _one_line_error(capsys)
    # run: the unreadable result is set aside and the cell is trained again
    assert main(_run_args(task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy", "--seeds", "1",
                          "--no-mlflow")) == 0
    cap = capsys.readouterr()
    assert str(res) in cap.out + cap.err
    assert json.loads(res.read_text())["sweeps"]["energy"]


def test_missing_dev_logits_are_collected_again(done, tmp_path, tiny_backbone_dir, capsys):
    from safetensors.torch import load_file

    out, cell = _copy(done, tmp_path)
    _, task = done
    logits = cell / "dev_logits.safetensors"
    before = load_file(logits)
    logits.unlink()
    assert main(["sweep", str(cell), "--signals", "softmax", "--no-mlflow"]) == 0
    after = load_file(logits)
    assert torch.equal(before["labels"], after["labels"])
    assert torch.allclose(before["logits"], after["logits"], atol=1e-5)
    assert "dev_logits.safetensors" in capsys.readouterr().out
    # a truncated cache while adding a signal through `run`
    with open(logits, "r+b") as fh:
        fh.truncate(100)
    assert main(_run_args(task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy,patience",
                          "--seeds", "1", "--no-mlflow")) == 0
    assert "patience" in json.loads((cell / "result.json").read_text())["sweeps"]
    assert torch.allclose(before["logits"], load_file(logits)["logits"], atol=1e-5)
    # logits and model both gone: one line naming the file and what to do
    logits.unlink()
    shutil.rmtree(cell / "model")
    capsys.readouterr()
    assert main(["sweep", str(cell), "--signals", "entropy", "--no-mlflow"]) == 2
    err = _one_line_error(capsys)
    assert "dev_logits.safetensors" in err and "eebench run" in err


def test_relative_task_path_is_stored_resolved(tmp_path, tiny_backbone_dir, monkeypatch):
    from tests.conftest import write_toy_task

    write_toy_task(tmp_path / "proj" / "toy")
    monkeypatch.chdir(tmp_path / "proj")
    assert main(_run_args("toy/toy.yaml", tiny_backbone_dir, "runs", "--methods", "vanilla", "--signals", "energy",
                          "--no-mlflow")) == 0
    (r,) = find_results(tmp_path / "proj" / "runs")
    assert Path(r.data["task_source"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "proj/runs", "--signals", "softmax", "--no-mlflow"]) == 0


# ----------------------------------------------------------------------------------- bad input


def _bad_csv_task(tmp_path: Path) -> Path:
    from tests.conftest import write_toy_task

    task = write_toy_task(tmp_path / "badtoy")
    (task.parent / "train.csv").write_text("text,label\ngood film,pos\nbad,film,neg\n")
    return task


@pytest.mark.parametrize(
    "case, message",
    [
        ("model", "cannot load"),
        ("glue_dir", "GLUE_DIR"),
        ("bad_data", "train.csv"),
        ("num_layers_7", "--num-layers"),
        ("device_tpu9", "tpu9"),
        ("method", "unknown method"),
        ("batch_size_0", "batch"),
    ],
)
def test_refused_before_any_side_effect(tmp_path, tiny_backbone_dir, toy_task, monkeypatch, capsys, case, message):
    """Nothing is created (no output folder, no MLflow store, no cell folder) for refused input."""
    out = tmp_path / "runs"
    model, task, extra = str(tiny_backbone_dir), str(toy_task), []
    if case == "model":
        model = str(tmp_path / "no-such-model")
    elif case == "glue_dir":
        task = "rte"
        monkeypatch.setenv("GLUE_DIR", str(tmp_path / "no-glue"))
    elif case == "bad_data":
        task = str(_bad_csv_task(tmp_path))
    elif case == "num_layers_7":
        extra = ["--num-layers", "7"]
    elif case == "device_tpu9":
        extra = ["--device", "tpu9"]
    elif case == "method":
        extra = ["--methods", "nope"]
    elif case == "batch_size_0":
        extra = ["--batch-size", "0"]
    rc = main(_run_args(task, model, out, "--signals", "energy", *extra))
    err = _one_line_error(capsys)
    assert rc == 2 and message in err
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


@pytest.mark.parametrize(
    "flag, value",
    [("--batch-size", "0"), ("--micro-batch-size", "0"), ("--epochs", "0"), ("--epochs", "-1"), ("--lr", "0"),
     ("--lr", "-0.1"), ("--head-lr", "-1"), ("--head-lr", "0"), ("--num-layers", "0"), ("--num-thresholds", "0"),
     ("--train-samples", "0"), ("--eval-samples", "-5"), ("--max-seq-length", "0")],
)
def test_impossible_values_exit_2(tmp_path, tiny_backbone_dir, toy_task, capsys, flag, value):
    out = tmp_path / "runs"
    rc = main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy", flag, value))
    err = _one_line_error(capsys)
    assert rc == 2 and flag in err and value in err
    assert not out.exists()


def test_sweep_and_bench_refuse_impossible_values(done, capsys):
    out, _ = done
    (cell,) = [p.parent for p in out.rglob("cell_config.json")]
    for argv, flag in ((["sweep", str(cell), "--signals", "softmax", "--num-thresholds", "0"], "--num-thresholds"),
                       (["bench", str(cell), "--batch-size", "0", "--no-mlflow"], "--batch-size"),
                       (["bench", str(cell), "--repeats", "0", "--no-mlflow"], "--repeats")):
        assert main(argv) == 2, argv
        assert flag in _one_line_error(capsys)


def test_report_from_dead_tracking_server_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{_free_port()}"
    assert main(["report", "--tracking-uri", uri]) == 2
    assert uri in _one_line_error(capsys)


# ----------------------------------------------------------------------------------- two runs, one folder

_SLOW_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
import torch
real = torch.optim.AdamW.step
def slow(self, *a, **k):
    time.sleep({delay})
    return real(self, *a, **k)
torch.optim.AdamW.step = slow
from eebench.cli import main
sys.exit(main({argv!r}))
"""


def test_second_run_on_one_folder_waits_for_the_cell(tmp_path, tiny_backbone_dir, toy_task, monkeypatch, capsys):
    """Run A trains the cell (slowly); run B on the same folder starts meanwhile: it waits for A's
    lock, then finds the cell finished and trains nothing."""
    import eebench.training.trainer as tr

    out = tmp_path / "runs"
    argv = _run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy", "--no-mlflow")
    script = _SLOW_RUN.format(repo=str(REPO), delay=1.0, argv=argv)
    a = subprocess.Popen([sys.executable, "-u", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        lines = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = a.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "training in" in line:
                break
        assert any("training in" in x for x in lines), "".join(lines)

        def boom(*a, **k):
            raise AssertionError("the second run trained the cell too")

        monkeypatch.setattr(tr.Trainer, "train", boom)
        assert main(argv) == 0
        b_out = capsys.readouterr().out
        assert "waiting" in b_out and "nothing to do" in b_out
        rest = a.communicate(timeout=240)[0]
        assert a.returncode == 0, "".join(lines) + rest
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    (r,) = find_results(out)
    assert r.sweeps["energy"].points


# ----------------------------------------------------------------------------------- task files


def test_csv_field_count_error_has_no_tsv_hint(tmp_path):
    from eebench.data import load_task
    from eebench.errors import EebenchError

    task = _bad_csv_task(tmp_path)
    with pytest.raises(EebenchError) as e:
        load_task(str(task), "train")
    assert "train.csv:3" in str(e.value) and "TSV" not in str(e.value)


def test_header_is_refused_for_jsonl(tmp_path):
    from eebench.data import load_task
    from eebench.errors import EebenchError

    d = tmp_path / "j"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    (d / "t.yaml").write_text(textwrap.dedent("""\
        name: j
        text_fields: [sentence]
        label_names: [neg, pos]
        label_map: {neg: 0, pos: 1}
        metrics: [accuracy]
        main_metric: accuracy
        format: {type: jsonl, header: true, columns: {sentence: text, label: label}}
        splits:
          train: {file: train.jsonl}
          dev: {file: train.jsonl}
        """))
    with pytest.raises(EebenchError, match="header"):
        load_task(str(d / "t.yaml"), "train")
    # without the key it loads
    (d / "t.yaml").write_text((d / "t.yaml").read_text().replace("header: true, ", ""))
    assert len(load_task(str(d / "t.yaml"), "train")) == 2


def test_interrupted_run_does_not_leave_its_parent_run_running(tmp_path, tiny_backbone_dir, toy_task, monkeypatch):
    import mlflow

    import eebench.runs.runner as runner

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "sweep_cell", die)
    out = tmp_path / "runs"
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy")) == 130
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eebench-toy"], output_format="pandas")
    parents = runs[runs["tags.mlflow.parentRunId"].isna()] if "tags.mlflow.parentRunId" in runs else runs
    assert list(parents["status"]) == ["KILLED"]


def test_sigterm_closes_the_cell_and_parent_runs_as_killed(tmp_path, tiny_backbone_dir, toy_task, monkeypatch, capsys):
    """``kill`` (a scheduler's limit, a session that ends) used to leave both MLflow runs RUNNING."""
    import signal

    import mlflow

    import eebench.runs.runner as runner

    def killed(*a, **k):  # a real SIGTERM to this process, in the middle of a cell
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the run")

    def unhandled(*a):  # without eebench's handler the signal lands here (instead of killing pytest)
        raise RuntimeError("eebench did not handle SIGTERM")

    monkeypatch.setattr(runner.Runner, "sweep_cell", killed)
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        out = tmp_path / "runs"
        assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy")) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the handler is the command's only
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "eebench: terminated; finished cells are kept" in capsys.readouterr().err
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eebench-toy"], output_format="pandas")
    assert sorted(runs["status"]) == ["KILLED", "KILLED"]  # the cell's run and the command's
    assert not list(out.rglob("result.json"))


def test_a_cell_whose_process_died_has_its_mlflow_run_closed_when_it_runs_again(tmp_path, tiny_backbone_dir,
                                                                                 toy_task, monkeypatch):
    """A process killed outright (SIGTERM, kill -9) cannot close its cell's child run, which would
    stay RUNNING for ever. The next run of that cell, holding the cell's lock, closes it as KILLED
    and names its successor; a RUNNING run of the same cell from another folder is left alone."""
    from mlflow.tracking import MlflowClient

    import eebench.runs.runner as runner
    from eebench.runs.tracking import Tracker

    out = tmp_path / "runs"
    args = _run_args(toy_task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy")

    def die(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a death that closes nothing: no run is ended
        m.setattr(runner.Runner, "sweep_cell", die)
        m.setattr(Tracker, "finish", lambda *a, **k: None)
        assert main(args) == 130
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eebench-toy").experiment_id
    (dead,) = client.search_runs([exp], "tags.eebench_cell_id != ''")
    assert dead.info.status == "RUNNING" and dead.data.tags["eebench_cell_dir"].endswith(dead.data.tags["eebench_cell_id"])
    elsewhere = client.create_run(exp, tags={**{k: v for k, v in dead.data.tags.items() if k.startswith("eebench_")},
                                             "eebench_cell_dir": "/another/machine/runs/toy/cell"}).info.run_id
    assert main(args) == 0
    runs = {r.info.run_id: r for r in client.search_runs([exp], "tags.eebench_cell_id != ''")}
    (new,) = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert runs[dead.info.run_id].info.status == "KILLED"
    assert runs[dead.info.run_id].data.tags["eebench_superseded_by"] == new.info.run_id
    assert runs[elsewhere].info.status == "RUNNING" and "eebench_superseded_by" not in runs[elsewhere].data.tags


def test_dry_run_says_what_run_would_do_with_each_cell_and_changes_nothing(done, tmp_path, tiny_backbone_dir,
                                                                          monkeypatch, capsys):
    """``eebench run --dry-run``: done (and what it would still sweep), resume (from which step,
    and whether another process is on it now), new, conflict; no file is created or changed."""
    from filelock import FileLock

    out, cell = _copy(done, tmp_path)
    _, task = done

    def plan(*extra) -> dict[str, tuple[str, str]]:
        capsys.readouterr()
        before = {p: p.is_file() and p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
        assert main(_run_args(task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy",
                              "--dry-run", *extra)) == 0
        # no file created, changed or removed (validation probes that the folder is writable, as run does)
        assert {p: p.is_file() and p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
        lines = capsys.readouterr().out.splitlines()
        rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| vanilla")]
        return {int(r[1]): (r[3], r[4]) for r in rows}, lines[-1]

    got, last = plan("--seeds", "1,2")
    assert got[1][0] == "done" and got[1][1].endswith("nothing to do") and got[2] == ("new", "")
    assert last == "1 done, 1 new; nothing was trained or changed"
    got, _ = plan("--seeds", "1", "--signals", "energy,softmax")  # a later --signals wins
    assert got[1][1].endswith("would sweep softmax")
    # seed 2 interrupted after its 4th optimiser step's checkpoint (6 steps an epoch, one every 2)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    assert main(_run_args(task, tiny_backbone_dir, out, "--methods", "vanilla", "--signals", "energy", "--seeds", "2",
                          "--no-mlflow", "checkpoint_every=2")) == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    got, _ = plan("--seeds", "2", "checkpoint_every=2")
    assert got[2] == ("resume", "from optimiser step 4")
    (cell2,) = [p.parent for p in out.rglob("cell_config.json") if p.parent.name.startswith("vanilla-s2-")]
    with FileLock(str(cell2 / ".eebench.lock")):  # another process training it now
        got, _ = plan("--seeds", "2", "checkpoint_every=2")
    assert got[2] == ("resume", "from optimiser step 4; running now in another process")
    # an unreadable result: run sets it aside and trains the cell again
    res = cell / "result.json"
    good = res.read_text()
    res.write_text(good[:100])
    got, _ = plan("--seeds", "1")
    assert got[1][0] == "new" and got[1][1].endswith("run sets it aside and trains the cell again")
    res.write_text(good)
    # a folder of the same name holding another configuration
    cc = cell / "cell_config.json"
    cc.write_text(cc.read_text().replace('"seed": 1', '"seed": 7'))
    res = cell / "result.json"
    res.write_text(res.read_text().replace('"seed": 1', '"seed": 7'))
    got, last = plan("--seeds", "1")
    assert got[1][0] == "conflict" and "another configuration" in got[1][1] and last.startswith("1 conflict")
