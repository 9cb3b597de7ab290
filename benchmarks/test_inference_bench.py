"""Issue 6: the early-exit engine on MiniLM-L6 (CPU, one thread) over the first SST-2 dev sentences.

The exit heads are untrained (random), so the threshold is picked from the one-pass logits for a
layer speed-up of about 2x; wall-clock cost depends only on how many layers each input runs.
Each benchmark also checks that the engine reproduces the one-pass simulation. The side-by-side
figures (wall speed-up against layer speed-up, signal overhead) come from ``bench`` and land in
``extra_info``; ``benchmarks/run_inference_bench.py`` prints them for the whole dev set.
"""

import pytest
import torch

from benchmarks.conftest import needs_glue, sst2_rows
from eebench.exits.rule import simulate_exits
from eebench.inference import EarlyExitEngine, bench, one_pass_logits, pick_threshold, prepare_examples

N_SENTENCES = 48
BATCH = 16
SIGNAL = "energy"


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def setup(minilm):
    model, tok = minilm
    examples = prepare_examples([dict(tok(s, truncation=True, max_length=128)) for s, _ in sst2_rows("dev", N_SENTENCES)])
    logits = one_pass_logits(model, examples, BATCH)
    choice = pick_threshold(logits, SIGNAL, 2.0)
    sim = simulate_exits(logits, SIGNAL, [choice.threshold])[0]
    return model, EarlyExitEngine(model, SIGNAL, choice.threshold), examples, sim, choice


RUNS = {
    "single": lambda eng, x: eng.run(x, "single"),
    "batched": lambda eng, x: eng.run(x, "batched", BATCH, sort_by_length=True),
    "streaming": lambda eng, x: eng.run(x, "streaming", BATCH, sort_by_length=True),
    "full-single": lambda eng, x: eng.run_full(x, 1),
    "full-batched": lambda eng, x: eng.run_full(x, BATCH, sort_by_length=True),
}


@needs_glue
@pytest.mark.parametrize("mode", list(RUNS))
def test_engine(benchmark, setup, mode):
    _, engine, examples, sim, choice = setup
    benchmark.group = f"inference minilm-l6 sst2[:{N_SENTENCES}]"
    out = benchmark.pedantic(RUNS[mode], args=(engine, examples), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(threshold=choice.threshold, layer_speedup=choice.layer_speedup,
                                inputs=len(examples), batch_size=BATCH)
    if not mode.startswith("full"):
        assert out.exit_layers.tolist() == sim.tolist()


@needs_glue
def test_side_by_side(benchmark, setup):
    model, _, examples, _, choice = setup
    benchmark.group = "inference side by side"
    result = benchmark.pedantic(
        bench, args=(model, examples, SIGNAL),
        kwargs=dict(thresholds=choice.threshold, batch_size=BATCH, repeats=2, warmup=1, threads=1, overhead_inputs=16),
        rounds=1, iterations=1,
    )
    run = result["runs"][0]
    benchmark.extra_info.update(
        layer_speedup=run["layer_speedup"],
        wall_speedup={k: v["median"] for k, v in run["wall_speedup"].items()},
        wall_over_layer=run["wall_over_layer"],
        signal_overhead=result["signal_overhead"]["fraction"]["median"],
    )
    assert all(v == {"exit_layers": 1.0, "predictions": 1.0} for v in run["matches_simulation"].values())
