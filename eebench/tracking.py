"""MLflow tracking: one experiment per task, a parent run per ``eebench run``, a child run per
(method, seed) cell. If the tracking server cannot be reached the run still finishes, writes its
local results and says so once."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from eebench.results import CellResult

log = logging.getLogger("eebench")


def default_tracking_uri(output: str | Path) -> str:
    """The embedded default store: a SQLite file in the output folder."""
    return f"sqlite:///{(Path(output).resolve() / 'mlflow.db').as_posix()}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """A thin, failure-tolerant wrapper around ``MlflowClient``."""

    def __init__(self, uri: str, output: str | Path, enabled: bool = True):
        self.uri = uri
        self.output = Path(output)
        self.enabled = enabled
        self._client = None
        self._warned = False
        if enabled and uri.startswith(("http://", "https://")) and not self._reachable(uri):
            self._disable(f"MLflow tracking server {uri} is unreachable")

    @staticmethod
    def _reachable(uri: str) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def _disable(self, why: str) -> None:
        self.enabled = False
        if not self._warned:
            print(f"warning: {why}; results are kept locally under {self.output} and nothing is lost "
                  f"(log them later with `eebench report --results {self.output}`)", flush=True)
            self._warned = True

    @property
    def client(self):
        if self._client is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _safe(self, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop a benchmark
            self._disable(f"MLflow logging to {self.uri} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return None

    # -- runs --------------------------------------------------------------------------------
    def experiment_id(self, task: str) -> str | None:
        def get():
            name = f"eebench-{task}"
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            art = None
            if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
                art = (self.output.resolve() / "mlartifacts").as_uri()
            return self.client.create_experiment(name, artifact_location=art)

        return self._safe(get)

    def start_parent(self, task: str, run_name: str, params: dict, tags: dict) -> str | None:
        def start():
            exp = self.experiment_id(task)
            found = self.client.search_runs([exp], filter_string=f"tags.eebench_run_id = '{tags['eebench_run_id']}'")
            if found:
                return found[0].info.run_id
            run = self.client.create_run(exp, run_name=run_name, tags=tags)
            self._log_params(run.info.run_id, params)
            return run.info.run_id

        return self._safe(start)

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self._safe(self.client.set_terminated, run_id, status)

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(params).items())]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i : i + 100])

    def log_cell(self, result: CellResult, parent_id: str | None, cell_dir: Path) -> str | None:
        """Create (or reuse) the cell's child run and log params, stepped per-layer metrics,
        sweep CSVs, Pareto plots, summary metrics and the result JSON."""

        def log() -> str:
            from mlflow.entities import Metric

            exp = self.experiment_id(result.task)
            run_id = result.mlflow_run_id
            if run_id is None:
                tags = {"eebench_cell_id": result.cell_id, "method": result.method, "seed": str(result.seed),
                        "pooling": str(result.model.get("pooling")), "head_lr": str(result.model.get("head_lr"))}
                if parent_id:
                    tags["mlflow.parentRunId"] = parent_id
                run = self.client.create_run(exp, run_name=f"{result.method}-s{result.seed}", tags=tags)
                run_id = run.info.run_id
                self._log_params(run_id, {**result.config, "pooling_used": result.model.get("pooling"),
                                          "final_pooling_used": result.model.get("final_pooling"),
                                          "head_lr_used": result.model.get("head_lr")})
                ts = int(time.time() * 1000)
                metrics = []
                for step, entry in enumerate(result.training.get("history", []), start=1):
                    for li, layer in enumerate(entry["layers"], start=1):
                        metrics += [Metric(f"dev_layer{li}_{k}", float(v), ts, step) for k, v in layer.items()]
                for li, layer in enumerate(result.layers, start=1):
                    metrics += [Metric(f"final_layer{li}_{k}", float(v), ts, 0) for k, v in layer.items()]
                for k, v in result.timings.items():
                    metrics.append(Metric(f"time_{k}", float(v), ts, 0))
                for i in range(0, len(metrics), 500):
                    self.client.log_batch(run_id, metrics=metrics[i : i + 500])
            self.log_sweeps(run_id, result, cell_dir)
            if result.early_exit_exact is not None:  # a mismatch must show in the UI, not only in a count
                self.client.set_tag(run_id, "eebench_early_exit_exact", str(result.early_exit_exact).lower())
            self.client.set_terminated(run_id, "FINISHED")
            return run_id

        return self._safe(log)

    def log_sweeps(self, run_id: str, result: CellResult, cell_dir: Path) -> None:
        from mlflow.entities import Metric

        from eebench.report import plot_pareto, sweep_frame

        ts = int(time.time() * 1000)
        metrics = []
        with tempfile.TemporaryDirectory() as tmp:
            for signal, sw in result.sweeps.items():
                csv = Path(tmp) / f"sweep_{signal}.csv"
                sweep_frame(sw).to_csv(csv, index=False)
                self.client.log_artifact(run_id, str(csv), "sweeps")
                png = Path(tmp) / f"pareto_{signal}.png"
                plot_pareto({f"{result.method} / {signal}": sw}, png, title=f"{result.task}: {result.method}, {signal}",
                            metric=result.config.get("main_metric", "accuracy"))
                self.client.log_artifact(run_id, str(png), "plots")
                # oracle_* (chosen on the scored dev set) and heldout_* / guaranteed_* have distinct names
                from eebench.operating import mlflow_summary

                metrics += [Metric(f"{signal}_{k}", v, ts, 0) for k, v in mlflow_summary(sw.summary).items()]
                if sw.confirm:
                    mism = sum(c["exit_mismatches"] + c["prediction_mismatches"] for c in sw.confirm)
                    metrics.append(Metric(f"{signal}_early_exit_mismatches", float(mism), ts, 0))
            res = Path(tmp) / "result.json"
            res.write_text(result.model_dump_json(indent=1))
            self.client.log_artifact(run_id, str(res))
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def log_bench(self, run_id: str | None, bench: dict) -> None:
        def log():
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            flat = {k: v for k, v in flatten(bench).items() if isinstance(v, int | float) and not isinstance(v, bool)}
            tag = f"bench_{bench.get('signal', '')}"
            self.client.log_batch(run_id, metrics=[Metric(f"{tag}.{k}", float(v), ts, 0) for k, v in flat.items()])

        if run_id:
            self._safe(log)


def log_report(uri: str, task: str | None, files: list[Path], root: Path) -> str:
    """Log report files (tables, figures, their CSVs) as artefacts of one "report" run in the
    task's experiment (``eebench-<task>``; ``eebench-reports`` for cross-task tables). Returns the
    run's UI address or id."""
    import datetime

    from mlflow.tracking import MlflowClient

    from eebench.errors import EebenchError

    if uri.startswith(("http://", "https://")) and not Tracker._reachable(uri):
        raise EebenchError(f"MLflow tracking server {uri} is unreachable; the report files are kept under {root}")
    client = MlflowClient(tracking_uri=uri)
    name = f"eebench-{task}" if task else "eebench-reports"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    run = client.create_run(exp_id, run_name=f"report {task or 'all tasks'} {stamp}",
                            tags={"eebench_report": "1", "task": task or "all"})
    for f in files:
        rel = Path(f).resolve().relative_to(Path(root).resolve()).parent
        client.log_artifact(run.info.run_id, str(f), artifact_path=None if str(rel) == "." else rel.as_posix())
    client.set_terminated(run.info.run_id)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run.info.run_id}"
    return f"run {run.info.run_id} in experiment {name} ({uri})"
