"""MLflow tracking: one experiment per task, a parent run per command (``eebench run``, ``eebench
sweep``, ``eebench log``), a child run per (method, seed) cell the command covered, new or reused.

A trained cell's child run opens when the cell starts (before training), receives the per-layer
dev metrics of every epoch as that epoch ends, and closes when the cell ends (FAILED if it raised,
KILLED if interrupted). A cell that was finished earlier gets a child run of its own under the new
parent, with everything logged from its result JSON (tag ``eebench_reused=true``). The parent
carries, per signal, the Pareto plot of all its cells (one curve per method, seeds aggregated)
and the summary table, as top-level artefacts and metrics, so that *Compare* shows them.

If the tracking server cannot be reached the run still finishes, writes its local results and
says so once; ``eebench log RESULTS --tracking-uri URI`` logs them later.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from eebench import __version__
from eebench.runs.results import CellResult, git_commit

log = logging.getLogger("eebench")

#: The experiment tag that makes MLflow 3's UI open an experiment on its runs table ("Model
#: training") rather than on the GenAI traces view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

# Cell-config keys shown in a child's run name when they differ from `eebench run`'s defaults.
_NAMED_KEYS = ("train_samples", "train_subset", "eval_samples", "max_seq_length", "epochs", "lr", "batch_size",
               "precision", "group_by_length")


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def cell_params(config: dict, settings: dict, data: dict, model: dict) -> dict[str, Any]:
    """A child run's params, one name per meaning: the cell config with ``pooling``,
    ``final_pooling`` and ``head_lr`` as actually used (not the ``None`` that means "default"),
    the device used, the run settings that do not change the weights (eval subset, thresholds,
    batching) and the data's row counts and fingerprints."""
    p = {k: v for k, v in config.items() if k not in ("pooling", "final_pooling", "head_lr")}
    p["pooling"] = model.get("pooling", config.get("pooling"))
    p["final_pooling"] = model.get("final_pooling", config.get("final_pooling"))
    p["head_lr"] = model.get("head_lr", config.get("head_lr"))
    if "device" in model:
        p["device"] = model["device"]
    p.update(settings)
    p.update({k: data[k] for k in ("train_rows", "dev_rows", "train_fingerprint", "dev_fingerprint", "eval_split")
              if k in data})
    return p


def cell_run_name(config: dict, settings: dict | None = None) -> str:
    """``<method>-s<seed>`` plus every setting that differs from what ``eebench run`` would use by
    default (a resolved value counts as default when it is what the default resolves to: head lr =
    lr, micro-batch = batch, the backbone's recommended pooling, all layers), and every method
    hyper-parameter off its default, e.g. ``cosee-s42 lr=3e-05 alpha=0.01``."""
    from eebench.model.backbone import resolve_model
    from eebench.runs.config import RunConfig
    from eebench.strategy import get_method

    defaults = RunConfig()
    c = {**(settings or {}), **config}
    parts = [f"{c['method']}-s{c['seed']}"]
    parts += [f"{k}={_short(c[k])}" for k in _NAMED_KEYS if k in c and c[k] != getattr(defaults, k)]
    if c.get("head_lr") not in (None, c.get("lr")):
        parts.append(f"head_lr={_short(c['head_lr'])}")
    if c.get("micro_batch_size") not in (None, c.get("batch_size")):
        parts.append(f"micro_batch_size={c['micro_batch_size']}")
    try:
        recommended = resolve_model(str(c.get("model", defaults.model)))[1]
    except Exception:  # noqa: BLE001 - a model that cannot be resolved here: show any pooling given
        recommended = None
    if c.get("pooling") not in (None, recommended):
        parts.append(f"pooling={c['pooling']}")
    if c.get("final_pooling") not in (None, c.get("pooling")):
        parts.append(f"final_pooling={c['final_pooling']}")
    if c.get("num_layers") not in (None, c.get("backbone_layers")):
        parts.append(f"num_layers={c['num_layers']}")
    try:
        mdefaults = get_method(c["method"]).defaults
    except Exception:  # noqa: BLE001 - an unknown (e.g. removed) method just shows all its params
        mdefaults = {}
    parts += [f"{k}={_short(v)}" for k, v in (c.get("method_params") or {}).items() if mdefaults.get(k) != v]
    return " ".join(parts)


