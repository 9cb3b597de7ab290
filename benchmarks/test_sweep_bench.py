"""Issue 2: sweeping 100 thresholds x 4 signals over cached MiniLM-L6 dev logits of SST-2 must cost
under 5% of one dev-set forward pass of the model. Both are timed in the same run; the ratio is
what counts (absolute times vary with the machine's load)."""

import time

import pytest
import torch

from benchmarks.conftest import ASSERT_LIMITS, needs_glue, sst2_rows
from eebench.exits.rule import sweep

SIGNALS = ("energy", "entropy", "softmax", "patience")


@pytest.fixture(scope="module")
def dev_forward(minilm):
    """Cached [N, M, C] logits of the SST-2 dev set and the time of the forward pass that made them."""
    model, tok = minilm
    rows = sst2_rows("dev")
    enc = [tok(s, truncation=True, max_length=128) for s, _ in rows]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
    torch.set_num_threads(torch.get_num_threads())

    def forward():
        out = torch.zeros(len(enc), model.num_layers, 2)
        with torch.inference_mode():
            for i in range(0, len(order), 64):
                idx = order[i : i + 64]
                batch = tok.pad([enc[j] for j in idx], return_tensors="pt")
                out[idx] = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).logits
        return out

    forward()  # warm-up
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        logits = forward()
        times.append(time.perf_counter() - t0)
    return logits, torch.tensor([y for _, y in rows]), min(times)


@needs_glue
def test_sweep_100_thresholds_x_4_signals(benchmark, dev_forward):
    logits, labels, forward_s = dev_forward

    def sweep_all():
        return [sweep(logits, labels, s, num_thresholds=100) for s in SIGNALS]

    sweeps = benchmark.pedantic(sweep_all, rounds=20, warmup_rounds=2)
    assert all(len(sw.thresholds) >= 5 for sw in sweeps)
    ratio = benchmark.stats.stats.median / forward_s
    benchmark.extra_info.update({"dev_forward_s": forward_s, "sweep_over_forward": ratio, "n": len(labels)})
    print(f"\nsweep of 100 thresholds x 4 signals: median {benchmark.stats.stats.median * 1e3:.1f} ms; "
          f"one SST-2 dev forward pass (872 inputs): {forward_s:.2f} s; ratio {100 * ratio:.2f}%")
    if ASSERT_LIMITS:  # a noisy shared machine must not fail CI; the ratio is reported either way
        assert ratio < 0.05
