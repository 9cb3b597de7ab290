"""Typed, versioned results (in the spirit of mteb's TaskResult): one JSON per trained cell.

Reports read these files (or the same JSON logged to MLflow); nothing scrapes logs.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from eebench import __version__
from eebench.models import _atomic

SCHEMA_VERSION = 1


def git_commit() -> str | None:
    """The commit of the eebench checkout, if running from one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class SignalSweep(BaseModel):
    signal: str
    points: list[dict[str, Any]]  # threshold, speedup, exit_counts, metrics, rates, pareto
    # <metric>_at_<x>x: oracle (best dev point at >= x, chosen and scored on the same dev set; None:
    # not reached), heldout_<metric>_at_<x>x (+ _std, heldout_speedup_at_<x>x), auc, best
    summary: dict[str, float | None]
    confirm: list[dict[str, Any]] = Field(default_factory=list)  # true early exit vs simulation
    num_thresholds: int | None = None  # the grid size asked for (None: a result from before it was recorded)
    dis: list[float | None] = Field(default_factory=list)  # difficulty inversion score per layer (empty: not computed)
    # settings behind the held-out ``heldout_*`` / ``guaranteed_*`` summary keys (eebench.operating)
    heldout: dict[str, Any] = Field(default_factory=dict)


class CellResult(BaseModel):
    schema_version: int = SCHEMA_VERSION
    eebench_version: str = __version__
    git_commit: str | None = Field(default_factory=git_commit)
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    cell_id: str
    task: str
    method: str
    seed: int
    config: dict[str, Any]  # the full cell config (everything that was hashed)
    data: dict[str, Any]  # fingerprints and row counts
    model: dict[str, Any]  # backbone, pooling, head lr, layers
    training: dict[str, Any]  # per-epoch history, steps, seconds
    layers: list[dict[str, float]]  # per-layer dev metrics of the final model
    sweeps: dict[str, SignalSweep] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    #: Whether true layer-by-layer early exit reproduced the simulated exits and predictions at
    #: every confirmed threshold of every signal (None: nothing was confirmed). False comes with
    #: a warning naming the signal and the counts.
    early_exit_exact: bool | None = None
    bench: list[dict[str, Any]] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    mlflow_run_id: str | None = None

    def to_disk(self, path: str | Path) -> None:
        """Atomic write: a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.model_dump_json(indent=1)
        _atomic(path, lambda p: Path(p).write_text(text))

    @classmethod
    def from_disk(cls, path: str | Path) -> CellResult:
        return cls.model_validate(json.loads(Path(path).read_text()))


def find_results(root: str | Path) -> list[CellResult]:
    """Every cell result under ``root`` (a results folder, a task folder or one cell)."""
    root = Path(root)
    # A cell folder holds cell_config.json beside result.json (MLflow's artefact copies do not);
    # trials of `eebench tune` (under <output>/tune/) are hyper-parameter probes, not method
    # results, and stay out of reports unless their own folder is given.
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("result.json") if (p.parent / "cell_config.json").exists()
                       and "tune" not in p.relative_to(root).parts[:-2])
    return [CellResult.from_disk(f) for f in files]
