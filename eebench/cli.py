"""The ``eebench`` command line: run, sweep, log, bench, report, tune, list.

Expected mistakes (unknown names, bad files, bad values) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from eebench.errors import EebenchError

# Offline-friendly defaults: never phone home from a benchmark.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_split_arguments(p: argparse.ArgumentParser, run: bool = False) -> None:
    """How held-out operating points split the dev set (eebench.exits.operating)."""
    d = (lambda v: None) if run else (lambda v: v)  # run: None = the RunConfig default
    g = p.add_argument_group("held-out operating points (threshold chosen on a calibration part of dev, "
                             "scored on the rest)")
    g.add_argument("--cal-fraction", type=float, default=d(0.5), help="calibration share of each split (default 0.5)")
    g.add_argument("--folds", type=int, default=None, help="cross-fit over K stratified folds instead of one split")
    g.add_argument("--split-repeats", type=int, default=d(20), help="random splits to average over (default 20)")
    g.add_argument("--split-seed", type=int, default=d(0), help="seed of the first split (default 0)")
    g.add_argument("--epsilon", type=float, default=None,
                   help="guarantee: at most this share of predictions may change vs the final layer ...")
    g.add_argument("--delta", type=float, default=d(0.05), help="... with confidence 1 - delta (default 0.05)")
    if not run:
        g.add_argument("--risk", default="disagreement", choices=["disagreement", "accuracy-loss"],
                       help="what epsilon bounds: disagreement with the final layer (default) or final-right-exit-wrong")
        g.add_argument("--bound", default="clopper-pearson", choices=["clopper-pearson", "hoeffding"])
        g.add_argument("--correction", default="fixed-sequence", choices=["fixed-sequence", "bonferroni"],
                       help="multiple testing over the threshold grid (default fixed-sequence)")


def _split_and_target(args, speedup: float | None):
    from eebench.exits.operating import SplitSpec, Target

    split = SplitSpec(args.cal_fraction, args.folds, args.split_repeats, args.split_seed)
    split.check()
    if args.epsilon is not None:
        if getattr(args, "target_drop", None) is not None:
            raise EebenchError("give either --epsilon/--delta or --target-drop, not both")
        target = Target(epsilon=args.epsilon, delta=args.delta, risk=args.risk, bound=args.bound,
                        correction=args.correction)
    elif getattr(args, "target_drop", None) is not None:
        target = Target(drop=args.target_drop, delta=args.delta)
    else:
        target = Target(speedup=speedup, delta=args.delta)
    target.check()
    return split, target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eebench", description="Benchmark early-exit methods for transformer classifiers.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train methods x seeds, sweep every signal, log to results/ and MLflow")
    r.add_argument("--config", help="a recipe name (`eebench list`: paper, cpu) or a YAML file of run settings "
                   "(keys as the flags, with underscores)")
    r.add_argument("--task", help="GLUE task name or path to a task YAML (default sst2)")
    r.add_argument("--methods", help="comma-separated training methods (eebench list)")
    r.add_argument("--signals", help="comma-separated exit signals to sweep")
    r.add_argument("--model", help="backbone alias, hub id or local path (default minilm-l6)")
    r.add_argument("--seeds", help="comma-separated seeds (default 42)")
    r.add_argument("--train-samples", type=int, help="seeded training subset of N rows (CPU budgets)")
    r.add_argument("--train-subset", choices=["random", "first"], help="which N training rows: seeded random (default) or the first N")
    r.add_argument("--eval-samples", type=int, help="seeded dev subset of N rows (default: the full dev set)")
    r.add_argument("--max-seq-length", type=int)
    r.add_argument("--epochs", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--head-lr", type=float, help="learning rate of the exit heads (default: --lr)")
    r.add_argument("--batch-size", type=int, help="effective batch size (default 32)")
    r.add_argument("--micro-batch-size", type=int, help="split each batch for gradient accumulation")
    r.add_argument("--pooling", help="exit head kind: cls, mean, pooler, exit-pooler or a registered one "
                   "(default: the backbone's recommendation)")
    r.add_argument("--final-pooling", help="head kind of the final classifier (default: --pooling)")
    r.add_argument("--num-layers", type=int, help="keep only the first K layers (budget exiting)")
    r.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")
    r.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default); bf16: autocast on CUDA or on a CPU with native bf16 (avx512_bf16 / AMX), "
                        "else fp32 with a warning; fp16: CUDA only")
    r.add_argument("--attn-implementation", choices=["auto", "eager", "sdpa"],
                   help="attention kernel (default auto: eager on the CPU, sdpa on CUDA)")
    r.add_argument("--data-dir", help="GLUE folder in the original layout (default: $GLUE_DIR, else the hub)")
    r.add_argument("--output", help="results folder (default runs/)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file in the output folder)")
    r.add_argument("--no-mlflow", action="store_true", default=None, help="do not log to MLflow")
    r.add_argument("--num-thresholds", type=int, help="thresholds per signal sweep (default 100)")
    r.add_argument("--keep-checkpoint", action="store_true", default=None,
                   help="keep the optimiser checkpoint of finished cells (default: dropped; model/ and logits stay)")
    r.add_argument("--dry-run", action="store_true",
                   help="list every cell of the run and what it would do (done, resume from step k, new), then stop: "
                        "trains nothing and leaves every file as it was")
    r.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where cells run: local (default) or ray (one Ray task per cell; pip install 'eebench[ray]')")
    from eebench.scale.executor import add_ray_arguments
    from eebench.scale.tune import add_tune_arguments

    add_ray_arguments(r)
    add_split_arguments(r, run=True)
    _include(r)
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=2 cosee.alpha=0.01")

    s = sub.add_parser("sweep", help="sweep saved runs with other signals (no retraining)")
    s.add_argument("results", help="a results folder, a task folder or one cell folder")
    s.add_argument("--signals", required=True)
    s.add_argument("--num-thresholds", type=int, default=100)
    s.add_argument("--tracking-uri")
    s.add_argument("--no-mlflow", action="store_true")
    _include(s)

    rep = sub.add_parser("report", help="paper-style tables and Pareto plots from results or MLflow")
    rep.add_argument("--results", default="runs", help="results folder (default runs/)")
    rep.add_argument("--tracking-uri", help="read results from this MLflow store instead")
    rep.add_argument("--task")
    rep.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"])
    rep.add_argument("--speedup", type=float, default=2.0, help="matched speed-up of the main table (default 2)")
    rep.add_argument("--signal", default="energy",
                     help="exit signal of the ablation table, Table 2 and the analysis figures (default energy)")
    rep.add_argument("--out", help="also write tables, plots and the analysis figures (PNG + CSV) into this folder")
    rep.add_argument("--log-mlflow", metavar="URI",
                     help="log the files written under --out to a 'report' run in this MLflow store")
    rep.add_argument("--reference",
                     help="configuration label every other one is compared with, paired by seed, in "
                          "versus_<label>.md (default: cosee, when there is such a row; labels as in the tables' rows); "
                          "LABEL/SIGNAL compares with that configuration's SIGNAL front instead of --signal's "
                          "(versus_<label>_<signal>.md), e.g. cosee-entropy/entropy")
    rep.add_argument("--operating", default="heldout", choices=["heldout", "oracle", "both"],
                     help="operating points: held out (default), oracle (chosen on the scored dev set) or both")
    rep.add_argument("--target-drop", type=float,
                     help="main table at the fastest threshold within this drop (0.01 = 1 point) of the final layer")
    add_split_arguments(rep)

    lg = sub.add_parser("log", help="log finished results to an MLflow store (a parent per task, a child per cell)")
    lg.add_argument("results", help="a results folder, a task folder or one cell folder")
    lg.add_argument("--tracking-uri", required=True, help="e.g. http://127.0.0.1:5000 or sqlite:///runs/mlflow.db")
    lg.add_argument("--task", help="only this task")

    b = sub.add_parser("bench", help="wall-clock latency / throughput of true early exit for a trained cell")
    b.add_argument("cell", help="a cell folder (containing result.json and model/)")
    b.add_argument("--signal", default="energy")
    b.add_argument("--thresholds", help="comma-separated thresholds")
    b.add_argument("--target-speedup", type=float,
                   help="pick the threshold for this speed-up on a calibration part of dev and bench the evaluation part")
    b.add_argument("--target-drop", type=float, help="pick the fastest threshold within this drop of the final layer")
    b.add_argument("--oracle", action="store_true",
                   help="pick --target-speedup on all dev inputs, which are then benched (the old behaviour)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--samples", type=int, help="use the first N dev inputs")
    b.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="inference precision (bf16: CUDA or a CPU with native bf16, else fp32 with a warning)")
    b.add_argument("--attn-implementation", default="auto", choices=["auto", "eager", "sdpa"],
                   help="attention kernel (default auto: eager on the CPU, sdpa on CUDA)")
    b.add_argument("--split-gain", type=float, default=None,
                   help="streaming: run a batch as two length groups when that saves more than this share of its "
                        "padded tokens (default 0.05; 0: full batches only)")
    b.add_argument("--tracking-uri")
    b.add_argument("--no-mlflow", action="store_true")
    add_split_arguments(b)
    _include(b)

    add_tune_arguments(sub.add_parser("tune", help="hyper-parameter search on Ray Tune; every trial is one eebench cell"))

    _include(sub.add_parser("list", help="registered methods, exit policies, heads, tasks and models (with origins)"))
    return p


def _include(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--include", action="append", metavar="DIR",
                        help="import every .py file in DIR first (your own methods, signals, policies); repeatable")


def _load_includes(args) -> None:
    from eebench.plugins import load_include

    load_include(getattr(args, "include", None) or [])


def cmd_list(args=None) -> None:
    from eebench.data import list_tasks
    from eebench.exits.policies import POLICIES, get_policy
    from eebench.exits.signals import SIGNALS
    from eebench.model.backbone import HEADS, MODEL_ALIASES
    from eebench.strategy import METHODS, list_methods

    if args is not None:
        _load_includes(args)
    methods = list_methods()

    def origin(reg, name: str) -> str:
        o = reg.origin(name)
        return "" if o == "builtin" else f"  (from {o})"

    print("methods (training strategies):")
    for m in methods:
        d = ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "no hyper-parameters"
        own = sorted(m.cls(name=m.name, **m.defaults).policies())
        pol = f"; exit policies: {', '.join(own)}" if own else ""
        print(f"  {m.name:20s} {m.description}  [{d}{pol}]{origin(METHODS, m.name)}")
    print("exit policies (--signals; signals and registered policies work on every cell, a method's own on its cells):")
    for n in SIGNALS.names():
        print(f"  {n:20s} {get_policy(n).rule()}{origin(SIGNALS, n)}")
    for n in POLICIES.names():
        print(f"  {n:20s} {get_policy(n).rule()}{origin(POLICIES, n)}")
    for m in methods:
        for n, cls in m.cls(name=m.name, **m.defaults).policies().items():
            print(f"  {n:20s} {cls().rule()}  (method {m.name})")
    print("exit heads (--pooling):")
    for n in HEADS.names():
        print(f"  {n:20s} {HEADS.get(n).description}{origin(HEADS, n)}")
    print("tasks:")
    print("  " + ", ".join(list_tasks()) + "  (or a path to your own task YAML)")
    from eebench.runs.recipes import list_recipes

    print("recipes (eebench run --config NAME; flags and key=value overrides win):")
    for name, desc in list_recipes().items():
        print(f"  {name:14s} {desc}")
    print("models (aliases; any hub id or local path also works):")
    for k, a in MODEL_ALIASES.items():
        print(f"  {k:14s} default pooling {a.pooling}: {a.note}")


def cmd_run(args) -> None:
    from eebench.runs.recipes import run_config_from
    from eebench.runs.runner import Runner

    _load_includes(args)  # before the config is checked: it may name plugin methods
    keys = ["include", "task", "methods", "signals", "model", "seeds", "train_samples", "train_subset", "eval_samples", "max_seq_length", "epochs",
            "lr", "head_lr", "batch_size", "micro_batch_size", "pooling", "final_pooling", "num_layers", "device",
            "precision", "attn_implementation", "data_dir", "output", "tracking_uri", "no_mlflow", "num_thresholds",
            "keep_checkpoint", "cal_fraction", "folds", "split_repeats", "split_seed", "epsilon", "delta"]
    cfg = run_config_from({k: getattr(args, k) for k in keys}, args.config, args.overrides)
    if args.dry_run:
        _print_plan(Runner(cfg.model_copy(update={"no_mlflow": True})))
    elif args.executor == "ray":
        from eebench.scale.executor import cmd_run_ray

        cmd_run_ray(cfg, args)
    else:
        from eebench.scale.executor import check_no_ray_flags

        check_no_ray_flags(args)
        Runner(cfg).run()


def _print_plan(runner) -> None:
    """``eebench run --dry-run``: the cells of the run, what ``run`` would do with each, and counts."""
    from collections import Counter

    from tabulate import tabulate

    rows = runner.plan()
    print(f"{runner.spec.name}: {len(rows)} cell(s) in {runner.out}")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    n = Counter(r["state"] for r in rows)
    print(", ".join(f"{n[k]} {k}" for k in ("done", "resume", "new", "conflict") if n[k]) + "; nothing was trained or changed")


def cmd_tune(args) -> None:
    from eebench.scale.tune import cmd_tune as tune

    tune(args)


def cmd_report(args) -> None:
    from eebench.reports.report import load_results, logits_index, report

    split, target = _split_and_target(args, args.speedup)
    rs = load_results(args.results, args.tracking_uri, args.task)
    if args.log_mlflow and not args.out:
        raise EebenchError("--log-mlflow needs --out DIR (the report files are written there, then logged)")
    logits = {} if args.tracking_uri else logits_index(args.results)
    print(report(rs, args.out, args.format, args.speedup, args.signal, args.operating, target, split, logits,
                 log_to=args.log_mlflow, reference=args.reference))


def cmd_sweep(args) -> None:
    from eebench.exits.policies import check_policy_names
    from eebench.runs.runner import sweep_saved

    _load_includes(args)
    signals = _csv(args.signals)
    check_policy_names(signals)
    sweep_saved(args.results, signals, args.num_thresholds, args.tracking_uri, args.no_mlflow)


def cmd_log(args) -> None:
    from pathlib import Path

    from eebench.errors import EebenchError
    from eebench.runs.results import find_results
    from eebench.runs.tracking import Tracker, log_results

    root = Path(args.results)
    if not root.exists():
        raise EebenchError(f"results folder {root} does not exist")
    results = [r for r in find_results(root) if args.task is None or r.task == args.task]
    if not results:
        raise EebenchError(f"no eebench results (result.json) under {root}" + (f" for task {args.task}" if args.task else ""))
    tracker = Tracker(args.tracking_uri, root)
    if not tracker.enabled:
        raise EebenchError(f"MLflow tracking server {args.tracking_uri} is unreachable; start it or pass another --tracking-uri")
    lines = log_results(tracker, results, [root] * len(results), "log", {"results": str(root.resolve())})
    if not tracker.enabled:
        raise EebenchError(f"logging to {args.tracking_uri} failed; nothing else was changed")
    print(f"logged {len(results)} cell(s) to {args.tracking_uri}")
    for line in lines:
        print(line)


def cmd_bench(args) -> None:
    from eebench.benchcmd import bench_cell

    _load_includes(args)
    for flag, v in (("--batch-size", args.batch_size), ("--repeats", args.repeats), ("--threads", args.threads),
                    ("--samples", args.samples)):
        if v is not None and v < 1:
            raise EebenchError(f"{flag} {v} is not allowed; give an integer >= 1")
    if args.split_gain is not None and not 0 <= args.split_gain < 1:
        raise EebenchError(f"--split-gain {args.split_gain} is not allowed; give a share in [0, 1) (0: never split)")
    if args.target_speedup is not None and not args.target_speedup >= 1:
        raise EebenchError(f"--target-speedup {args.target_speedup} is not allowed; give a layer speed-up >= 1")
    try:
        thresholds = [float(x) for x in _csv(args.thresholds)] if args.thresholds else None
    except ValueError:
        raise EebenchError(f"--thresholds {args.thresholds!r} is not a comma-separated list of numbers") from None
    held = None
    if thresholds is None and not args.oracle:
        held = _split_and_target(args, args.target_speedup if args.target_speedup is not None else 2.0)
    bench_cell(args.cell, args.signal, thresholds, args.target_speedup, args.batch_size, args.repeats, args.threads,
               args.samples, args.tracking_uri, args.no_mlflow, precision=args.precision,
               attn_implementation=args.attn_implementation, held=held, split_gain=args.split_gain)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit, a session that ends), handled as Ctrl-C:
    the interrupted cell's and the command's MLflow runs are closed as KILLED instead of staying
    RUNNING for ever, and the exit status is the shell's 128 + 15."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    import signal

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # only the main thread may install handlers (main() called from a worker thread keeps the default)
    handles = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles else None
    try:
        {"list": lambda: cmd_list(args), "run": lambda: cmd_run(args), "report": lambda: cmd_report(args),
         "sweep": lambda: cmd_sweep(args), "log": lambda: cmd_log(args), "bench": lambda: cmd_bench(args), "tune": lambda: cmd_tune(args)}[args.command]()
    except EebenchError as e:
        print(f"eebench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"eebench: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; finished cells are kept "
              "and the next run resumes the rest", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if handles:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
