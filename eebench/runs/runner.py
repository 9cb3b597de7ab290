"""``eebench run``: methods x seeds cells, each trained once, swept with every signal, recorded.

A cell is one (method, seed) training, identified by a hash of its full config (signals are not
part of it: any signal can be swept later from the cached logits). Cells are independent units
of work; re-running a command skips finished cells, resumes unfinished ones from their
checkpoint, and only sweeps signals that a finished cell has not been swept with yet.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from eebench.errors import EebenchError
from eebench.exits.rule import Sweep, predictions_at_exit, sweep
from eebench.model.backbone import MultiExitConfig, MultiExitModel, resolve_model
from eebench.runs.checks import check_run_policies, create_output, operating_settings, validate
from eebench.runs.config import RunConfig
from eebench.runs.identity import cell_config, cell_hash, check_identity, resolve_model_settings
from eebench.runs.locks import LOCK_FILE, cell_busy, cell_lock, remove_temporaries
from eebench.runs.recipes import list_recipes, load_config_file, run_config_from
from eebench.runs.results import CellResult, SignalSweep, UnreadableResult
from eebench.runs.tracking import Tracker, default_tracking_uri, log_results, parent_run_name
from eebench.util import atomic_write as _atomic

log = logging.getLogger("eebench")

SUMMARY_SPEEDUPS = (1.5, 2.0, 3.0, 4.0)


def signals_to_sweep(result: CellResult, signals: list[str], num_thresholds: int) -> list[str]:
    """Signals a finished cell lacks, or has swept with another threshold grid (a legacy sweep
    that did not record its grid is kept)."""
    out = []
    for s in signals:
        sw = result.sweeps.get(s)
        if sw is None or (sw.num_thresholds is not None and sw.num_thresholds != num_thresholds
                          and result.method != "final-only"):
            out.append(s)
    return out


def cell_policy(result: CellResult, name: str):
    """The unbound exit policy ``name`` for a finished cell; a clear error when its method lacks it."""
    from eebench.exits.policies import get_policy

    return get_policy(name, result.method, result.training.get("hparams"))


def summarize(sw: Sweep, scale: float = 1.0) -> dict[str, float]:
    from eebench.exits.rule import area_under_front, metric_at_speedup

    s = sw.speedups * scale
    v = sw.metrics[sw.main_metric]
    out = {f"{sw.main_metric}_at_{x:g}x": metric_at_speedup(s, v, x) for x in SUMMARY_SPEEDUPS}
    out["auc"] = area_under_front(s, v, int(round(sw.num_layers * scale)))
    out["best"] = float(v.max())
    return {k: (None if x != x else x) for k, x in out.items()}  # JSON has no NaN


class Runner:
    """Runs every cell of a RunConfig with the local executor."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.spec = validate(cfg)
        self.out = Path(cfg.output) / self.spec.name
        uri = cfg.tracking_uri or default_tracking_uri(cfg.output)
        self.tracker = Tracker(uri, cfg.output, enabled=not cfg.no_mlflow)
        self._data = None
        self._raw = None
        self._cells = None
        #: Called as hook(model, epoch, history_entry) after every training epoch (Ray Tune reports here).
        self.epoch_hook = None

    # -- data ----------------------------------------------------------------------------
    def raw_data(self):
        """Untokenised train / dev rows (the configured subsets) and their fingerprints, loaded once."""
        if self._raw is None:
            from eebench.data import data_fingerprint, load_task, subset

            train_raw = load_task(self.cfg.task, self.spec.train_split, data_dir=self.cfg.data_dir)
            dev_raw = load_task(self.cfg.task, self.spec.eval_split, data_dir=self.cfg.data_dir)
            if self.cfg.train_subset == "first" and self.cfg.train_samples is not None:
                train_raw = train_raw.select(range(min(self.cfg.train_samples, len(train_raw))))
            else:
                train_raw = subset(train_raw, self.cfg.train_samples, seed=0)
            dev_raw = subset(dev_raw, self.cfg.eval_samples, seed=0)
            task_file = Path(self.cfg.task).expanduser()
            # A task YAML is recorded by its absolute path: sweep / bench run from anywhere.
            source = str(task_file.resolve()) if self.spec.spec_file is not None and task_file.is_file() else str(self.cfg.task)
            info = {"task_source": source, "train_rows": len(train_raw), "dev_rows": len(dev_raw), "train_fingerprint": data_fingerprint(train_raw),
                    "dev_fingerprint": data_fingerprint(dev_raw), "eval_split": self.spec.eval_split}
            self._raw = (train_raw, dev_raw, info)
        return self._raw

    def data(self):
        """Tokenised train / dev splits and the tokenizer (loaded once per run)."""
        if self._data is None:
            from transformers import AutoTokenizer

            from eebench.data import tokenize

            path, _ = resolve_model(self.cfg.model)
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except OSError as e:
                raise EebenchError(f"cannot load the tokenizer of model {self.cfg.model!r}: {str(e).splitlines()[0]}") from None
            train_raw, dev_raw, info = self.raw_data()
            self._data = (tokenize(train_raw, tok, self.spec, self.cfg.max_seq_length),
                          tokenize(dev_raw, tok, self.spec, self.cfg.max_seq_length), tok, info)
        return self._data

    # -- cells ---------------------------------------------------------------------------
    def cells(self) -> list[tuple[str, int, dict, str]]:
        """(method, seed, identity, hash) of every cell; resolves the model and loads the data once."""
        if self._cells is None:
            from eebench.strategy import build_strategy

            model_settings = resolve_model_settings(self.cfg, self.spec.num_labels)
            info = self.raw_data()[2]
            out = []
            for method in self.cfg.methods:
                strategy = build_strategy(method, self.cfg.method_params.get(method))
                if model_settings["num_layers"] == 1 and strategy.trains_exits:
                    raise EebenchError(
                        f"method {method!r} trains early exits, but the model keeps 1 layer (M = 1), so there is no "
                        "internal exit to train or sweep; keep at least 2 layers, or use --methods final-only for a "
                        "1-layer budget row")
                for seed in self.cfg.seeds:
                    cc = cell_config(self.cfg, method, seed, self.spec, strategy.hparams, model_settings, info)
                    out.append((method, seed, cc, cell_hash(cc)))
            self._cells = out
        return self._cells

    def prepare(self) -> None:
        """Load the tokenizer and the data (every mistake in them surfaces here), then create the
        output folder: nothing is written before the whole run is known to be possible."""
        self.cells()  # resolves the model and every cell's identity on the raw data (cheap checks first)
        self.data()
        create_output(self.out)

    def settings(self) -> dict[str, Any]:
        """Run settings that do not change a cell's weights but do its numbers or cost (recorded in
        the result JSON and as MLflow params; the device used is in the result's ``model``)."""
        c = self.cfg
        return {"eval_samples": c.eval_samples, "num_thresholds": c.num_thresholds,
                "confirm_thresholds": c.confirm_thresholds, "micro_batch_size": c.micro_batch_size,
                "group_by_length": c.group_by_length}

    def open_parent(self, kind: str = "run") -> str | None:
        """This command's parent run (a new one every time: its children are the cells it covers)."""
        run_id = cell_hash({"cells": [c[3] for c in self.cells()], "signals": self.cfg.signals})
        return self.tracker.start_parent(
            self.spec.name, parent_run_name(self.spec.name, self.cfg.methods), self.cfg.model_dump(exclude={"progress"}),
            {"eebench_run_id": run_id, "task": self.spec.name, "eebench_command": kind},
        )

    def close_parent(self, parent: str | None, results: list[CellResult], status: str) -> None:
        """Log the comparison of the parent's cells, close it, and say where to look."""
        if parent is None:
            return
        self.tracker.log_parent_summary(parent, results)
        self.tracker.finish(parent, status)
        for line in self.tracker.links(self.spec.name, parent):
            print(line, flush=True)

    def run(self) -> list[CellResult]:
        # The trainer refuses this too, but only once a cell starts (where Ray's tests rely on it).
        from eebench.training.trainer import TrainConfig

        TrainConfig(batch_size=self.cfg.batch_size, micro_batch_size=self.cfg.micro_batch_size).accumulation()
        self.prepare()
        parent = self.open_parent()
        results: list[CellResult] = []
        status = "FAILED"
        try:
            for method, seed, cc, h in self.cells():
                results.append(self.run_cell(method, seed, cc, h, parent))
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.close_parent(parent, results, status)
        return results

    def plan(self) -> list[dict[str, Any]]:
        """What ``run`` would do with every cell, read from the output folder without training,
        locking or changing anything (``eebench run --dry-run``): one dict per cell with method,
        seed, cell (folder name), state and detail. States: ``done`` (finished; the detail names
        the signals it would still sweep), ``resume`` (unfinished; the optimiser step of its last
        complete checkpoint), ``new`` (also a cell whose result.json is unreadable: ``run`` sets it
        aside and trains the cell again), and ``conflict`` (the folder holds another configuration)."""
        from eebench.training.trainer import POINTER, checkpoint_problem

        rows = []
        for method, seed, cc, h in self.cells():
            d = self.cell_dir(method, seed, h)
            row = {"method": method, "seed": seed, "cell": d.name, "state": "new", "detail": ""}
            rows.append(row)
            try:
                if (d / "result.json").exists():
                    try:
                        result = CellResult.from_disk(d / "result.json")
                    except UnreadableResult as e:
                        row["detail"] = f"{str(e).splitlines()[0]}: run sets it aside and trains the cell again"
                        continue
                    check_identity(d, result.config, cc)
                    missing = signals_to_sweep(result, self._cell_policies(method), self.cfg.num_thresholds)
                    train_s = (result.timings or {}).get("train_s")
                    row["state"] = "done"
                    row["detail"] = ((f"trained in {train_s:.0f} s; " if isinstance(train_s, int | float) else "")
                                     + (f"would sweep {', '.join(missing)}" if missing else "nothing to do"))
                elif (d / "cell_config.json").exists():
                    check_identity(d, json.loads((d / "cell_config.json").read_text()), cc)
                    ckpt = d / "checkpoint"
                    row["state"] = "resume"
                    if ckpt.is_dir() and checkpoint_problem(ckpt) is None:
                        row["detail"] = f"from optimiser step {json.loads((ckpt / POINTER).read_text())['step']}"
                    else:
                        row["detail"] = "no complete checkpoint: trains from the start"
            except (EebenchError, OSError, ValueError) as e:
                row["state"], row["detail"] = "conflict", str(e).splitlines()[0] if str(e) else type(e).__name__
            finally:
                if cell_busy(d):
                    row["detail"] = "; ".join(x for x in (row["detail"], "running now in another process") if x)
        return rows

    def _cell_policies(self, method: str) -> list[str]:
        """The asked-for policies that cells of ``method`` have (method policies are per method)."""
        from eebench.exits.policies import available_policies

        have = set(available_policies(method, self.cfg.method_params.get(method)))
        return [s for s in self.cfg.signals if s in have]

    def cell_dir(self, method: str, seed: int, h: str) -> Path:
        return self.out / f"{method}-s{seed}-{h}"

    def run_cell(self, method: str, seed: int, cc: dict, h: str, parent: str | None) -> CellResult:
        """Train, resume or top up one cell, holding its lock: a second process on the same
        output folder waits here and then finds the cell finished."""
        d = self.cell_dir(method, seed, h)
        with cell_lock(d, f"[{method} seed {seed}]"):
            remove_temporaries(d)  # a killed writer's debris; nobody else writes here now
            result_path = d / "result.json"
            if result_path.exists():
                try:
                    result = CellResult.from_disk(result_path)
                except UnreadableResult as e:
                    aside = result_path.with_name(f"result.json.unreadable-{int(time.time())}")
                    result_path.replace(aside)
                    print(f"warning: [{method} seed {seed}] {e}; moved it to {aside.name} and training the cell again",
                          flush=True)
                else:
                    check_identity(d, result.config, cc)
                    return self._top_up(method, seed, d, result, parent)
            if (d / "cell_config.json").exists():  # unfinished: resume only the same configuration
                check_identity(d, json.loads((d / "cell_config.json").read_text()), cc)
            return self.train_cell(method, seed, cc, h, d, parent)

    def _top_up(self, method: str, seed: int, d: Path, result: CellResult, parent: str | None) -> CellResult:
        result_path = d / "result.json"
        missing = signals_to_sweep(result, self._cell_policies(method), self.cfg.num_thresholds)
        print(f"[{method} seed {seed}] finished earlier ({d.name}); "
              + (f"sweeping {', '.join(missing)}" if missing else "nothing to do"), flush=True)
        if missing:
            self.sweep_cell(d, result, missing)
        # A child of this command's parent, with everything the cell has now (new sweeps included).
        run_id = self.tracker.log_cell(result, parent, d, reused=True)
        if missing or (result.mlflow_run_id is None and run_id):
            result.mlflow_run_id = run_id or result.mlflow_run_id
            result.to_disk(result_path)
        return result

    def train_cell(self, method, seed, cc, h, d: Path, parent) -> CellResult:
        from eebench.model.accel import machine_info
        from eebench.strategy import build_strategy
        from eebench.training.trainer import TrainConfig, Trainer, has_checkpoint, seed_everything

        cfg = self.cfg
        train_ds, dev_ds, tok, info = self.data()
        for k in ("train_fingerprint", "dev_fingerprint"):
            if cc.get(k) != info[k]:  # e.g. a Ray worker that reads other files than the driver did
                raise EebenchError(f"the {k.split('_')[0]} data read here ({info[k][:12]}) is not the data this cell "
                                   f"was planned with ({str(cc.get(k))[:12]}); check --data-dir / GLUE_DIR on every node")
        d.mkdir(parents=True, exist_ok=True)
        _atomic(d / "cell_config.json", lambda p: Path(p).write_text(json.dumps(cc, indent=1)))
        strategy = build_strategy(method, cfg.method_params.get(method))
        protocol = strategy.protocol_warnings(cfg.epochs)
        for w in protocol:  # said before training starts, and kept in the result
            print(f"warning: [{method} seed {seed}] {w}", flush=True)
        seed_everything(seed)
        mcfg = MultiExitConfig(model=cfg.model, num_labels=self.spec.num_labels, pooling=cfg.pooling,
                               final_pooling=cfg.final_pooling, num_layers=cfg.num_layers,
                               attn_implementation=cc.get("attn_implementation", cfg.attn_implementation))
        model = MultiExitModel.from_config(mcfg)
        model.attach(strategy)  # the method's own modules (none for the built-in losses)
        tcfg = TrainConfig(lr=cfg.lr, head_lr=cfg.head_lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                           micro_batch_size=cfg.micro_batch_size, seed=seed, device=cfg.device, precision=cfg.precision,
                           checkpoint_every=cfg.checkpoint_every, group_by_length=cfg.group_by_length,
                           progress=cfg.progress)
        resuming = has_checkpoint(d / "checkpoint")  # the trainer verifies it before resuming
        print(f"[{method} seed {seed}] {'resuming' if resuming else 'training'} in {d}", flush=True)
        t0 = time.perf_counter()
        logged: set[int] = set()
        child = None

        def on_epoch(n: int, entry: dict) -> None:
            self.tracker.log_epoch(child, n, entry)  # visible in MLflow while the cell trains
            logged.add(n)
            if self.epoch_hook:
                self.epoch_hook(model, n, entry)

        trainer = Trainer(model, strategy, tcfg, tok, self.spec, out_dir=d, on_epoch=on_epoch)
        model_info = {"name": cfg.model, "pooling": model.config.pooling, "final_pooling": model.config.final_pooling,
                      "head_lr": cfg.head_lr or cfg.lr, "num_layers": model.num_layers,
                      "backbone_layers": model.adapter.num_layers, "train_signal": strategy.train_signal,
                      "trains_exits": strategy.trains_exits,
                      "head": model.config.pooling if model.config.pooling in ("pooler", "exit-pooler") else "linear",
                      "extras": {k: sum(p.numel() for p in m.parameters()) for k, m in model.extras.items()},
                      "policies": sorted(strategy.policies()), "device": str(trainer.device),
                      "attn_implementation": model.config.attn_implementation, "precision": trainer.precision,
                      "precision_requested": cfg.precision, "machine": machine_info(trainer.device)}
        settings = self.settings()
        # The child run lives as long as the cell: opened now, closed when the cell ends.
        child = self.tracker.open_cell(self.spec.name, parent, cc, settings, info, model_info, h, cell_dir=d)
        try:
            result = self._train_and_sweep(method, seed, cc, h, d, trainer, model, strategy, tcfg, train_ds, dev_ds,
                                           tok, info, model_info, settings, resuming, t0, protocol)
            for n, entry in enumerate(result.training["history"], start=1):  # epochs of an earlier process
                if n not in logged:
                    self.tracker.log_epoch(child, n, entry)
            result.mlflow_run_id = self.tracker.log_cell(result, parent, d, run_id=child)
        except KeyboardInterrupt:
            self.tracker.end_cell(child, "KILLED")
            raise
        except BaseException:
            self.tracker.end_cell(child, "FAILED")
            raise
        result.to_disk(d / "result.json")  # written last: marks the cell finished
        if not cfg.keep_checkpoint:
            # The model and the cached logits are all a finished cell needs (sweep, bench,
            # report); the optimiser state is several times the model's size.
            shutil.rmtree(d / "checkpoint", ignore_errors=True)
        _print_cell(result)
        return result

    def _train_and_sweep(self, method, seed, cc, h, d, trainer, model, strategy, tcfg, train_ds, dev_ds, tok, info,
                         model_info, settings, resuming, t0, protocol) -> CellResult:
        from eebench.training.trainer import collapsed_layers

        tr = trainer.train(train_ds, dev_ds, resume=resuming)
        t_train = time.perf_counter() - t0
        model.save(d / "model")
        from eebench.training.trainer import layer_metrics

        if trainer.last_dev is not None:  # the last epoch's evaluation ran on these final weights
            logits, labels, t_eval, scores = trainer.last_dev
        else:  # resumed after the last epoch had finished: nothing was evaluated in this process
            from eebench.exits.policies import get_policy
            from eebench.training.trainer import collect_outputs

            t0 = time.perf_counter()
            pols = [get_policy(n, model=model) for n in strategy.policies()]
            logits, labels, scores = collect_outputs(model, dev_ds, tok, tcfg.eval_batch_size, trainer.device, pols)
            t_eval = time.perf_counter() - t0
        from safetensors.torch import save_file

        # The method policies' values need the model's own modules: cached beside the logits.
        cache = {"logits": logits, "labels": labels, **{f"score.{k}": v for k, v in scores.items()}}
        _atomic(d / "dev_logits.safetensors", lambda p: save_file(cache, p))
        layers = layer_metrics(logits, labels, self.spec.metrics)
        warnings = list(protocol)
        if strategy.trains_exits:
            bad = collapsed_layers(logits, labels, self.spec.main_metric)
            if bad:
                w = (f"internal classifier(s) at layer(s) {', '.join(map(str, bad))} are no better than predicting the "
                     f"majority class on dev ({self.spec.main_metric}); their exits can only hurt "
                     f"(exit pooling {model.config.pooling}; "
                     + ("try --pooling mean, or a higher --head-lr)" if model.config.pooling != "mean"
                        else "try a higher --head-lr or more training data)"))
                print(f"warning: [{method} seed {seed}] {w}", flush=True)
                warnings.append(w)
        result = CellResult(
            cell_id=h, task=self.spec.name, method=method, seed=seed, config=cc, data=info, settings=settings,
            model=model_info,
            # seconds: all processes' training time when known, else (a resume from a checkpoint
            # that predates the record) this process's; seconds_before_resume None says which.
            training={"history": tr.history, "steps": tr.steps,
                      "seconds": tr.train_seconds if tr.total_seconds is None else tr.total_seconds,
                      "seconds_before_resume": tr.seconds_before_resume,
                      "resumed_from_step": tr.resumed_from_step, "hparams": strategy.hparams},
            layers=layers, warnings=warnings,
            timings={"train_s": t_train, "dev_forward_s": t_eval},
        )
        self.sweep_cell(d, result, self._cell_policies(method), model=model, dev_ds=dev_ds, tok=tok)
        return result

    def sweep_cell(self, d: Path, result: CellResult, signals: list[str], model=None, dev_ds=None, tok=None) -> None:
        """Sweep signals over the cell's cached dev logits; confirm a few thresholds with true
        early-exit inference."""
        logits, labels, cached = self.dev_logits(d, result)
        scale = result.model["backbone_layers"] / result.model["num_layers"]
        metrics = tuple([self.spec.main_metric] + [m for m in self.spec.metrics if m != self.spec.main_metric])
        trains_exits = result.model.get("trains_exits", result.method != "final-only")
        # A committed cell (result.json + cached logits, no weights: results/study) is swept from
        # its logits alone; only the true early-exit check needs the model.
        can_confirm = model is not None or (d / "model" / "eebench_config.json").exists()
        if trains_exits and self.cfg.confirm_thresholds and not can_confirm:
            print(f"note: [{result.method} seed {result.seed}] {d.name} has no saved model (weights are not "
                  f"committed): {', '.join(signals)} swept from the cached dev logits, true early exit not "
                  "re-checked for them", flush=True)
        for s in signals:
            pol = cell_policy(result, s)
            cached_scores = cached.get(f"score.{s}")
            if pol.uses_model and cached_scores is None:
                raise EebenchError(f"cell {d.name} has no cached values of exit policy {s!r} (dev_logits.safetensors)")
            t0 = time.perf_counter()
            if not trains_exits:
                # Reference point: no internal exit is trained, so only the final classifier counts.
                sw = sweep(logits, labels, pol, thresholds=[float("-inf") if not pol.higher_is_easier
                                                            else float("inf")], metrics=metrics, scores=cached_scores)
            else:
                sw = sweep(logits, labels, pol, metrics=metrics, num_thresholds=self.cfg.num_thresholds,
                           scores=cached_scores)
            t_sweep = time.perf_counter() - t0
            points = sw.records()
            for p in points:
                p["layer_speedup"] = p["speedup"]
                p["speedup"] = p["speedup"] * scale
            confirm = []
            if trains_exits and self.cfg.confirm_thresholds and can_confirm:
                confirm = self.confirm(d, sw, logits, s, model, dev_ds, tok)
            summary, heldout = summarize(sw, scale), {}
            if getattr(pol, "fixed_threshold", None) is not None:
                # one point per model (a router): reports read this key to draw / print it as a point
                summary["fixed_threshold"] = float(pol.fixed_threshold)
                summary["auc"] = None  # one point has no front to integrate
            if trains_exits:
                from eebench.exits.operating import sweep_summary

                split, guarantee = operating_settings(self.cfg)
                extra, heldout = sweep_summary(logits, labels, pol, SUMMARY_SPEEDUPS, split, guarantee,
                                               self.spec.main_metric, self.cfg.num_thresholds, scale, cached_scores)
                summary.update(extra)
            result.sweeps[s] = SignalSweep(signal=s, points=points, summary=summary, confirm=confirm,
                                           num_thresholds=self.cfg.num_thresholds,
                                           dis=[None if math.isnan(x) else x for x in sw.dis], heldout=heldout)
            result.timings[f"sweep_{s}_s"] = t_sweep
        record_exactness(result)

    def dev_logits(self, d: Path, result: CellResult) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The cell's cached dev logits, labels and method-policy values (``score.<policy>``); when
        the cache is missing or unreadable, collected again from the saved model on the same dev
        rows (checked by fingerprint) and cached anew."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        path = d / "dev_logits.safetensors"
        why = "is missing"
        if path.exists():
            try:
                cached = load_file(path)
                return cached["logits"], cached["labels"], {k: v for k, v in cached.items() if k.startswith("score.")}
            except (SafetensorError, OSError, KeyError) as e:
                why = f"is unreadable ({str(e).splitlines()[0][:120]})"
        redo = "rerun `eebench run` with this cell's settings to train it again"
        try:
            model = MultiExitModel.load(d / "model")
        except (EebenchError, OSError, ValueError) as e:
            raise EebenchError(f"{path} {why} and the saved model cannot be loaded to collect it again "
                               f"({str(e).splitlines()[0][:120]}); {redo}") from None
        dev_ds, tok = self.dev_data(result)
        from eebench.exits.policies import get_policy
        from eebench.training.trainer import collect_outputs

        print(f"[{result.method} seed {result.seed}] {path} {why}: collecting the dev logits again from model/",
              flush=True)
        pols = [get_policy(n, model=model) for n in result.model.get("policies", [])]
        logits, labels, scores = collect_outputs(model, dev_ds, tok, 64, torch.device("cpu"), pols)
        scores = {f"score.{k}": v for k, v in scores.items()}
        _atomic(path, lambda p: save_file({"logits": logits, "labels": labels, **scores}, p))
        return logits, labels, scores

    def dev_data(self, result: CellResult):
        """The tokenised dev rows a finished cell was evaluated on (and the tokenizer), checked
        against the fingerprint in its result."""
        from transformers import AutoTokenizer

        from eebench.data import data_fingerprint, load_task, subset, tokenize

        path, _ = resolve_model(result.config["model"])
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except OSError as e:
            raise EebenchError(f"cannot load the tokenizer of model {result.config['model']!r}: {str(e).splitlines()[0]}") from None
        task = result.data.get("task_source", result.task)
        raw = subset(load_task(task, self.spec.eval_split, data_dir=self.cfg.data_dir), result.data.get("dev_rows"), seed=0)
        want = result.data.get("dev_fingerprint")
        if want is not None and data_fingerprint(raw) != want:
            raise EebenchError(f"the dev data of task {task!r} changed since cell {result.cell_id} was trained (fingerprint "
                               f"{data_fingerprint(raw)} != {want}); its dev logits cannot be collected again")
        return tokenize(raw, tok, self.spec, result.config.get("max_seq_length", self.cfg.max_seq_length)), tok

    def confirm(self, d: Path, sw: Sweep, logits, signal: str, model, dev_ds, tok) -> list[dict]:
        """True layer-by-layer inference at a few thresholds must match the simulation."""
        from eebench.data import make_loader
        from eebench.inference import early_exit

        if model is None:
            model = MultiExitModel.load(d / "model")
        if dev_ds is None:
            _, dev_ds, tok, _ = self.data()
        model.eval()
        from eebench.exits.policies import get_policy

        sig = get_policy(signal, model=model)
        device = next(model.parameters()).device
        # thresholds nearest to the summary speed-ups (distinct)
        picks = []
        for target in SUMMARY_SPEEDUPS[: self.cfg.confirm_thresholds]:
            i = int((sw.speedups - target).abs().argmin())
            if i not in picks:
                picks.append(i)
        out = []
        for i in picks:
            thr = float(sw.thresholds[i])
            el = torch.zeros(len(dev_ds), dtype=torch.long)
            pred = torch.zeros(len(dev_ds), dtype=torch.long)
            for batch in make_loader(dev_ds, tok, 64, shuffle=False, group_by_length=True):
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
                e, p, _ = early_exit(model, inputs["input_ids"], inputs["attention_mask"], sig, thr,
                                           token_type_ids=inputs.get("token_type_ids"))
                el[batch["index"]] = e.cpu()
                pred[batch["index"]] = p.cpu()
            sim_el = sw.exit_layers[i]
            sim_pred = predictions_at_exit(logits, sim_el.unsqueeze(0))[0]
            out.append({"threshold": thr, "layer_speedup": float(sw.speedups[i]),
                        "exit_mismatches": int((el != sim_el).sum()), "prediction_mismatches": int((pred != sim_pred).sum()),
                        "n": len(dev_ds)})
        return out


