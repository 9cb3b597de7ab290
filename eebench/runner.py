"""``eebench run``: methods x seeds cells, each trained once, swept with every signal, recorded.

A cell is one (method, seed) training, identified by a hash of its full config (signals are not
part of it: any signal can be swept later from the cached logits). Cells are independent units
of work; re-running a command skips finished cells, resumes unfinished ones from their
checkpoint, and only sweeps signals that a finished cell has not been swept with yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from eebench.errors import EebenchError
from eebench.exits import Sweep, predictions_at_exit, sweep
from eebench.models import MultiExitConfig, MultiExitModel, _atomic, resolve_model
from eebench.results import CellResult, SignalSweep
from eebench.signals import get_signal
from eebench.tracking import Tracker, default_tracking_uri

log = logging.getLogger("eebench")

SUMMARY_SPEEDUPS = (1.5, 2.0, 3.0, 4.0)


class RunConfig(BaseModel):
    """Everything ``eebench run`` needs; a YAML config file and ``key=value`` overrides fill it."""

    model_config = {"extra": "forbid"}

    task: str = "sst2"
    methods: list[str] = Field(default_factory=lambda: ["cosee", "vanilla"])
    signals: list[str] = Field(default_factory=lambda: ["energy", "entropy", "softmax", "patience"])
    model: str = "minilm-l6"
    seeds: list[int] = Field(default_factory=lambda: [42])
    train_samples: int | None = None
    train_subset: Literal["random", "first"] = "random"  # seeded random rows, or the first N rows
    eval_samples: int | None = None
    max_seq_length: int = 128
    epochs: int = 1
    lr: float = 2e-5
    head_lr: float | None = None
    batch_size: int = 32
    micro_batch_size: int | None = None
    pooling: str | None = None
    final_pooling: str | None = None
    num_layers: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    group_by_length: bool = True
    checkpoint_every: int = 50
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    data_dir: str | None = None
    output: str = "runs"
    tracking_uri: str | None = None
    no_mlflow: bool = False
    num_thresholds: int = 100
    confirm_thresholds: int = 3
    # Held-out operating points in the summaries (eebench.operating); analysis only, not hashed.
    cal_fraction: float = 0.5
    folds: int | None = None
    split_repeats: int = 20
    split_seed: int = 0
    epsilon: float | None = None
    delta: float = 0.05
    progress: bool = True

    @field_validator("methods", "signals", mode="before")
    @classmethod
    def _split(cls, v):
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("seeds", mode="before")
    @classmethod
    def _split_seeds(cls, v):
        if isinstance(v, str):
            return [int(s) for s in v.split(",") if s.strip()]
        return [v] if isinstance(v, int) else v


#: RunConfig keys left out of a cell's identity, and why: what is run (the lists; one cell is one
#: method and one seed), where it runs and is logged (device: the same experiment on other
#: hardware; checkpoint_every: resuming is bit for bit), what is swept afterwards from the cached
#: logits (a sweep is redone when its grid changes), and data_dir (the data's fingerprints stand
#: for the data wherever it was read from). Every other key, present or future, is identity.
NOT_IDENTITY = frozenset({
    "methods", "signals", "seeds", "method_params", "device", "checkpoint_every", "data_dir", "output",
    "tracking_uri", "no_mlflow", "num_thresholds", "confirm_thresholds", "progress",
})


def resolve_model_settings(cfg: RunConfig, num_labels: int) -> dict[str, Any]:
    """The model settings a cell really uses: pooling and final pooling (the backbone's
    recommendation when not given), the number of kept layers K and the backbone's depth."""
    from transformers import AutoConfig

    mcfg = MultiExitConfig(model=cfg.model, num_labels=num_labels, pooling=cfg.pooling,
                           final_pooling=cfg.final_pooling, num_layers=cfg.num_layers).resolved()
    path, _ = resolve_model(cfg.model)
    try:
        total = int(AutoConfig.from_pretrained(path).num_hidden_layers)
    except (OSError, ValueError) as e:
        raise EebenchError(f"cannot load model {cfg.model!r} ({path}): {str(e).splitlines()[0]}") from None
    k = total if cfg.num_layers is None else cfg.num_layers
    if not 1 <= k <= total:
        raise EebenchError(f"--num-layers {k} is outside 1..{total} for model {cfg.model!r}")
    return {"pooling": mcfg.pooling, "final_pooling": mcfg.final_pooling, "num_layers": k, "backbone_layers": total}


