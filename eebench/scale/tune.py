"""Hyper-parameter searches with Ray Tune (``eebench tune``): search spaces and objectives, trials
that are eebench cells (resumed from their checkpoints when restarted), their MLflow runs, and the
driver that runs, resumes and summarises a search. Ray itself (sessions, resources, forwarded
environment) is ``eebench.scale.executor``.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eebench.errors import EebenchError
from eebench.scale.executor import (
    RayOptions,
    _as_driver,
    _cell_lock,
    _check_fits,
    _driver_context,
    _error_text,
    _import_ray,
    _kill_once_hook,
    _worker_config,
    add_ray_arguments,
    ray_options_from,
    ray_session,
    require_ray,
)

if TYPE_CHECKING:
    pass


#: RunConfig keys a search may vary (besides the method's own hyper-parameters).
TUNABLE_RUN_KEYS = ("lr", "head_lr", "batch_size", "micro_batch_size", "epochs", "pooling", "final_pooling",
                    "num_layers", "max_seq_length", "seed")
_KEY_ALIASES = {"batch": "batch_size", "beta_0": "beta0", "seeds": "seed"}


# ------------------------------------------------------------------------------- search spaces
@dataclass(frozen=True)
class Objective:
    """What a search maximises: the task metric at a target speed-up read off the Pareto front
    (``metric@2x``, ``f1@1.5x``), or the area under the front (``auc``)."""

    kind: str  # "at" | "auc"
    metric: str | None = None  # None: the task's main metric
    speedup: float | None = None

    def label(self, main_metric: str) -> str:
        m = self.metric or main_metric
        return f"{m}_auc" if self.kind == "auc" else f"{m}@{self.speedup:g}x"


def parse_objective(text: str, metrics: list[str] | None = None) -> Objective:
    """``metric@2x`` (the task's main metric at 2x), ``<metric>@<x>x`` or ``auc``."""
    t = text.strip()
    if t == "auc":
        return Objective("auc")
    m = re.fullmatch(r"([a-z_0-9]+)@([0-9]*\.?[0-9]+)x?", t)
    if not m:
        raise EebenchError(f"unknown objective {text!r}; use metric@2x (main metric at a target speed-up), "
                           "<metric>@<x>x or auc (area under the Pareto front)")
    name = None if m.group(1) == "metric" else m.group(1)
    if name is not None and metrics is not None and name not in metrics:
        raise EebenchError(f"objective metric {name!r} is not a metric of this task; its metrics: {', '.join(metrics)}")
    x = float(m.group(2))
    if x < 1:
        raise EebenchError(f"objective speed-up {x:g}x is below 1x; use e.g. metric@2x")
    return Objective("at", name, x)


def objective_from_points(points: list[dict], obj: Objective, main_metric: str, num_layers: int) -> float | None:
    """The objective from a cell's sweep points (speed-ups already on the full backbone's scale)."""
    from eebench.exits.rule import area_under_front, metric_at_speedup

    if not points:
        return None
    metric = obj.metric or main_metric
    s = [p["speedup"] for p in points]
    v = [p[metric] for p in points]
    x = area_under_front(s, v, num_layers) if obj.kind == "auc" else metric_at_speedup(s, v, obj.speedup)
    return None if x != x else float(x)


def objective_from_logits(logits, labels, signal: str, obj: Objective, main_metric: str, scale: float,
                          num_thresholds: int) -> float | None:
    """The objective of a model from its dev logits (the same sweep a finished cell gets)."""
    from eebench.exits.rule import sweep

    metric = obj.metric or main_metric
    sw = sweep(logits, labels, signal, metrics=(metric,), num_thresholds=num_thresholds)
    points = [{"speedup": float(s) * scale, metric: float(v)} for s, v in zip(sw.speedups, sw.metrics[metric], strict=True)]
    return objective_from_points(points, obj, main_metric, int(round(sw.num_layers * scale)))


def _parse_value(text: str):
    """``16`` -> int, ``1e-5`` -> float (YAML would keep it a string), ``true`` -> bool, else str."""
    import yaml

    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_space(items: list[str], method_params: dict[str, Any], search: str) -> dict[str, dict[str, Any]]:
    """``key=v1,v2,...`` (values to try) or ``key=lo:hi`` (log-uniform range, random / asha only)
    -> {key: {"values": [...]} | {"range": (lo, hi)}}. Keys: RunConfig fields a search may vary
    and the method's hyper-parameters (``alpha`` or ``cosee.alpha``)."""
    space: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise EebenchError(f"--grid item {item!r} is not key=v1,v2 (e.g. lr=1e-5,2e-5 alpha=0.01,0.1)")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if "." in key:
            key = key.split(".", 1)[1]
        key = _KEY_ALIASES.get(key, key)
        if key not in TUNABLE_RUN_KEYS and key not in method_params:
            raise EebenchError(f"cannot search over {key!r}; searchable: {', '.join(TUNABLE_RUN_KEYS)} and the "
                               f"method's hyper-parameters {', '.join(sorted(method_params)) or '(none)'}")
        if key in space:
            raise EebenchError(f"--grid names {key!r} twice")
        if ":" in raw and "," not in raw:
            lo, hi = (_parse_value(x) for x in raw.split(":", 1))
            if search == "grid":
                raise EebenchError(f"--grid {item}: a range needs --search random or asha; list values for a grid")
            if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (lo, hi)) or not 0 < lo < hi:
                raise EebenchError(f"--grid {item}: a range is lo:hi with 0 < lo < hi (sampled log-uniformly)")
            space[key] = {"range": (float(lo), float(hi))}
            continue
        values = [_parse_value(v.strip()) for v in raw.split(",") if v.strip()]
        if not values:
            raise EebenchError(f"--grid {item}: no values")
        space[key] = {"values": values}
    if not space:
        raise EebenchError("--grid is empty; give at least one key=v1,v2")
    return space