def record_exactness(result: CellResult) -> None:
    """Set ``result.early_exit_exact`` from the sweeps' confirmations; a mismatch is printed as a
    warning and kept in ``result.warnings`` (one line per signal), never only counted."""
    checked = [(s, c) for s, sw in result.sweeps.items() for c in sw.confirm]
    if not checked:
        return
    bad: dict[str, list[dict]] = {}
    for s, c in checked:
        if c["exit_mismatches"] or c["prediction_mismatches"]:
            bad.setdefault(s, []).append(c)
    result.early_exit_exact = not bad
    prefix = "true early exit disagrees with the simulation"
    result.warnings = [w for w in result.warnings if not w.startswith(prefix)]
    for s, cs in bad.items():
        detail = "; ".join(f"threshold {c['threshold']:.6g}: {c['exit_mismatches']} exit layer(s) and "
                           f"{c['prediction_mismatches']} prediction(s) of {c['n']} differ" for c in cs)
        w = (f"{prefix} for signal {s} ({detail}); the simulated sweep of {s} is not exactly what deployed "
             "early exit gives")
        print(f"warning: [{result.method} seed {result.seed}] {w}", flush=True)
        result.warnings.append(w)


def _print_cell(r: CellResult) -> None:
    metric = r.config.get("main_metric", "accuracy")
    layers = " / ".join(f"{x[metric]:.3f}" for x in r.layers)
    print(f"[{r.method} seed {r.seed}] dev {metric} per layer ({r.model['pooling']} pooling): {layers}", flush=True)
    for s, sw in r.sweeps.items():
        from eebench.exits.operating import mlflow_summary  # oracle_* and heldout_* labelled as in MLflow

        summ = ", ".join(f"{k} {v:.3f}" for k, v in mlflow_summary(sw.summary).items() if not k.endswith("_std"))
        mism = sum(c["prediction_mismatches"] + c["exit_mismatches"] for c in sw.confirm)
        print(f"    {s:9s} {summ}" + (f"; early-exit check: {mism} mismatches" if sw.confirm else ""), flush=True)


