"""Cell identity: every setting that changes a result makes a new cell, equivalent spellings of
one setting do not, a finished cell is reused only under its own identity, and an exit-check
mismatch is loud (console, result.json, MLflow)."""

import json

import pytest
import torch

from eebench.cli import main
from eebench.errors import EebenchError
from eebench.runs.results import CellResult, find_results
from eebench.runs.runner import RunConfig, Runner


def _runner(tmp_path, task, model, **kw) -> Runner:
    base = dict(task=str(task), model=str(model), methods=["cosee"], seeds=[1], output=str(tmp_path / "runs"),
                no_mlflow=True, progress=False)
    return Runner(RunConfig(**{**base, **kw}))


def _cell(tmp_path, task, model, **kw) -> tuple[dict, str]:
    (_, _, cc, h), = _runner(tmp_path, task, model, **kw).cells()
    return cc, h


# Each knob, changed on its own from the defaults, with the value it takes.
KNOBS = {
    "seeds": [2], "train_samples": 50, "eval_samples": 20, "max_seq_length": 16, "epochs": 2, "lr": 1e-3,
    "head_lr": 5e-3, "batch_size": 8, "micro_batch_size": 16, "pooling": "mean", "final_pooling": "pooler",
    "num_layers": 3, "precision": "bf16", "group_by_length": False,
    "method_params": {"cosee": {"alpha": 0.01}},
}


def test_every_knob_makes_a_new_cell(tmp_path, toy_task, tiny_backbone_dir, monkeypatch):
    import eebench.model.accel as accel

    # bf16 is a new cell only where it runs: on a CPU without native bf16 it resolves to fp32,
    # which is the fp32 cell (checked below). The knobs are tried as on a CPU with native bf16,
    # whatever CPU runs the test.
    monkeypatch.setattr(accel, "cpu_info", lambda: accel.CpuInfo("Fake CPU with bf16", ("avx512_bf16",), True))
    base_cc, base = _cell(tmp_path, toy_task, tiny_backbone_dir, batch_size=32)
    hashes = {"base": base}
    for knob, value in KNOBS.items():
        cc, h = _cell(tmp_path, toy_task, tiny_backbone_dir, **{"batch_size": 32, knob: value})
        assert h != base, f"{knob}={value} did not change the cell"
        hashes[knob] = h
    cc, h = _cell(tmp_path, toy_task, tiny_backbone_dir, batch_size=32, precision="bf16")
    assert cc["precision"] == "bf16" and h == hashes["precision"]
    # bf16 requested where it cannot run: it runs in fp32, so it is the fp32 cell, not a new one
    monkeypatch.setattr(accel, "cpu_info", lambda: accel.CpuInfo("Fake CPU without bf16", ("avx2",), False))
    assert _cell(tmp_path, toy_task, tiny_backbone_dir, batch_size=32, precision="bf16")[1] == base
    monkeypatch.setattr(accel, "cpu_info", lambda: accel.CpuInfo("Fake CPU with bf16", ("avx512_bf16",), True))
    # train_subset matters once a subset is drawn
    a = _cell(tmp_path, toy_task, tiny_backbone_dir, batch_size=32, train_samples=50)[1]
    b = _cell(tmp_path, toy_task, tiny_backbone_dir, batch_size=32, train_samples=50, train_subset="first")[1]
    assert a != b
    # another backbone (same architecture, other weights, other folder)
    from tests.conftest import write_tiny_backbone

    other = write_tiny_backbone(tmp_path / "other-bert", seed=1)
    hashes["model"] = _cell(tmp_path, toy_task, other, batch_size=32)[1]
    # the same settings over other data: one dev row changed on disk
    dev = toy_task.parent / "dev.csv"
    lines = dev.read_text().splitlines()
    lines[1] = "the good movie,pos" if lines[1].endswith("neg") else "the bad movie,neg"
    dev.write_text("\n".join(lines) + "\n")
    cc, hashes["dev data"] = _cell(tmp_path, toy_task, tiny_backbone_dir, batch_size=32)
    assert cc["dev_fingerprint"] != base_cc["dev_fingerprint"] and cc["train_fingerprint"] == base_cc["train_fingerprint"]
    # a new version of eebench's maths
    import eebench

    monkeypatch.setattr(eebench, "MATHS_VERSION", eebench.MATHS_VERSION + 1)
    hashes["maths"] = _cell(tmp_path, toy_task, tiny_backbone_dir, batch_size=32)[1]
    assert len(set(hashes.values())) == len(hashes), hashes