def _trial_run_config(base: dict[str, Any], method: str, params: dict[str, Any], signal: str | None):
    """The RunConfig of one trial: the base settings with the trial's values."""
    from eebench.runs.config import RunConfig

    data = json.loads(json.dumps(base))
    mp = data.setdefault("method_params", {}).setdefault(method, {})
    for k, v in params.items():
        if k == "seed":
            data["seeds"] = [v]
        elif k in TUNABLE_RUN_KEYS:
            data[k] = v
        else:
            mp[k] = v
    data["methods"] = [method]
    if signal:
        data["signals"] = [signal]
    try:
        return RunConfig(**data)
    except Exception as e:  # pydantic: one line naming the bad value
        raise EebenchError(f"bad trial value: {str(e).splitlines()[0]} ({', '.join(f'{k}={v}' for k, v in params.items())})") from None


def _train_signal(method: str, method_params: dict[str, Any]) -> str:
    from eebench.strategy import build_strategy

    return build_strategy(method, method_params).train_signal or "energy"


# -------------------------------------------------------------------------------- tune: trials
def _trial_fn(base: dict, method: str, objective: Objective, signal: str | None, per_epoch: bool, ctx: dict,
              cpus: float, gpus: float) -> Callable[[dict], None]:
    """The Tune trainable: the trial's cell, trained like any other (resumes from its checkpoint
    when the trial is restarted), reported as ``objective``. A trial that raises reports its
    error and ends normally, so that Tune retries only lost workers (FailureConfig)."""

    def eebench_trial(config: dict) -> None:
        from ray import tune

        t0 = time.time()
        with _as_driver(ctx, cpus):
            try:
                final = _run_trial(base, method, config, objective, signal, per_epoch, gpus,
                                   lambda m: tune.report({**m, "seconds": time.time() - t0}))
            except Exception as e:  # noqa: BLE001 - reported in the table and in MLflow
                tb = traceback.format_exc(limit=20)
                final = {"objective": float("nan"), "error": _error_text(e), "traceback": tb[-4000:],
                         "cell_finished": False}
        final["seconds"] = time.time() - t0
        tune.report(final)

    return eebench_trial