def sweep_saved(results_dir: str | Path, signals: list[str], num_thresholds: int = 100, tracking_uri: str | None = None,
                no_mlflow: bool = False) -> list[CellResult]:
    """``eebench sweep``: sweep saved cells with other signals, no retraining (from cached logits).
    A cell whose result cannot be read is named and skipped (an error if it is the only one)."""
    from eebench.data import get_task
    from eebench.runs.results import cell_dirs

    if num_thresholds < 1:
        raise EebenchError(f"--num-thresholds {num_thresholds} is not allowed; give an integer >= 1")
    root = Path(results_dir)
    single = (root / "result.json").exists()
    paths = [root] if single else cell_dirs(root)
    if not paths:
        raise EebenchError(f"no eebench results (result.json) under {results_dir}")
    out, dirs, trackers = [], [], {}
    for d in paths:
        with cell_lock(d, f"[{d.name}]"):
            try:
                result = CellResult.from_disk(d / "result.json")
            except UnreadableResult as e:
                if single:
                    raise EebenchError(f"{e}; rerun `eebench run` with this cell's settings to rebuild it") from None
                print(f"warning: skipped {e}; rerun `eebench run` with this cell's settings to rebuild it",
                      file=sys.stderr, flush=True)
                continue
            task = result.data.get("task_source", result.task)  # a custom task is known by its YAML path
            spec = get_task(task)
            for s in signals:
                cell_policy(result, s).check_task(spec.num_labels)
            cfg = RunConfig(task=task, model=result.config["model"], output=str(d.parent.parent),
                            tracking_uri=tracking_uri, no_mlflow=no_mlflow, num_thresholds=num_thresholds,
                            confirm_thresholds=0, methods=[result.method], signals=signals)
            runner = Runner(cfg)
            runner.sweep_cell(d, result, signals)
            result.to_disk(d / "result.json")
        _print_cell(result)
        out.append(result)
        dirs.append(d)
        trackers.setdefault(runner.tracker.uri, (runner.tracker, []))[1].append(len(out) - 1)
    if not out:
        raise EebenchError(f"no readable eebench results under {results_dir}")
    # One parent per task (and store) for this command, a child per swept cell.
    for tracker, idx in trackers.values():
        if tracker.enabled:
            for line in log_results(tracker, [out[i] for i in idx], [dirs[i] for i in idx], "sweep",
                                    {"signals": ",".join(signals), "num_thresholds": num_thresholds}):
                print(line, flush=True)
    return out


# The names this module had before recipes, checks, identity and locks moved out, re-exported for
# existing imports; new code imports a name from the module that defines it.
__all__ = ["LOCK_FILE", "RunConfig", "Runner", "asdict", "cell_busy", "cell_config", "cell_hash", "cell_lock",
           "cell_policy", "check_identity", "check_run_policies", "create_output", "list_recipes", "load_config_file",
           "operating_settings", "remove_temporaries", "resolve_model_settings", "run_config_from", "signals_to_sweep",
           "summarize", "sweep_saved", "validate"]
