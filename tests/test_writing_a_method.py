"""docs/writing-a-method.md stays honest: its example plugin, copied into a folder outside the
repository, trains, sweeps and runs true early exit through ``--include`` with no file under
``eebench/`` edited; bad plugins and bad policy requests fail with one line and exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "writing-a-method.md"


def _code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", "eebench.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("outside") / "my_plugins"
    d.mkdir()
    blocks = _code_blocks()
    assert len(blocks) >= 2, "the doc lost its example code"
    (d / "gated.py").write_text(blocks[0])
    (d / "margin.py").write_text(blocks[1])
    return d


@pytest.mark.slow
def test_the_documented_plugin_runs_from_outside_the_package(plugin_dir, tiny_backbone_dir, tmp_path):
    from tests.conftest import write_toy_task

    task = write_toy_task(tmp_path / "toy")
    out = tmp_path / "runs"
    listed = _cli("list", "--include", plugin_dir, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"gated .*\(from include .*gated\.py\)", listed.stdout)
    assert re.search(r"margin .*\(from include .*margin\.py\)", listed.stdout)
    assert re.search(r"gate .*\(method gated\)", listed.stdout)

    res = _cli("run", "--include", plugin_dir, "--task", task, "--model", tiny_backbone_dir, "--methods", "gated,vanilla",
               "--signals", "gate,margin,energy", "--epochs", "1", "--batch-size", "16", "--lr", "3e-3",
               "--pooling", "mean", "--num-thresholds", "15", "--output", out, "--no-mlflow", "gated.gate_lr=0.01",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    results = {p.parent.name.split("-s")[0]: json.loads(p.read_text()) for p in out.rglob("result.json")}
    gated, vanilla = results["gated"], results["vanilla"]
    assert set(gated["sweeps"]) == {"gate", "margin", "energy"} and set(vanilla["sweeps"]) == {"margin", "energy"}
    assert gated["training"]["hparams"]["gate_lr"] == 0.01 and gated["model"]["extras"] == {"gate": 33}
    for sw in gated["sweeps"].values():  # true early exit == simulation, the plugin's policy included
        assert sw["confirm"] and all(c["exit_mismatches"] == c["prediction_mismatches"] == 0 for c in sw["confirm"])
    cell = next(p.parent for p in out.rglob("result.json") if p.parent.name.startswith("gated"))

    # The plugin's modules are saved with the model and restored by bench.
    bench = _cli("bench", "--include", plugin_dir, cell, "--signal", "gate", "--target-speedup", "1.5",
                 "--repeats", "1", "--batch-size", "8", "--samples", "12", "--no-mlflow", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr[-2000:]
    run = json.loads((cell / "result.json").read_text())["bench"][-1]["runs"][0]
    assert all(v["exit_layers"] == 1.0 and v["predictions"] == 1.0 for v in run["matches_simulation"].values())

    # Without the plugin, the saved cell says what to do; asking a cell for a policy it lacks is an error.
    bad = _cli("bench", cell, "--signal", "gate", "--no-mlflow", cwd=tmp_path)
    assert bad.returncode == 2 and "--include" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    vcell = next(p.parent for p in out.rglob("result.json") if p.parent.name.startswith("vanilla"))
    bad = _cli("sweep", "--include", plugin_dir, vcell, "--signals", "gate", "--no-mlflow", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "exit policy 'gate' is not available for method 'vanilla'" in bad.stderr


def test_bad_plugin_and_bad_requests_are_one_line_exit_2(tmp_path, capsys):
    from eebench.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "oops.py").write_text("import torch\n\nx = 1\nraise RuntimeError('half-written plugin')\n")
    capsys.readouterr()
    assert main(["list", "--include", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "plugin file" in err and "oops.py failed to import (line 4): RuntimeError: half-written plugin" in err
    assert main(["list", "--include", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err

    # a policy no method of the run has
    assert main(["run", "--task", "sst2", "--methods", "cosee,vanilla", "--signals", "energy,lte", "--no-mlflow",
                 "--output", str(tmp_path / "o")]) == 2
    # a method hyper-parameter of the wrong type
    assert main(["run", "--task", "sst2", "--methods", "cosee", "--no-mlflow", "--output", str(tmp_path / "o"),
                 "cosee.swm=maybe"]) == 2


def test_typed_hyper_parameters():
    from eebench.api import EebenchError, build_strategy

    assert build_strategy("cosee", {"swm": "false"}).hparams["swm"] is False
    assert build_strategy("cosee", {"swm": "True"}).hparams["swm"] is True
    assert build_strategy("cosee", {"alpha": "1e-2"}).hparams["alpha"] == 0.01
    assert build_strategy("cosee", {"num_thresholds": 7.0}).hparams["num_thresholds"] == 7
    for bad in ({"swm": "maybe"}, {"alpha": "x"}, {"num_thresholds": 2.5}, {"swm": 3}):
        with pytest.raises(EebenchError, match="is not"):
            build_strategy("cosee", bad)


def test_plugins_import_eebench_api_only():
    """The documented plugin and every shipped method file import eebench through ``eebench.api``
    only, so that moving a module inside the package never breaks a plugin; and every name they
    import from it is there."""
    import eebench.api as api

    sources = {"docs/writing-a-method.md": "\n".join(_code_blocks())}
    sources |= {str(f.relative_to(ROOT)): f.read_text() for f in sorted((ROOT / "methods").glob("*.py"))}
    for where, text in sources.items():
        for m in re.finditer(r"^\s*(?:from (eebench[\w.]*) import ([^\n(]+|\([^)]*\))|import (eebench[\w.]*))", text, re.M):
            module = m.group(1) or m.group(3)
            assert module == "eebench.api", f"{where} imports {module}; plugins import from eebench.api"
            for name in re.findall(r"\w+", re.sub(r"#[^\n]*", "", m.group(2) or "")):
                assert name in api.__all__, f"{where} imports {name!r}, which eebench.api does not export"