def _run_trial(base, method, config, objective: Objective, signal, per_epoch, gpus, report) -> dict:
    from eebench.runs.runner import Runner

    method_params = {k: v for k, v in config.items() if k not in TUNABLE_RUN_KEYS}
    mp = {**base.get("method_params", {}).get(method, {}), **method_params}
    sig = signal or _train_signal(method, mp)
    cfg = _trial_run_config(base, method, config, sig)
    runner = Runner(_worker_config(cfg.model_dump(), gpus))
    main_metric = runner.spec.main_metric
    (method_, seed, cc, h), = runner.cells()
    d = runner.cell_dir(method_, seed, h)
    common = {"cell_id": h, "cell_dir": str(d), "signal": sig, "error": "", "traceback": ""}
    if per_epoch:
        def hook(model, epoch: int, entry: dict) -> None:
            from eebench.training.trainer import collect_logits

            _, dev_ds, tok, _ = runner.data()
            logits, labels = collect_logits(model, dev_ds, tok, 64)
            scale = model.adapter.num_layers / model.num_layers
            val = objective_from_logits(logits, labels, sig, objective, main_metric, scale, runner.cfg.num_thresholds)
            report({**common, "objective": _num(val), "epoch": epoch, "cell_finished": False})

        runner.epoch_hook = hook
    runner.epoch_hook = _kill_once_hook(runner.epoch_hook)
    with _cell_lock(d):
        result = runner.run_cell(method_, seed, cc, h, None)
    sw = result.sweeps[sig]
    val = objective_from_points(sw.points, objective, main_metric, int(result.model["backbone_layers"]))
    return {**common, "objective": _num(val), "epoch": len(result.training.get("history", [])), "cell_finished": True,
            "best_" + main_metric: sw.summary.get("best")}


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