def test_equivalent_spellings_share_a_cell(tmp_path, toy_task, tiny_backbone_dir):
    """Defaults filled in: an explicit default is the same cell as the default left out."""
    cc, h = _cell(tmp_path, toy_task, tiny_backbone_dir)
    same = [
        dict(head_lr=2e-5),  # the exit heads learn at --lr by default
        dict(micro_batch_size=32),  # no accumulation
        dict(pooling="cls", final_pooling="cls"),  # a plain BERT folder's recommended pooling
        dict(num_layers=4),  # all layers of the 4-layer backbone
        dict(method_params={"cosee": {"alpha": 0.1, "swm": True}}),  # COSEE's defaults
        dict(device="cpu", checkpoint_every=7, num_thresholds=20, signals=["softmax"]),  # not results
    ]
    for kw in same:
        assert _cell(tmp_path, toy_task, tiny_backbone_dir, **kw)[1] == h, kw
    assert cc["pooling"] == "cls" and cc["num_layers"] == 4 and cc["backbone_layers"] == 4
    assert cc["method_params"]["alpha"] == 0.1 and cc["head_lr"] == 2e-5
    assert len(cc["dev_fingerprint"]) == 64 and cc["dev_rows"] == 48 and cc["eval_samples"] is None


def _args(task, model, out, *extra):
    return ["run", "--task", str(task), "--model", str(model), "--epochs", "1", "--batch-size", "16", "--lr", "3e-3",
            "--pooling", "mean", "--num-thresholds", "10", "--output", str(out), "--methods", "vanilla", "--signals",
            "energy", "--no-mlflow", *extra]


