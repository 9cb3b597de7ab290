"""Per-layer accuracies and sweep points of every ported method on a tiny model and task.

``python -m tests.golden OUT.json`` writes them; tests/data/golden_methods.json was written by the
code before the plugin-contract redesign (commit 62dc638) and test_golden.py checks that the
current code reproduces it bit for bit (issue 11, item 8: no change in numbers).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

METHODS = ["vanilla", "weighted", "cosee", "cosee-entropy", "cosee-no-swm", "cosee-no-osc", "two-stage", "final-only"]
SIGNALS = ["energy", "entropy", "softmax", "patience"]


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


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        g = produce(Path(d))
    Path(sys.argv[1]).write_text(json.dumps(g, indent=1, sort_keys=True))