# ----------------------------------------------------------------------------- tune: MLflow
def _tune_callback_class():
    from ray.tune import Callback

    class TrialLogger(Callback):
        """Driver-side MLflow logging as trials end (the driver is the only writer). Picklable:
        Tune stores it with the experiment and brings it back on restore."""

        def __init__(self, logger: TrialMlflow):
            self.logger = logger

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.logger.log(_row_from_trial(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            self.logger.log(_row_from_trial(trial, error=trial.get_error() or "trial failed"))

    return TrialLogger


def _row_from_trial(trial, error: str | None = None) -> dict:
    return {"trial_id": trial.trial_id, "config": dict(trial.config), "metrics": dict(trial.last_result or {}),
            "tune_error": _first_line(error) if error else None}


def _first_line(text: str) -> str:
    lines = [x for x in str(text).strip().splitlines() if x.strip()]
    # a Tune error file holds a traceback; its last line names the exception
    return (lines[-1] if len(lines) > 1 and lines[0].startswith("Traceback") else (lines[0] if lines else ""))[:1000]


@dataclass
class TrialMlflow:
    """Logs each trial once as a child run of the tune parent run (idempotent across restores)."""

    uri: str
    output: str
    enabled: bool
    parent: str | None
    task: str
    name: str
    method: str
    objective_label: str
    search: str = "grid"
    _tracker: Any = field(default=None, repr=False)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tracker"} | {"_tracker": None}

    @property
    def tracker(self):
        if self._tracker is None:
            from eebench.runs.tracking import Tracker

            self._tracker = Tracker(self.uri, self.output, enabled=self.enabled)
        return self._tracker

    def log(self, row: dict) -> str | None:
        """Create the trial's child run unless it exists; returns its id."""
        status, error = _trial_status(row, self.search)
        if status == "unfinished" or not self.tracker.enabled:
            return None
        t = self.tracker
        key = f"{self.name}/{row['trial_id']}"

        def log() -> str:
            exp = t.experiment_id(self.task)
            found = t.client.search_runs([exp], filter_string=f"tags.eebench_trial = '{key}'")
            if found:
                return found[0].info.run_id
            m = row["metrics"]
            tags = {"eebench_trial": key, "eebench_tune": self.name, "trial_id": row["trial_id"],
                    "trial_status": status, "tune_objective": self.objective_label,
                    "mlflow.runName": f"{self.method}-trial-{row['trial_id']}"}
            if status == "ok":
                from eebench.runs.results import CellResult

                d = Path(m["cell_dir"])
                result = CellResult.from_disk(d / "result.json")
                run_id = t.log_cell(result.model_copy(update={"mlflow_run_id": None}), self.parent, d)
                if run_id is None:
                    raise RuntimeError("MLflow logging is off")
                if result.mlflow_run_id is None:  # first logged here: the cell's own run
                    result.mlflow_run_id = run_id
                    result.to_disk(d / "result.json")
            else:
                if self.parent:
                    tags["mlflow.parentRunId"] = self.parent
                if error:
                    tags["error"] = error[:5000]
                run_id = t.client.create_run(exp, run_name=f"{self.method}-trial-{row['trial_id']}", tags=tags).info.run_id
                t._log_params(run_id, {"method": self.method, **row["config"]})
            for k, v in tags.items():
                t.client.set_tag(run_id, k, v)
            obj = m.get("objective")
            if isinstance(obj, int | float) and obj == obj:
                t.client.log_metric(run_id, "tune_objective", float(obj))
            if status != "ok" and m.get("traceback"):
                t.client.log_text(run_id, m["traceback"], "error.txt")
            t.client.set_terminated(run_id, {"ok": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))
            return run_id

        return t._safe(log)


def _trial_status(row: dict, search: str) -> tuple[str, str | None]:
    """ok | failed (the trial raised) | error (Tune gave up on it, e.g. its worker died more often
    than --max-retries) | stopped (ASHA stopped it early) | unfinished (interrupted)."""
    m = row.get("metrics") or {}
    if row.get("tune_error"):
        return "error", row["tune_error"]
    if m.get("error"):
        return "failed", m["error"]
    if m.get("cell_finished"):
        return "ok", None
    if m and search == "asha":
        return "stopped", None
    return "unfinished", None


# ------------------------------------------------------------------------------- tune: driver
@dataclass
class TuneSummary:
    """The outcome of ``eebench tune``: every trial, the best one and where they were saved."""

    table: Any  # pandas.DataFrame, one row per trial
    best: dict[str, Any] | None
    path: Path
    parent_run_id: str | None = None


def tune(cfg, method: str, grid: list[str], search: str = "grid", samples: int | None = None,
         objective: str = "metric@2x", signal: str | None = None, opts: RayOptions | None = None,
         name: str | None = None, resume: bool = False, verbose: int = 1) -> TuneSummary:
    """``eebench tune``: Ray Tune over ``grid``; each trial is one eebench cell and an MLflow child
    run of the tune run. Prints and saves the table of all trials and the best config; the same
    command (or ``resume=True``) resumes an interrupted search."""
    from eebench.exits.policies import check_policy_names
    from eebench.runs.checks import create_output
    from eebench.runs.identity import cell_hash
    from eebench.runs.runner import Runner
    from eebench.strategy import build_strategy, get_method

    opts = opts or RayOptions()
    opts.check()
    _import_ray(opts.address, "eebench tune", tune=True)
    if search not in ("grid", "random", "asha"):
        raise EebenchError(f"unknown search {search!r}; known: grid, random, asha")
    if search == "grid" and samples not in (None, 1):
        raise EebenchError("--samples is for --search random or asha; to repeat a grid over seeds add seed=1,2,3 to --grid")
    if samples is not None and samples < 1:
        raise EebenchError(f"--samples must be at least 1 (got {samples})")
    spec_method = get_method(method)
    base_mp = {**spec_method.defaults, **cfg.method_params.get(method, {})}
    space = parse_space(grid, base_mp, search)
    base_cfg = cfg.model_copy(update={"methods": [method], "seeds": cfg.seeds[:1]})
    if signal:
        check_policy_names([signal])
    sig_for_check = signal or _train_signal(method, base_mp)
    runner = Runner(base_cfg.model_copy(update={"signals": [sig_for_check]}))  # validates task, names, output
    obj = parse_objective(objective, list(runner.spec.metrics))
    label = obj.label(runner.spec.main_metric)
    # Check every listed value now (exit code 2) rather than in a trial.
    for k, dim in space.items():
        for v in dim.get("values", []):
            if k in TUNABLE_RUN_KEYS:
                _trial_run_config(base_cfg.model_dump(), method, {k: v}, signal)
            else:
                build_strategy(method, {**cfg.method_params.get(method, {}), k: v})
    (_, _, base_cc, _), = runner.cells()
    ident = {"cell": base_cc, "space": space, "search": search, "samples": samples, "objective": label, "signal": signal,
             "num_thresholds": cfg.num_thresholds, "eval_samples": cfg.eval_samples}
    name = name or f"{method}-{search}-{cell_hash(ident)}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise EebenchError(f"tune name {name!r}: use letters, digits, '.', '_' and '-'")
    root = (Path(cfg.output) / "tune").resolve()
    exp_dir = root / name
    base = base_cfg.model_dump()
    base["output"] = str(exp_dir)
    if cfg.data_dir and Path(cfg.data_dir).exists():
        base["data_dir"] = str(Path(cfg.data_dir).resolve())
    max_epochs = max([int(v) for v in space.get("epochs", {}).get("values", [])] or [cfg.epochs])
    phases = sum(p.epochs_factor for p in build_strategy(method, cfg.method_params.get(method)).phases())
    stamp = exp_dir / "eebench_tune.json"
    settings = json.loads(json.dumps(ident, default=str))
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        raise EebenchError(f"the tune experiment {exp_dir} was started with other settings; give this search "
                           "another --name (or remove that folder)")

    runner.data()  # loads the data (its mistakes surface here) before anything is created
    create_output(Path(cfg.output))
    with ray_session(opts.address, opts.num_cpus, what="eebench tune") as ray:
        require_ray("eebench tune", tune=True)
        from ray import tune as rtune

        _check_fits(ray, opts, started=opts.address is None)
        tracker = runner.tracker
        parent = tracker.start_parent(
            runner.spec.name, f"tune-{name}",
            {"method": method, "space": {k: v.get("values", v.get("range")) for k, v in space.items()}, "search": search,
             "samples": samples, "objective": label, "signal": signal or "(training signal)", "base": base_cc},
            {"eebench_run_id": f"tune-{name}", "task": runner.spec.name, "eebench_kind": "tune"}, reuse=True,
        )
        mlf = TrialMlflow(tracker.uri, str(cfg.output), tracker.enabled, parent, runner.spec.name, name, method, label, search)
        trainable = rtune.with_resources(
            _trial_fn(base, method, obj, signal, search == "asha", _driver_context(), opts.cpus_per_cell,
                      opts.gpus_per_cell),
            {"cpu": opts.cpus_per_cell, "gpu": opts.gpus_per_cell},
        )
        from ray.tune import Tuner

        if Tuner.can_restore(str(exp_dir)):
            print(f"[tune] resuming {exp_dir}", flush=True)
            tuner = Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, restart_errored=True)
        elif resume:
            raise EebenchError(f"nothing to resume: no tune experiment at {exp_dir}")
        else:
            tuner = Tuner(trainable, param_space=_param_space(rtune, space, search),
                          tune_config=_tune_config(rtune, search, samples, max_epochs * phases, cfg.seeds[0]),
                          run_config=rtune.RunConfig(
                              name=name, storage_path=str(root), verbose=verbose,
                              failure_config=rtune.FailureConfig(max_failures=opts.max_retries),
                              callbacks=[_tune_callback_class()(mlf)]))
        if not stamp.exists():
            exp_dir.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(settings, indent=1))
        try:
            grid_result = tuner.fit()
        except KeyboardInterrupt:
            tracker.finish(parent, "KILLED")
            raise
        rows = []
        for r in grid_result:
            m = dict(r.metrics or {})
            rows.append({"trial_id": m.get("trial_id") or Path(r.path).name.removeprefix("trial-"), "config": dict(r.config or {}), "metrics": m,
                         "tune_error": _first_line(str(r.error)) if r.error else None})
        for row in rows:  # whatever the callback missed (a driver restart, a restore)
            row["mlflow_run_id"] = mlf.log(row)
        summary = _summarize(rows, space, label, search, exp_dir, runner.spec.name, method, obj, signal)
        summary.parent_run_id = parent
        ok = summary.best is not None
        unfinished = int((summary.table["status"] == "unfinished").sum())
        if unfinished:  # Tune saved its state on Ctrl-C: the same command resumes
            print(f"[tune] {unfinished} trial(s) unfinished; run the same command again to resume {exp_dir}",
                  file=sys.stderr, flush=True)
            tracker.finish(parent, "KILLED")
            raise KeyboardInterrupt
        if parent and tracker.enabled:
            def log_parent():
                if ok:
                    tracker.client.log_metric(parent, "best_objective", float(summary.best["objective"]))
                    tracker.client.set_tag(parent, "best_trial", summary.best["trial_id"])
                for f in ("trials.csv", "best.json"):
                    if (exp_dir / f).exists():
                        tracker.client.log_artifact(parent, str(exp_dir / f))

            tracker._safe(log_parent)
        tracker.finish(parent, "FINISHED" if ok else "FAILED")
    if not ok:
        errs = "; ".join(f"{r['trial_id']}: {r['error']}" for r in summary.table.to_dict("records") if r.get("error"))
        raise EebenchError(f"no trial of {name} finished with an objective" + (f" ({errs[:800]})" if errs else ""))
    return summary


