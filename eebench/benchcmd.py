"""``eebench bench``: wall-clock latency / throughput of true early exit for a trained cell.

Loads the cell's model and dev split, calls ``eebench.inference.bench`` and stores the figures in
the cell's result JSON (``bench``) and its MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from eebench.errors import EebenchError
from eebench.results import CellResult


def bench_cell(cell: str | Path, signal: str = "energy", thresholds: list[float] | None = None,
               target_speedup: float | None = None, batch_size: int = 32, repeats: int = 3,
               threads: int | None = None, samples: int | None = None, tracking_uri: str | None = None,
               no_mlflow: bool = False, precision: str = "fp32", attn_implementation: str = "auto") -> dict:
    """Bench a finished cell; ``precision`` / ``attn_implementation`` choose how inference runs
    (the trained weights do not depend on either)."""
    from eebench.accel import check_attn_implementation, resolve_precision
    from eebench.data import get_task, load_task, subset, tokenize
    from eebench.inference import bench, format_bench
    from eebench.models import MultiExitModel, resolve_model
    from eebench.signals import get_signal
    from eebench.tracking import Tracker, default_tracking_uri

    d = Path(cell)
    if not (d / "result.json").exists() or not (d / "model").exists():
        raise EebenchError(f"{d} is not a finished eebench cell (needs result.json and model/); "
                           "pass a folder such as runs/sst2/cosee-s42-<hash>")
    check_attn_implementation(attn_implementation)
    resolve_precision(precision, "cpu", "inference")  # bench runs on the CPU: fp16 is refused up front
    result = CellResult.from_disk(d / "result.json")
    spec = get_task(result.data.get("task_source", result.task))
    get_signal(signal).check_task(spec.num_labels)
    from transformers import AutoTokenizer

    path, _ = resolve_model(result.config["model"])
    tok = AutoTokenizer.from_pretrained(path)
    dev = load_task(result.data.get("task_source", result.task), spec.eval_split)
    n = result.data.get("dev_rows")
    dev = subset(dev, n if n and n < len(dev) else None, seed=0)
    if samples:
        dev = dev.select(range(min(samples, len(dev))))
    tokenized = tokenize(dev, tok, spec, int(result.config.get("max_seq_length", 128)))
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in tokenized.column_names]
    examples = [{c: row[c] for c in cols} for row in tokenized]
    model = MultiExitModel.load(d / "model", attn_implementation=attn_implementation).eval()
    out = bench(model, examples, signal, thresholds=thresholds,
                target_speedup=target_speedup if thresholds is None else None,
                batch_size=batch_size, repeats=repeats, threads=threads, precision=precision)
    out["signal"] = signal
    print(format_bench(out))
    result.bench.append(out)
    root = d.parent.parent
    tracker = Tracker(tracking_uri or default_tracking_uri(root), root, enabled=not no_mlflow)
    tracker.log_bench(result.mlflow_run_id, out)
    result.to_disk(d / "result.json")
    return out
