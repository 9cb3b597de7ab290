"""Typed, versioned results (in the spirit of mteb's TaskResult): one JSON per trained cell.

Reports read these files (or the same JSON logged to MLflow); nothing scrapes logs.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from eebench import __version__
from eebench.errors import EebenchError
from eebench.util import atomic_write as _atomic

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
    # settings behind the held-out ``heldout_*`` / ``guaranteed_*`` summary keys (eebench.exits.operating)
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
    # run settings that do not change the trained weights: eval subset, thresholds, batching
    settings: dict[str, Any] = Field(default_factory=dict)
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
        """The result at ``path``; UnreadableResult (naming the file) if it is missing,
        truncated or not a cell result."""
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except OSError as e:
            raise UnreadableResult(f"cell result {path} cannot be read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UnreadableResult(f"cell result {path} is not text") from None
        except json.JSONDecodeError as e:
            raise UnreadableResult(f"cell result {path} is not valid JSON ({e.msg} at line {e.lineno}; "
                                   "truncated?)") from None
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise UnreadableResult(f"cell result {path} is not an eebench cell result ({loc}: {err['msg']})") from None


class UnreadableResult(EebenchError):
    """A result.json that is missing, truncated or not a cell result; the message names it."""


def cell_dirs(root: str | Path) -> list[Path]:
    """Cell folders under ``root`` (a results folder or a task folder), sorted. A cell folder
    holds cell_config.json beside result.json (MLflow's artefact copies under mlartifacts/ do
    not); trials of `eebench tune` (under <output>/tune/) are hyper-parameter probes, not method
    results, and stay out unless their own folder is given."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("result.json") if (p.parent / "cell_config.json").exists()
                  and "tune" not in p.relative_to(root).parts[:-2])


def find_results(root: str | Path, skipped: list[tuple[Path, str]] | None = None) -> list[CellResult]:
    """Every cell result under ``root`` (a results folder, a task folder or one cell). An
    unreadable result raises UnreadableResult, or, when a ``skipped`` list is given, is
    appended to it as (path, reason) and left out."""
    root = Path(root)
    files = [root] if root.is_file() else [d / "result.json" for d in cell_dirs(root)]
    out = []
    for f in files:
        try:
            out.append(CellResult.from_disk(f))
        except UnreadableResult as e:
            if skipped is None:
                raise
            skipped.append((f, str(e)))
    return out