def _param_space(rtune, space: dict, search: str) -> dict:
    out = {}
    for k, dim in space.items():
        if "range" in dim:
            out[k] = rtune.loguniform(*dim["range"])
        elif search == "grid":
            out[k] = rtune.grid_search(dim["values"])
        else:
            out[k] = rtune.choice(dim["values"])
    return out


def _tune_config(rtune, search: str, samples: int | None, max_t: int, seed: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    kw: dict[str, Any] = {"metric": "objective", "mode": "max", "reuse_actors": True,
                          "search_alg": BasicVariantGenerator(random_state=seed),
                          "trial_dirname_creator": lambda t: f"trial-{t.trial_id}"}
    if search == "grid":
        return rtune.TuneConfig(num_samples=1, **kw)
    n = samples or 10
    if search == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # stop_last_trials=False: a trial at its last epoch still finishes its cell (sweep, result)
        kw["scheduler"] = ASHAScheduler(time_attr="epoch", max_t=max(1, max_t), grace_period=1, reduction_factor=2,
                                        stop_last_trials=False)
    return rtune.TuneConfig(num_samples=n, **kw)


def _summarize(rows: list[dict], space: dict, label: str, search: str, exp_dir: Path, task: str, method: str,
               obj: Objective, signal: str | None) -> TuneSummary:
    """The table of all trials (printed as markdown, saved as CSV) and the best trial (printed,
    saved as JSON)."""
    import pandas as pd

    records = []
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        m = row["metrics"]
        status, error = _trial_status(row, search)
        rec = {"trial_id": row["trial_id"], "status": status}
        rec.update({k: row["config"].get(k) for k in space})
        o = m.get("objective")
        rec[label] = None if not isinstance(o, int | float) or o != o else float(o)
        rec["epochs"] = m.get("epoch")
        rec["signal"] = m.get("signal")
        rec["seconds"] = round(float(m["seconds"]), 1) if isinstance(m.get("seconds"), int | float) else None
        rec["cell_id"] = m.get("cell_id")
        rec["mlflow_run_id"] = row.get("mlflow_run_id")
        rec["error"] = error
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    exp_dir.mkdir(parents=True, exist_ok=True)
    from eebench.util import atomic_write as _atomic

    _atomic(exp_dir / "trials.csv", lambda p: table.to_csv(p, index=False))
    cands = [(r[label], i) for i, r in enumerate(records) if r["status"] == "ok" and r[label] is not None]
    best = None
    print(f"\n[tune] {exp_dir.name}: {len(records)} trial(s), objective {label}\n", flush=True)
    print(table.drop(columns=["mlflow_run_id"]).to_markdown(index=False, floatfmt=".4g"), flush=True)
    if cands:
        _, i = max(cands, key=lambda c: (c[0], -c[1]))
        r, row = records[i], sorted(rows, key=lambda r: r["trial_id"])[i]
        cfg = {k: row["config"].get(k) for k in space}
        overrides = [(f"{k}={v}" if k in TUNABLE_RUN_KEYS and k != "seed" else
                      (f"seeds={v}" if k == "seed" else f"{method}.{k}={v}")) for k, v in cfg.items()]
        best = {"task": task, "method": method, "objective": r[label], "objective_name": label,
                "signal": r["signal"], "config": cfg, "trial_id": r["trial_id"], "cell_id": r["cell_id"],
                "cell_dir": row["metrics"].get("cell_dir"), "mlflow_run_id": r["mlflow_run_id"],
                "run_overrides": overrides}
        _atomic(exp_dir / "best.json", lambda p: Path(p).write_text(json.dumps(best, indent=1, default=str)))
        print(f"\n[tune] best: {', '.join(f'{k}={v}' for k, v in cfg.items())} -> {label} {r[label]:.4f} "
              f"(trial {r['trial_id']}, cell {r['cell_id']}); reproduce with: eebench run ... --methods {method} "
              f"{' '.join(overrides)}", flush=True)
    print(f"[tune] table: {exp_dir / 'trials.csv'}" + (f"; best: {exp_dir / 'best.json'}" if best else ""), flush=True)
    failed = [r for r in records if r["status"] in ("failed", "error")]
    if failed:
        print(f"[tune] {len(failed)} trial(s) failed: " + "; ".join(f"{r['trial_id']}: {r['error']}" for r in failed),
              file=sys.stderr, flush=True)
    return TuneSummary(table=table, best=best, path=exp_dir)


# --------------------------------------------------------------------------------- the CLI part
def add_tune_arguments(t) -> None:
    """The flags of ``eebench tune`` (an argparse sub-parser)."""
    t.add_argument("--config", help="YAML file of run settings (keys as the flags, with underscores)")
    t.add_argument("--task", help="GLUE task name or path to a task YAML (default sst2)")
    t.add_argument("--method", required=True, help="the training method whose hyper-parameters are searched")
    t.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="the search space: lr=1e-5,2e-5 alpha=0.01,0.1 beta0=1,10 (lo:hi: log-uniform range, "
                        "random/asha only); keys: " + ", ".join(TUNABLE_RUN_KEYS) + " and the method's hyper-parameters")
    t.add_argument("--search", default="grid", choices=["grid", "random", "asha"],
                   help="grid: every combination; random: --samples draws; asha: random draws stopped early per epoch")
    t.add_argument("--samples", type=int, help="trials of a random / asha search (default 10)")
    t.add_argument("--objective", default="metric@2x",
                   help="metric@2x (main metric at 2x speed-up off the Pareto front; any <metric>@<x>x) or auc")
    t.add_argument("--signal", help="exit signal of the objective (default: the method's training signal, else energy)")
    t.add_argument("--name", help="experiment name (default: from the method, search and space; the same name resumes)")
    t.add_argument("--resume", action="store_true", help="require an interrupted search to resume (resuming is automatic)")
    t.add_argument("--model", help="backbone alias, hub id or local path (default minilm-l6)")
    t.add_argument("--seed", type=int, help="the seed of every trial (default 42; search seeds with seed=1,2,3)")
    t.add_argument("--train-samples", type=int)
    t.add_argument("--train-subset", choices=["random", "first"])
    t.add_argument("--eval-samples", type=int)
    t.add_argument("--max-seq-length", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--head-lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--micro-batch-size", type=int)
    t.add_argument("--pooling", choices=["cls", "mean", "pooler"])
    t.add_argument("--final-pooling", choices=["cls", "mean", "pooler"])
    t.add_argument("--num-layers", type=int)
    t.add_argument("--device")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    t.add_argument("--attn-implementation", choices=["auto", "eager", "sdpa"])
    t.add_argument("--data-dir")
    t.add_argument("--output", help="results folder (default runs/); the search lives in <output>/tune/<name>")
    t.add_argument("--tracking-uri")
    t.add_argument("--no-mlflow", action="store_true", default=None)
    t.add_argument("--num-thresholds", type=int)
    add_ray_arguments(t)


def cmd_tune(args) -> TuneSummary:
    """``eebench tune``: the RunConfig from flags / config file, then ``tune``."""
    from eebench.runs.recipes import run_config_from

    keys = ["task", "model", "train_samples", "train_subset", "eval_samples", "max_seq_length", "epochs", "lr", "head_lr",
            "batch_size", "micro_batch_size", "pooling", "final_pooling", "num_layers", "device", "precision",
            "attn_implementation", "data_dir", "output", "tracking_uri", "no_mlflow", "num_thresholds"]
    given = {k: getattr(args, k) for k in keys}
    if args.seed is not None:
        given["seeds"] = [args.seed]
    cfg = run_config_from(given, args.config, [])
    return tune(cfg, args.method, args.grid, args.search, args.samples, args.objective, args.signal,
                ray_options_from(args), args.name, args.resume)



__all__ = ["Objective", "TuneSummary", "tune", "parse_space", "parse_objective", "objective_from_points",
           "objective_from_logits", "add_tune_arguments", "cmd_tune"]