def cell_config(cfg: RunConfig, method: str, seed: int, spec, method_params: dict, model_settings: dict,
                data_info: dict) -> dict[str, Any]:
    """A cell's identity: everything that changes its numbers, fully resolved.

    The run config with every default filled in (less ``NOT_IDENTITY``), the method's resolved
    hyper-parameters, the model's resolved pooling / head lr / micro-batch / layers, the task's
    metrics, the train and dev data fingerprints and eebench's ``MATHS_VERSION``. Two cells share
    an identity exactly when they would produce the same numbers."""
    from eebench import MATHS_VERSION

    ident = {k: v for k, v in cfg.model_dump().items() if k not in NOT_IDENTITY}
    ident.update({
        "maths_version": MATHS_VERSION,
        "task": spec.name,
        "method": method,
        "method_params": dict(sorted(method_params.items())),
        "seed": seed,
        "head_lr": cfg.lr if cfg.head_lr is None else cfg.head_lr,
        "micro_batch_size": cfg.micro_batch_size or cfg.batch_size,
        **model_settings,
        "main_metric": spec.main_metric,
        "metrics": list(spec.metrics),
        "train_split": spec.train_split,
        "eval_split": spec.eval_split,
        "train_fingerprint": data_info["train_fingerprint"],
        "dev_fingerprint": data_info["dev_fingerprint"],
        "train_rows": data_info["train_rows"],
        "dev_rows": data_info["dev_rows"],
    })
    return json.loads(json.dumps(ident, sort_keys=True, default=str))  # as it reads back from JSON


def cell_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_identity(d: Path, stored: dict, expected: dict) -> None:
    """Refuse to reuse a cell folder whose recorded identity is not ``expected``."""
    if stored == expected:
        return
    keys = sorted(k for k in set(stored) | set(expected) if stored.get(k, "<absent>") != expected.get(k, "<absent>"))
    raise EebenchError(f"cell folder {d} holds a cell of another configuration (differs in {', '.join(keys)}); "
                       "it is not reused: move or delete that folder and run again")


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


