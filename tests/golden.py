"""Per-layer accuracies and sweep points of every ported method on a tiny model and task.

Issue 11, item 8: the redesigned core reproduces the numbers of the code before it. The code
before it is main at ``OLD_COMMIT`` (3562c3b, before the plugin contract; the numbers were first
recorded on 62dc638 and re-recorded there after main changed the CPU attention kernel); it ran
this module's ``produce`` as it stood at ``RECORDER`` (4d718fa), which imports the old layout.

Bit-for-bit numbers hold only on one kind of CPU (torch picks other kernels on another), so
tests/data/golden_methods.json holds one recording per kind of CPU, each made by the old code on
that CPU. test_golden.py compares the current code with the recording of this CPU's kind and,
where there is none (or it differs), with the old code run here and now from the git history.

``python -m tests.golden OUT.json`` writes the current code's numbers; ``python -m tests.golden
--record`` runs the old code on this CPU and adds (or replaces) this CPU's recording.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ["vanilla", "weighted", "cosee", "cosee-entropy", "cosee-no-swm", "cosee-no-osc", "two-stage", "final-only"]
SIGNALS = ["energy", "entropy", "softmax", "patience"]
OLD_COMMIT = "3562c3bc3611721c45f7879b649c51eba854f217"
RECORDER = "4d718fa"
REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "golden_methods.json"


def produce(workdir: Path) -> dict:
    from eebench.cli import main
    from eebench.runs.results import find_results
    from tests.conftest import write_tiny_backbone, write_toy_task

    backbone = write_tiny_backbone(workdir / "tiny-bert")
    task = write_toy_task(workdir / "toy")
    out = workdir / "runs"
    rc = main(["run", "--task", str(task), "--model", str(backbone), "--epochs", "2", "--batch-size", "16",
               "--lr", "1e-3", "--pooling", "mean", "--num-thresholds", "12", "--output", str(out), "--no-mlflow",
               "--methods", ",".join(METHODS), "--signals", ",".join(SIGNALS), "checkpoint_every=0"])
    assert rc == 0
    golden = {}
    for r in find_results(out):
        from safetensors.torch import load_file

        cache = load_file(next((out / "toy").glob(f"{r.method}-s42-*")) / "dev_logits.safetensors")
        golden[r.method] = {
            "logits_sha256": hashlib.sha256(cache["logits"].numpy().tobytes()).hexdigest(),
            "layers": r.layers,
            "history": [[lay["accuracy"] for lay in e["layers"]] for e in r.training["history"]],
            "steps": r.training["steps"],
            "sweeps": {s: [{k: p[k] for k in ("threshold", "speedup", "exit_counts", "accuracy", "f1")}
                           for p in sw.points] for s, sw in r.sweeps.items()},
            "confirm": {s: sw.confirm for s, sw in r.sweeps.items()},
        }
    return golden


def this_cpu() -> dict:
    """The kind of CPU a recording holds for: vendor, family / model / stepping and torch's kernels."""
    import torch

    from eebench.model.accel import cpu_info

    vendor = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            vendor = next((v.strip() for k, _, v in (line.partition(":") for line in f) if k.strip() == "vendor_id"), "")
    except OSError:
        pass
    info = cpu_info()
    return {"vendor": vendor, "model": info.model, "signature": info.signature or None,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def same_kind(recorded: dict, cpu: dict) -> bool:
    """Whether a recording's CPU is this kind of CPU (a recording made before signatures were
    kept, signature None, stands for every CPU of its vendor and kernels)."""
    return (recorded["vendor"] == cpu["vendor"] and recorded["torch_cpu_capability"] == cpu["torch_cpu_capability"]
            and recorded["signature"] in (None, cpu["signature"]))


def recording_for(cpu: dict) -> dict | None:
    recs = [r for r in json.loads(GOLDEN.read_text())["recordings"] if same_kind(r["cpu"], cpu)]
    exact = [r for r in recs if r["cpu"]["signature"] == cpu["signature"]]
    return (exact or recs or [None])[0]


def old_code_available() -> str | None:
    """None when the git history holds the old code, else why not (not a clone, a shallow one)."""
    if not (REPO / ".git").exists():
        return f"{REPO} is not a git checkout"
    for rev in (OLD_COMMIT, RECORDER):
        ok = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{rev}^{{commit}}"], capture_output=True)
        if ok.returncode != 0:
            return f"commit {rev[:7]} is not in this clone's history (a shallow clone?)"
    return None


def old_code_numbers(workdir: Path) -> dict:
    """The old code's numbers on this CPU: OLD_COMMIT extracted from the git history and run."""
    old = workdir / "old-code"
    old.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    recorder = subprocess.run(["git", "-C", str(REPO), "show", f"{RECORDER}:tests/golden.py"], capture_output=True,
                              check=True).stdout
    (old / "tests" / "golden.py").write_bytes(recorder)
    out = workdir / "old.json"
    env = os.environ | {"PYTHONPATH": str(old)}  # the old eebench before the installed one
    run = subprocess.run([sys.executable, "-m", "tests.golden", str(out)], cwd=old, env=env, capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the old code ({OLD_COMMIT[:7]}) failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def record() -> dict:
    """Run the old code on this CPU and keep its numbers as this CPU's recording."""
    why = old_code_available()
    if why:
        raise SystemExit(f"cannot record: {why}")
    cpu = this_cpu()
    with tempfile.TemporaryDirectory() as d:
        methods = old_code_numbers(Path(d))
    data = json.loads(GOLDEN.read_text())
    data["recordings"] = [r for r in data["recordings"] if r["cpu"] != cpu] + [
        {"cpu": cpu, "commit": OLD_COMMIT[:7], "methods": methods}]
    tmp = GOLDEN.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(GOLDEN)
    return cpu


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        print(f"recorded the old code's numbers for {record()}")
    else:
        with tempfile.TemporaryDirectory() as d:
            g = produce(Path(d))
        Path(sys.argv[1]).write_text(json.dumps(g, indent=1, sort_keys=True))