def test_other_eval_samples_trains_a_new_cell_and_tampered_cells_are_refused(tmp_path, toy_task, tiny_backbone_dir,
                                                                            capsys):
    out = tmp_path / "runs"
    assert main(_args(toy_task, tiny_backbone_dir, out)) == 0
    assert main(_args(toy_task, tiny_backbone_dir, out, "--eval-samples", "20")) == 0
    rs = sorted(find_results(out), key=lambda r: r.data["dev_rows"])
    assert [r.data["dev_rows"] for r in rs] == [20, 48]  # the old 48-row sweeps were not handed back
    assert rs[0].cell_id != rs[1].cell_id and rs[0].config["eval_samples"] == 20
    assert sum(sum(p["exit_counts"]) for p in rs[0].sweeps["energy"].points[:1]) == 20
    # A finished cell whose recorded identity is not the one asked for is never reused.
    p = next(out.rglob("result.json"))
    r = CellResult.from_disk(p)
    eval_samples = r.config["eval_samples"]
    r.config["epochs"] = 5
    r.to_disk(p)
    capsys.readouterr()
    extra = ["--eval-samples", str(eval_samples)] if eval_samples else []
    assert main(_args(toy_task, tiny_backbone_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert "holds a cell of another configuration (differs in epochs)" in err and err.count("\n") == 1


def test_new_threshold_grid_is_swept_again(tmp_path, toy_task, tiny_backbone_dir, capsys, monkeypatch):
    out = tmp_path / "runs"
    assert main(_args(toy_task, tiny_backbone_dir, out)) == 0
    (r,) = find_results(out)
    assert r.sweeps["energy"].num_thresholds == 10
    import eebench.training.trainer as tr

    monkeypatch.setattr(tr.Trainer, "train", lambda *a, **k: pytest.fail("trained again"))
    args = _args(toy_task, tiny_backbone_dir, out)
    args[args.index("--num-thresholds") + 1] = "30"
    assert main(args) == 0
    assert "sweeping energy" in capsys.readouterr().out
    (r,) = find_results(out)
    assert r.sweeps["energy"].num_thresholds == 30 and len(r.sweeps["energy"].points) > 10


def test_committed_cell_without_weights_is_reused_and_swept_from_its_logits(tmp_path, toy_task, tiny_backbone_dir,
                                                                              capsys, monkeypatch):
    """results/study commits result.json + cell_config.json + dev_logits, never model/: a run on
    such a folder skips the cell and sweeps a new signal from the cached logits (no true early-exit
    check without the model, said in one note), with the same points as a cell that has its model."""
    import shutil

    import eebench.training.trainer as tr

    out = tmp_path / "runs"
    assert main(_args(toy_task, tiny_backbone_dir, out)) == 0
    (cell,) = [p.parent for p in out.rglob("result.json")]
    full = tmp_path / "full"
    shutil.copytree(out, full)
    shutil.rmtree(cell / "model")
    monkeypatch.setattr(tr.Trainer, "train", lambda *a, **k: pytest.fail("trained again"))
    capsys.readouterr()
    for folder in (out, full):
        args = _args(toy_task, tiny_backbone_dir, folder)
        args[args.index("--signals") + 1] = "energy,entropy"
        assert main(args) == 0
    text = capsys.readouterr().out
    assert "sweeping entropy" in text and text.count("has no saved model") == 1
    (bare,), (whole,) = find_results(out), find_results(full)
    assert bare.sweeps["entropy"].points == whole.sweeps["entropy"].points
    assert bare.sweeps["entropy"].confirm == [] and whole.sweeps["entropy"].confirm


def test_exit_check_mismatch_is_loud(tmp_path, toy_task, tiny_backbone_dir, capsys, monkeypatch):
    import mlflow

    import eebench.runs.runner as runner

    real = runner.Runner.confirm

    def off_by_one(self, *a, **k):
        out = real(self, *a, **k)
        out[0] = {**out[0], "exit_mismatches": out[0]["exit_mismatches"] + 1}
        return out

    monkeypatch.setattr(runner.Runner, "confirm", off_by_one)
    out = tmp_path / "runs"
    args = [a for a in _args(toy_task, tiny_backbone_dir, out) if a != "--no-mlflow"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "warning: [vanilla seed 42] true early exit disagrees with the simulation for signal energy" in printed
    (r,) = find_results(out)
    assert r.early_exit_exact is False
    assert any("disagrees with the simulation for signal energy" in w for w in r.warnings)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(r.mlflow_run_id)
    assert run.data.tags["eebench_early_exit_exact"] == "false"
    assert run.data.metrics["energy_early_exit_mismatches"] >= 1


def test_one_layer_model_final_only_works_early_exit_methods_are_refused(tmp_path, toy_task, tiny_backbone_dir,
                                                                         capsys):
    out = tmp_path / "runs"
    assert main(_args(toy_task, tiny_backbone_dir, out, "--num-layers", "1")) == 2
    err = capsys.readouterr().err
    assert "method 'vanilla' trains early exits, but the model keeps 1 layer" in err and err.count("\n") == 1
    args = _args(toy_task, tiny_backbone_dir, out, "--num-layers", "1")
    args[args.index("--methods") + 1] = "final-only"
    assert main(args) == 0
    (r,) = find_results(out)
    (point,) = r.sweeps["energy"].points
    assert point["speedup"] == pytest.approx(4.0) and point["exit_counts"] == [48]


def test_legacy_result_json_still_reads_and_reports(tmp_path):
    """Cells written before complete identities (the committed results/) load and group."""
    from pathlib import Path

    from eebench.reports.grouping import group_cells

    files = sorted(Path(__file__).parent.parent.glob("results/sst2-*/cells/*.json"))
    assert len(files) == 6
    rs = [CellResult.from_disk(f) for f in files]
    assert all("maths_version" not in r.config for r in rs)
    labels = [g.label for g in group_cells(rs)]
    assert len(labels) == 6 and len(set(labels)) == 6
    assert set(labels) == {"vanilla (pooling=cls, train_samples=5000, train_subset=first)",
                           "vanilla (train_samples=5000, train_subset=first)", "vanilla (train_samples=20000)",
                           "cosee (train_samples=5000, train_subset=first)", "cosee (train_samples=20000)",
                           "weighted (train_samples=20000)"}


def test_overrides_parse_by_type():
    from eebench.runs.runner import run_config_from
    from eebench.strategy import build_strategy

    cfg = run_config_from({}, None, ["cosee.swm=false", "cosee.osc=False", "cosee.num_thresholds=3",
                                     "group_by_length=false"])
    s = build_strategy("cosee", cfg.method_params["cosee"])
    assert s.hparams["swm"] is False and s.hparams["osc"] is False and s.hparams["num_thresholds"] == 3
    assert cfg.group_by_length is False
    assert build_strategy("cosee", {"swm": "false", "alpha": "0.5"}).hparams == {
        **build_strategy("cosee").hparams, "swm": False, "alpha": 0.5}
    for bad, msg in (({"alpha": "abc"}, "cosee.alpha='abc' is not a number"),
                     ({"swm": "maybe"}, "cosee.swm='maybe' is not true or false"),
                     ({"num_thresholds": 2.5}, "cosee.num_thresholds=2.5 is not an integer"),
                     ({"alpha": True}, "cosee.alpha=True is not a number"),
                     ({"signal": 3}, "cosee.signal=3 is not a string")):
        with pytest.raises(EebenchError, match=msg.replace(".", r"\.").replace("(", r"\(")):
            build_strategy("cosee", bad)


def test_cell_config_json_matches_result_identity(tmp_path, toy_task, tiny_backbone_dir):
    out = tmp_path / "runs"
    assert main(_args(toy_task, tiny_backbone_dir, out)) == 0
    (r,) = find_results(out)
    d = next(out.rglob("result.json")).parent
    assert json.loads((d / "cell_config.json").read_text()) == r.config
    assert d.name == f"vanilla-s42-{r.cell_id}"
    from eebench.runs.runner import cell_hash

    assert cell_hash(r.config) == r.cell_id


def test_the_cpu_recipe_is_one_experiment_on_a_gpu_and_on_the_cpu(tmp_path, toy_task, tiny_backbone_dir, monkeypatch):
    """The study's recipe pins eager attention: run on a CUDA machine, its cells have the identity
    of the cells the CPUs committed (and are skipped), where "auto" would pick SDPA there and
    retrain them under another identity."""
    import eebench.util
    from eebench.runs.runner import run_config_from

    args = dict(task=str(toy_task), model=str(tiny_backbone_dir), methods=["cosee"], seeds=[1],
                output=str(tmp_path / "runs"), no_mlflow=True, progress=False)
    recipe = run_config_from(args, "cpu", [])
    plain = RunConfig(**args)
    assert recipe.attn_implementation == "eager"

    def ident(cfg, device):
        monkeypatch.setattr(eebench.util, "pick_device", lambda _=None: torch.device(device))
        (_, _, cc, h), = Runner(cfg).cells()
        return cc["attn_implementation"], h

    assert ident(recipe, "cuda") == ident(recipe, "cpu")
    assert ident(plain, "cuda")[0] == "sdpa" and ident(plain, "cuda")[1] != ident(plain, "cpu")[1]