def validate(cfg: RunConfig):
    """Check every name before any work starts: exit code 2 with the known names."""
    from eebench.data import check_trainable, get_task
    from eebench.strategy import build_strategy, get_method

    spec = get_task(cfg.task)
    check_trainable(spec)
    for m in dict.fromkeys([*cfg.methods, *cfg.method_params]):  # overrides of other methods are checked too
        get_method(m)
        build_strategy(m, cfg.method_params.get(m))
    for s in cfg.signals:
        get_signal(s).check_task(spec.num_labels)
    operating_settings(cfg)
    if not cfg.seeds:
        raise EebenchError("--seeds is empty; give at least one seed, e.g. --seeds 42")
    out = Path(cfg.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A probe of its own (not a fixed name): cells validating the same folder at once on Ray
        # must not delete each other's probe.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".eebench-write-test-"):
            pass
    except OSError as e:
        raise EebenchError(f"output folder {out} cannot be written ({e.strerror}); choose another with --output") from None
    return spec


def operating_settings(cfg: RunConfig):
    """The split and the optional guarantee of the held-out summaries (checked: exit 2 if bad)."""
    from eebench.operating import SplitSpec, Target

    split = SplitSpec(cfg.cal_fraction, cfg.folds, cfg.split_repeats, cfg.split_seed)
    split.check()
    guarantee = Target(epsilon=cfg.epsilon, delta=cfg.delta) if cfg.epsilon is not None else None
    Target(speedup=2.0, delta=cfg.delta).check() if guarantee is None else guarantee.check()
    return split, guarantee


def summarize(sw: Sweep, scale: float = 1.0) -> dict[str, float]:
    from eebench.exits import area_under_front, metric_at_speedup

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
        self.out.mkdir(parents=True, exist_ok=True)
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
            info = {"task_source": str(self.cfg.task), "train_rows": len(train_raw), "dev_rows": len(dev_raw), "train_fingerprint": data_fingerprint(train_raw),
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

    def run(self) -> list[CellResult]:
        run_id = cell_hash({"cells": [c[3] for c in self.cells()], "signals": self.cfg.signals})
        parent = self.tracker.start_parent(
            self.spec.name, f"run-{run_id}", self.cfg.model_dump(exclude={"progress"}),
            {"eebench_run_id": run_id, "task": self.spec.name},
        )
        results = []
        for method, seed, cc, h in self.cells():
            results.append(self.run_cell(method, seed, cc, h, parent))
        self.tracker.finish(parent)
        return results

    def cell_dir(self, method: str, seed: int, h: str) -> Path:
        return self.out / f"{method}-s{seed}-{h}"

    def run_cell(self, method: str, seed: int, cc: dict, h: str, parent: str | None) -> CellResult:
        d = self.cell_dir(method, seed, h)
        result_path = d / "result.json"
        if result_path.exists():
            result = CellResult.from_disk(result_path)
            check_identity(d, result.config, cc)
            missing = signals_to_sweep(result, self.cfg.signals, self.cfg.num_thresholds)
            print(f"[{method} seed {seed}] finished earlier ({d.name}); "
                  + (f"sweeping {', '.join(missing)}" if missing else "nothing to do"), flush=True)
            if missing:
                self.sweep_cell(d, result, missing)
                result.mlflow_run_id = self.tracker.log_cell(result, parent, d) or result.mlflow_run_id
                result.to_disk(result_path)
            return result
        if (d / "cell_config.json").exists():  # unfinished: resume only the same configuration
            check_identity(d, json.loads((d / "cell_config.json").read_text()), cc)
        return self.train_cell(method, seed, cc, h, d, parent)

    def train_cell(self, method, seed, cc, h, d: Path, parent) -> CellResult:
        from eebench.strategy import build_strategy
        from eebench.training import TrainConfig, Trainer, collapsed_layers, seed_everything

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
                               final_pooling=cfg.final_pooling, num_layers=cfg.num_layers)
        model = MultiExitModel.from_config(mcfg)
        tcfg = TrainConfig(lr=cfg.lr, head_lr=cfg.head_lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                           micro_batch_size=cfg.micro_batch_size, seed=seed, device=cfg.device, precision=cfg.precision,
                           checkpoint_every=cfg.checkpoint_every, group_by_length=cfg.group_by_length,
                           progress=cfg.progress)
        resuming = (d / "checkpoint" / "trainer_state.json").exists()
        print(f"[{method} seed {seed}] {'resuming' if resuming else 'training'} in {d}", flush=True)
        t0 = time.perf_counter()
        on_epoch = (lambda n, entry: self.epoch_hook(model, n, entry)) if self.epoch_hook else None
        trainer = Trainer(model, strategy, tcfg, tok, self.spec, out_dir=d, on_epoch=on_epoch)
        tr = trainer.train(train_ds, dev_ds, resume=resuming)
        t_train = time.perf_counter() - t0
        model.save(d / "model")
        from eebench.training import collect_logits, layer_metrics

        if trainer.last_dev is not None:  # the last epoch's evaluation ran on these final weights
            logits, labels, t_eval = trainer.last_dev
        else:  # resumed after the last epoch had finished: nothing was evaluated in this process
            t0 = time.perf_counter()
            logits, labels = collect_logits(model, dev_ds, tok, tcfg.eval_batch_size, trainer.device)
            t_eval = time.perf_counter() - t0
        from safetensors.torch import save_file

        _atomic(d / "dev_logits.safetensors", lambda p: save_file({"logits": logits, "labels": labels}, p))
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
        full_layers = model.adapter.num_layers
        result = CellResult(
            cell_id=h, task=self.spec.name, method=method, seed=seed, config=cc, data=info,
            model={"name": cfg.model, "pooling": model.config.pooling, "final_pooling": model.config.final_pooling,
                   "head_lr": cfg.head_lr or cfg.lr, "num_layers": model.num_layers, "backbone_layers": full_layers,
                   "train_signal": strategy.train_signal, "head": "pooler" if model.config.pooling == "pooler" else "linear",
                   "device": str(trainer.device)},
            training={"history": tr.history, "steps": tr.steps, "seconds": tr.train_seconds,
                      "resumed_from_step": tr.resumed_from_step, "hparams": strategy.hparams},
            layers=layers, warnings=warnings,
            timings={"train_s": t_train, "dev_forward_s": t_eval},
        )
        self.sweep_cell(d, result, self.cfg.signals, model=model, dev_ds=dev_ds, tok=tok)
        result.mlflow_run_id = self.tracker.log_cell(result, parent, d)
        result.to_disk(d / "result.json")  # written last: marks the cell finished
        _print_cell(result)
        return result

    def sweep_cell(self, d: Path, result: CellResult, signals: list[str], model=None, dev_ds=None, tok=None) -> None:
        """Sweep signals over the cell's cached dev logits; confirm a few thresholds with true
        early-exit inference."""
        from safetensors.torch import load_file

        cached = load_file(d / "dev_logits.safetensors")
        logits, labels = cached["logits"], cached["labels"]
        scale = result.model["backbone_layers"] / result.model["num_layers"]
        metrics = tuple([self.spec.main_metric] + [m for m in self.spec.metrics if m != self.spec.main_metric])
        trains_exits = result.method != "final-only"
        for s in signals:
            t0 = time.perf_counter()
            if not trains_exits:
                # Reference point: no internal exit is trained, so only the final classifier counts.
                sw = sweep(logits, labels, s, thresholds=[float("-inf") if not get_signal(s).higher_is_easier
                                                          else float("inf")], metrics=metrics)
            else:
                sw = sweep(logits, labels, s, metrics=metrics, num_thresholds=self.cfg.num_thresholds)
            t_sweep = time.perf_counter() - t0
            points = sw.records()
            for p in points:
                p["layer_speedup"] = p["speedup"]
                p["speedup"] = p["speedup"] * scale
            confirm = []
            if trains_exits and self.cfg.confirm_thresholds:
                confirm = self.confirm(d, sw, logits, s, model, dev_ds, tok)
            summary, heldout = summarize(sw, scale), {}
            if trains_exits:
                from eebench.operating import sweep_summary

                split, guarantee = operating_settings(self.cfg)
                extra, heldout = sweep_summary(logits, labels, s, SUMMARY_SPEEDUPS, split, guarantee, self.spec.main_metric,
                                               self.cfg.num_thresholds, scale)
                summary.update(extra)
            result.sweeps[s] = SignalSweep(signal=s, points=points, summary=summary, confirm=confirm,
                                           num_thresholds=self.cfg.num_thresholds,
                                           dis=[None if math.isnan(x) else x for x in sw.dis], heldout=heldout)
            result.timings[f"sweep_{s}_s"] = t_sweep
        record_exactness(result)

    def confirm(self, d: Path, sw: Sweep, logits, signal: str, model, dev_ds, tok) -> list[dict]:
        """True layer-by-layer inference at a few thresholds must match the simulation."""
        from eebench.data import make_loader

        if model is None:
            model = MultiExitModel.load(d / "model")
        if dev_ds is None:
            _, dev_ds, tok, _ = self.data()
        model.eval()
        sig = get_signal(signal)
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
                e, p, _ = model.early_exit(inputs["input_ids"], inputs["attention_mask"], sig, thr,
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
        from eebench.operating import mlflow_summary  # oracle_* and heldout_* labelled as in MLflow

        summ = ", ".join(f"{k} {v:.3f}" for k, v in mlflow_summary(sw.summary).items() if not k.endswith("_std"))
        mism = sum(c["prediction_mismatches"] + c["exit_mismatches"] for c in sw.confirm)
        print(f"    {s:9s} {summ}" + (f"; early-exit check: {mism} mismatches" if sw.confirm else ""), flush=True)


def run_config_from(args: dict[str, Any], config_file: str | None, overrides: list[str]) -> RunConfig:
    """Merge defaults < config file < command-line flags < ``key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    per_task: dict[str, dict[str, Any]] = {}
    if config_file:
        loaded = load_config_file(config_file)
        per_task = loaded.pop("per_task", None) or {}
        loaded.pop("description", None)
        data.update(loaded)
    given: dict[str, Any] = {k: v for k, v in args.items() if v is not None}
    for ov in overrides:
        if "=" not in ov:
            raise EebenchError(f"override {ov!r} is not key=value (e.g. epochs=2 or cosee.alpha=0.01)")
        k, v = ov.split("=", 1)
        val = yaml.safe_load(v) if v else None
        if "." in k:  # method hyper-parameter: cosee.alpha=0.01
            m, hp = k.split(".", 1)
            given.setdefault("method_params", {}).setdefault(m, {})[hp] = val
        else:
            given[k] = val
    # A recipe's per-task values (e.g. the lr that makes RTE learn) sit between the recipe's
    # own values and what the user gave explicitly.
    task = given.get("task", data.get("task", RunConfig.model_fields["task"].default))
    if isinstance(task, str) and task in per_task:
        extra = dict(per_task[task])
        mp = extra.pop("method_params", None)
        data.update(extra)
        if mp:
            for m, hp in mp.items():
                data.setdefault("method_params", {}).setdefault(m, {}).update(hp)
    for k, v in given.items():
        if k == "method_params":
            for m, hp in v.items():
                data.setdefault("method_params", {}).setdefault(m, {}).update(hp)
        else:
            data[k] = v
    from pydantic import ValidationError

    try:
        return RunConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        known = ", ".join(RunConfig.model_fields)
        hint = f"; known keys: {known}" if err["type"] == "extra_forbidden" else ""
        raise EebenchError(f"bad config value for {loc!r}: {err['msg']}{hint}") from None


def list_recipes() -> dict[str, str]:
    """Packaged recipes (``recipes/*.yaml``): name -> one-line description."""
    from importlib import resources

    import yaml

    out = {}
    for f in sorted(resources.files("eebench.recipes").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            out[f.name[: -len(".yaml")]] = str((yaml.safe_load(f.read_text()) or {}).get("description", ""))
    return out


def load_config_file(name_or_path: str) -> dict[str, Any]:
    """A run config: a YAML file's path, or the name of a packaged recipe (``paper``, ``cpu``)."""
    from importlib import resources

    import yaml

    p = Path(name_or_path)
    if p.exists():
        text, where = p.read_text(), str(p)
    elif name_or_path in list_recipes():
        text, where = (resources.files("eebench.recipes") / f"{name_or_path}.yaml").read_text(), f"recipe {name_or_path}"
    else:
        raise EebenchError(f"config {name_or_path!r} is neither a file nor a recipe; recipes: "
                           f"{', '.join(list_recipes())}")
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise EebenchError(f"config {where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise EebenchError(f"config {where} must be a mapping of key: value")
    pt = loaded.get("per_task")
    if pt is not None and not (isinstance(pt, dict) and all(isinstance(v, dict) for v in pt.values())):
        raise EebenchError(f"config {where}: per_task must map task names to mappings of key: value")
    return loaded


def sweep_saved(results_dir: str | Path, signals: list[str], num_thresholds: int = 100, tracking_uri: str | None = None,
                no_mlflow: bool = False) -> list[CellResult]:
    """``eebench sweep``: sweep saved cells with other signals, no retraining (from cached logits)."""
    from eebench.data import get_task

    paths = [Path(results_dir)] if (Path(results_dir) / "result.json").exists() else sorted(
        p.parent for p in Path(results_dir).rglob("result.json"))
    if not paths:
        raise EebenchError(f"no eebench results (result.json) under {results_dir}")
    out = []
    for d in paths:
        result = CellResult.from_disk(d / "result.json")
        task = result.data.get("task_source", result.task)  # a custom task is known by its YAML path
        spec = get_task(task)
        for s in signals:
            get_signal(s).check_task(spec.num_labels)
        root = d.parent.parent
        cfg = RunConfig(task=task, model=result.config["model"], output=str(root), tracking_uri=tracking_uri,
                        no_mlflow=no_mlflow, num_thresholds=num_thresholds, confirm_thresholds=0, methods=[result.method],
                        signals=signals)
        runner = Runner(cfg)
        runner.sweep_cell(d, result, signals)
        result.mlflow_run_id = runner.tracker.log_cell(result, None, d) or result.mlflow_run_id
        result.to_disk(d / "result.json")
        _print_cell(result)
        out.append(result)
    return out


__all__ = ["RunConfig", "Runner", "run_config_from", "sweep_saved", "cell_hash", "asdict"]
