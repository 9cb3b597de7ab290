"""``eebench bench``: wall-clock latency / throughput of true early exit for a trained cell.

Loads the cell's model and dev split, calls ``eebench.inference.bench`` and stores the figures in
the cell's result JSON (``bench``) and its MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from eebench.errors import EebenchError
from eebench.runs.results import CellResult


def bench_cell(cell: str | Path, signal: str = "energy", thresholds: list[float] | None = None,
               target_speedup: float | None = None, batch_size: int = 32, repeats: int = 3,
               threads: int | None = None, samples: int | None = None, tracking_uri: str | None = None,
               no_mlflow: bool = False, precision: str = "fp32", attn_implementation: str = "auto",
               held: tuple | None = None, split_gain: float | None = None) -> dict:
    """Bench one cell. ``held`` = (SplitSpec, Target): the threshold is chosen on a calibration
    part of the cell's cached dev logits (``eebench.exits.operating``) and only the evaluation part is
    benched, so the layer and wall-clock speed-ups are measured on inputs that did not choose it.
    Without it (or with explicit ``thresholds``) every dev input is used (``target_speedup`` is
    then picked on the benched inputs themselves: an oracle choice). ``precision`` /
    ``attn_implementation`` choose how inference runs (the trained weights do not depend on either).
    ``split_gain``: streaming's padding-aware split (None: the engine's default, 0: full batches only)."""
    from eebench.data import get_task, load_task, subset, tokenize
    from eebench.inference import bench, format_bench
    from eebench.model.accel import check_attn_implementation, resolve_precision
    from eebench.model.backbone import MultiExitModel, resolve_model
    from eebench.runs.runner import cell_policy
    from eebench.runs.tracking import Tracker, default_tracking_uri

    d = Path(cell)
    if not (d / "result.json").exists() or not (d / "model").exists():
        raise EebenchError(f"{d} is not a finished eebench cell (needs result.json and model/); "
                           "pass a folder such as runs/sst2/cosee-s42-<hash>")
    check_attn_implementation(attn_implementation)
    resolve_precision(precision, "cpu", "inference")  # bench runs on the CPU: fp16 is refused up front
    result = CellResult.from_disk(d / "result.json")
    spec = get_task(result.data.get("task_source", result.task))
    cell_policy(result, signal).check_task(spec.num_labels)  # a policy the cell's method lacks: one line
    from transformers import AutoTokenizer

    path, _ = resolve_model(result.config["model"])
    tok = AutoTokenizer.from_pretrained(path)
    dev = load_task(result.data.get("task_source", result.task), spec.eval_split)
    n = result.data.get("dev_rows")
    dev = subset(dev, n if n and n < len(dev) else None, seed=0)
    operating = None
    if held is not None and thresholds is None:
        from safetensors.torch import load_file

        from eebench.exits.operating import pick_threshold_held_out

        cache = d / "dev_logits.safetensors"
        if not cache.exists():
            raise EebenchError(f"{d} has no cached dev logits ({cache.name}) to choose a held-out threshold from; "
                               "pass --thresholds or --oracle")
        cached = load_file(cache)
        if len(cached["labels"]) != len(dev):
            raise EebenchError(f"{cache} holds {len(cached['labels'])} dev rows but the dev split has {len(dev)}; "
                               "pass --thresholds or --oracle")
        split, target = held
        pol = cell_policy(result, signal)
        thr, cal, ev, choice = pick_threshold_held_out(cached["logits"], cached["labels"], pol, target, split,
                                                       result.config.get("main_metric", "accuracy"),
                                                       scores=cached.get(f"score.{signal}"))
        thresholds = [thr]
        dev = dev.select(sorted(int(i) for i in ev))
        operating = {"target": target.describe(), "split": split.describe(), "threshold": thr,
                     "calibration_rows": len(cal), "evaluation_rows": len(ev),
                     **{k: choice[k] for k in ("cal_speedup", "cal_metric", "cal_risk")}}
        if choice.get("fixed"):
            operating["fixed_point"] = True
            operating["met_target"] = choice.get("met_target")
            print(f"exit policy {signal} has a fixed operating point (threshold {thr:.6g}), nothing is chosen: "
                  f"calibration speed-up {choice['cal_speedup']:.3f}x"
                  + ("" if choice.get("met_target") in (None, True) else f", below the target ({target.describe()})")
                  + f"; benching the {len(ev)} evaluation inputs")
        else:
            print(f"threshold {thr:.6g} chosen on {len(cal)} calibration inputs ({target.describe()}; "
                  f"calibration speed-up {choice['cal_speedup']:.3f}x); benching the {len(ev)} evaluation inputs")
    if samples:
        dev = dev.select(range(min(samples, len(dev))))
    tokenized = tokenize(dev, tok, spec, int(result.config.get("max_seq_length", 128)))
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in tokenized.column_names]
    examples = [{c: row[c] for c in cols} for row in tokenized]
    model = MultiExitModel.load(d / "model", attn_implementation=attn_implementation).eval()
    out = bench(model, examples, signal, thresholds=thresholds,
                target_speedup=target_speedup if thresholds is None else None,
                batch_size=batch_size, repeats=repeats, threads=threads, precision=precision,
                **({} if split_gain is None else {"split_gain": split_gain}))
    out["signal"] = signal
    from eebench.exits.policies import fixed_threshold

    if fixed_threshold(cell_policy(result, signal)) is not None:
        out["fixed_operating_point"] = True  # one operating point: --target-speedup does not move it
    if operating is not None:
        out["operating_point"] = operating
        for r in out["runs"]:
            r["target_speedup"] = target_speedup
    print(format_bench(out))
    result.bench.append(out)
    root = d.parent.parent
    tracker = Tracker(tracking_uri or default_tracking_uri(root), root, enabled=not no_mlflow)
    tracker.log_bench(result.mlflow_run_id, out)
    result.to_disk(d / "result.json")
    return out