def parent_run_name(task: str, methods: Iterable[str], when: datetime | None = None) -> str:
    """What ran: ``<task> <method>+<method> <date time>``."""
    return f"{task} {'+'.join(dict.fromkeys(methods))} {(when or datetime.now()):%Y-%m-%d %H:%M}"


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags: the runs table's Source and Version columns."""
    tags = {"mlflow.source.name": f"eebench {__version__}", "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class Tracker:
    """A thin, failure-tolerant wrapper around ``MlflowClient``."""

    def __init__(self, uri: str, output: str | Path, enabled: bool = True):
        self.uri = uri
        self.output = Path(output)
        self.enabled = enabled
        self._client = None
        self._warned = False
        self._experiments: dict[str, str] = {}
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
                  f"(log them later with `eebench log {self.output} --tracking-uri {self.uri}`)", flush=True)
            self._warned = True

    @property
    def client(self):
        if self._client is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            # MLflow prints its own "View run ..." lines when a run on a server ends; they would
            # interleave with eebench's output. eebench prints its links once, at the end.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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

    # -- experiments and parents ------------------------------------------------------------
    def experiment_id(self, task: str) -> str | None:
        def get():
            if task in self._experiments:
                return self._experiments[task]
            name = f"eebench-{task}"
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                art = None
                if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
                    art = (self.output.resolve() / "mlartifacts").as_uri()
                eid = self.client.create_experiment(name, artifact_location=art, tags=dict([EXPERIMENT_KIND]))
            else:
                eid = exp.experiment_id
                if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # stores made by older eebench versions
                    self.client.set_experiment_tag(eid, *EXPERIMENT_KIND)
            self._experiments[task] = eid
            return eid

        return self._safe(get)

    def start_parent(self, task: str, run_name: str, params: dict, tags: dict, reuse: bool = False) -> str | None:
        """A new parent run (one per command). With ``reuse``, an earlier parent with the same
        ``eebench_run_id`` tag is returned instead (a resumed ``eebench tune`` search)."""

        def start():
            exp = self.experiment_id(task)
            if reuse:
                found = self.client.search_runs([exp], filter_string=f"tags.eebench_run_id = '{tags['eebench_run_id']}'")
                if found:
                    return found[0].info.run_id
            run = self.client.create_run(exp, run_name=run_name, tags={**source_tags(), **tags})
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

    def _log_metrics(self, run_id: str, metrics: list) -> None:
        for i in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[i : i + 500])

    # -- child runs --------------------------------------------------------------------------
    def open_cell(self, task: str, parent_id: str | None, config: dict, settings: dict, data: dict, model: dict,
                  cell_id: str, reused: bool = False, start_time: int | None = None,
                  cell_dir: Path | None = None) -> str | None:
        """Create a cell's child run (RUNNING) with its params and tags; returns its id.

        ``cell_dir``: the folder of a cell about to train, whose lock the caller holds. The run is
        tagged with it and this machine's name, and any earlier run of the same cell with the same
        tags that is still RUNNING is closed as KILLED (tag ``eebench_superseded_by``): its process
        died without closing it (SIGTERM, SIGKILL, a lost machine), since a live one would hold the
        lock. Runs of the same cell from other folders or machines are left alone."""

        def open_() -> str:
            exp = self.experiment_id(task)
            tags = {**source_tags(), "eebench_cell_id": cell_id, "method": str(config["method"]),
                    "seed": str(config["seed"]), "eebench_reused": str(reused).lower()}
            if cell_dir is not None:
                tags |= {"eebench_cell_dir": str(Path(cell_dir).resolve()), "eebench_host": socket.gethostname()}
            if parent_id:
                tags["mlflow.parentRunId"] = parent_id
            run = self.client.create_run(exp, run_name=cell_run_name(config, settings), tags=tags,
                                         start_time=start_time)
            self._log_params(run.info.run_id, cell_params(config, settings, data, model))
            if cell_dir is not None:
                self._close_orphans(exp, run.info.run_id, tags)
            return run.info.run_id

        return self._safe(open_)

    def _close_orphans(self, exp: str, run_id: str, tags: dict) -> None:
        found = self.client.search_runs(  # a cell id is hex: nothing to quote
            [exp], filter_string=f"tags.eebench_cell_id = '{tags['eebench_cell_id']}' and attributes.status = 'RUNNING'",
            max_results=1000)
        for old in found:
            same = all(old.data.tags.get(k) == tags[k] for k in ("eebench_cell_dir", "eebench_host"))
            if same and old.info.run_id != run_id:
                self.client.set_tag(old.info.run_id, "eebench_superseded_by", run_id)
                self.client.set_terminated(old.info.run_id, "KILLED")

    def log_epoch(self, run_id: str | None, epoch: int, entry: dict) -> None:
        """One epoch's per-layer dev metrics (step = epoch), stamped now, while the cell trains."""
        if not run_id:
            return

        def log_() -> None:
            from mlflow.entities import Metric

            ts = _now_ms()
            self._log_metrics(run_id, [Metric(f"dev_layer{li}_{k}", float(v), ts, epoch)
                                       for li, layer in enumerate(entry["layers"], start=1) for k, v in layer.items()])

        self._safe(log_)

    def end_cell(self, run_id: str | None, status: str) -> None:
        """Close a child run that did not finish (FAILED, KILLED)."""
        self.finish(run_id, status)

    def log_cell(self, result: CellResult, parent_id: str | None, cell_dir: Path, run_id: str | None = None,
                 reused: bool = False, start_time: int | None = None, end_time: int | None = None) -> str | None:
        """Complete a cell's child run and close it FINISHED: final per-layer metrics, timings,
        per-signal summaries, sweep CSVs, Pareto plots (top level, where *Compare* shows them) and
        the result JSON. Without ``run_id`` a child run is created first (a reused cell, a cell
        trained on Ray, ``eebench log``), with the per-epoch metrics of its training history."""

        def log() -> str:
            from mlflow.entities import Metric

            rid = run_id
            ts = _now_ms()
            metrics = []
            if rid is None:
                rid = self.open_cell(result.task, parent_id, result.config, result.settings, result.data, result.model,
                                     result.cell_id, reused=reused, start_time=start_time)
                if rid is None:
                    raise RuntimeError("the child run could not be created")
                for step, entry in enumerate(result.training.get("history", []), start=1):
                    for li, layer in enumerate(entry["layers"], start=1):
                        metrics += [Metric(f"dev_layer{li}_{k}", float(v), ts, step) for k, v in layer.items()]
            for li, layer in enumerate(result.layers, start=1):
                metrics += [Metric(f"final_layer{li}_{k}", float(v), ts, 0) for k, v in layer.items()]
            for k, v in result.timings.items():
                metrics.append(Metric(f"time_{k}", float(v), ts, 0))
            self._log_metrics(rid, metrics)
            self.log_sweeps(rid, result, cell_dir)
            if result.early_exit_exact is not None:  # a mismatch must show in the UI, not only in a count
                self.client.set_tag(rid, "eebench_early_exit_exact", str(result.early_exit_exact).lower())
            self.client.set_terminated(rid, "FINISHED", end_time=end_time)
            return rid

        return self._safe(log)

    def log_sweeps(self, run_id: str, result: CellResult, cell_dir: Path) -> None:
        from mlflow.entities import Metric

        from eebench.runs.plots import plot_pareto, sweep_frame

        ts = _now_ms()
        metrics = []
        with tempfile.TemporaryDirectory() as tmp:
            for signal, sw in result.sweeps.items():
                csv = Path(tmp) / f"sweep_{signal}.csv"
                sweep_frame(sw).to_csv(csv, index=False)
                self.client.log_artifact(run_id, str(csv), "sweeps")
                png = Path(tmp) / f"pareto_{signal}.png"
                plot_pareto({f"{result.method} / {signal}": sw}, png, title=f"{result.task}: {result.method}, {signal}",
                            metric=result.config.get("main_metric", "accuracy"))
                self.client.log_artifact(run_id, str(png))
                # oracle_* (chosen on the scored dev set) and heldout_* / guaranteed_* have distinct names
                from eebench.exits.operating import mlflow_summary

                metrics += [Metric(f"{signal}_{k}", v, ts, 0) for k, v in mlflow_summary(sw.summary).items()]
                if sw.confirm:
                    mism = sum(c["exit_mismatches"] + c["prediction_mismatches"] for c in sw.confirm)
                    metrics.append(Metric(f"{signal}_early_exit_mismatches", float(mism), ts, 0))
            res = Path(tmp) / "result.json"
            res.write_text(result.model_dump_json(indent=1))
            self.client.log_artifact(run_id, str(res))
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    # -- the parent's comparison ------------------------------------------------------------
    def log_parent_summary(self, parent_id: str | None, results: list[CellResult]) -> None:
        """Per signal, on the parent: ``pareto_<signal>.png`` (one staircase per method, the mean
        over seeds with a min-max band), ``summary_<signal>.csv`` (per method, mean / std over seeds
        of every summary) and the means as metrics ``<method>/<signal>_<summary>``."""
        if not parent_id or not results:
            return

        def log() -> None:
            from mlflow.entities import Metric

            from eebench.runs.plots import mean_curves, plot_pareto, seed_summary

            ts = _now_ms()
            metric = results[0].config.get("main_metric", "accuracy")
            task = results[0].task
            metrics = []
            with tempfile.TemporaryDirectory() as tmp:
                for signal in sorted({s for r in results for s in r.sweeps}):
                    table = seed_summary(results, signal)
                    csv = Path(tmp) / f"summary_{signal}.csv"
                    table.to_csv(csv, index=False)
                    self.client.log_artifact(parent_id, str(csv))
                    for row in seed_summary(results, signal, digits=None).to_dict("records"):  # unrounded
                        metrics += [Metric(f"{row['method']}/{signal}_{k.removesuffix('_mean')}", float(v), ts, 0)
                                    for k, v in row.items() if k.endswith("_mean") and v is not None and v == v]
                    cells = {}
                    for m in table["method"]:
                        sws = [r.sweeps[signal] for r in results if r.method == m and signal in r.sweeps]
                        cells[f"{m} ({len(sws)} seed{'s' if len(sws) > 1 else ''})"] = sws
                    curves, bands = mean_curves(cells, metric)
                    png = Path(tmp) / f"pareto_{signal}.png"
                    plot_pareto(curves, png, metric=metric, bands=bands,
                                title=f"{task}, {signal} exits: mean Pareto front over seeds (band: min-max)")
                    self.client.log_artifact(parent_id, str(png))
            self._log_metrics(parent_id, metrics)

        self._safe(log)

    def links(self, task: str, parent_id: str | None) -> list[str]:
        """Where to look: the parent run and the experiment's runs table ("Model training" view)."""
        if not parent_id or not self.enabled:
            return []
        exp = self.experiment_id(task)
        if exp is None:
            return []
        if self.uri.startswith(("http://", "https://")):
            base, lines = self.uri.rstrip("/"), []
        else:
            base = "http://127.0.0.1:5000"
            lines = [f"MLflow: start the UI with  mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1"]
        lines += [f"MLflow parent run:  {base}/#/experiments/{exp}/runs/{parent_id}",
                  f"MLflow runs table:  {base}/#/experiments/{exp}/runs?workflowType=machine_learning"]
        return lines

    def log_bench(self, run_id: str | None, bench: dict) -> None:
        def log():
            from mlflow.entities import Metric

            ts = _now_ms()
            flat = {k: v for k, v in flatten(bench).items() if isinstance(v, int | float) and not isinstance(v, bool)}
            tag = f"bench_{bench.get('signal', '')}"
            self.client.log_batch(run_id, metrics=[Metric(f"{tag}.{k}", float(v), ts, 0) for k, v in flat.items()])

        if run_id:
            self._safe(log)


def log_results(tracker: Tracker, results: list[CellResult], cell_dirs: list[Path], command: str,
                params: dict | None = None, reused: bool = True) -> list[str]:
    """Log finished cells as one parent per task (named after the task, the methods and now) with
    a child per cell (``eebench log``, ``eebench sweep``). Returns the link lines to print."""
    lines: list[str] = []
    for task in sorted({r.task for r in results}):
        pairs = [(r, d) for r, d in zip(results, cell_dirs, strict=True) if r.task == task]
        methods = [r.method for r, _ in pairs]
        parent = tracker.start_parent(task, parent_run_name(task, methods), params or {},
                                      {"task": task, "eebench_command": command})
        for r, d in pairs:
            tracker.log_cell(r, parent, d, reused=reused)
        tracker.log_parent_summary(parent, [r for r, _ in pairs])
        tracker.finish(parent)
        lines += tracker.links(task, parent)
    return lines


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
    exp_id = exp.experiment_id if exp else client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
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
