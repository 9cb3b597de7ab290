"""The early-exit engine reproduces the one-pass simulation in every mode, runs no layer a sample
does not need, keeps input order; the threshold picker and the bench function keep their promises.

Tiny random backbones; the exit heads get large weights so that signal values spread out and the
thresholds (picked midway between observed values) sit far from float noise.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from eebench.errors import EebenchError
from eebench.exits.metrics import speedup_ratio
from eebench.exits.rule import predictions_at_exit, simulate_exits
from eebench.inference import (
    MODES,
    EarlyExitEngine,
    bench,
    collate,
    format_bench,
    one_pass_logits,
    pick_threshold,
    prepare_examples,
)
from eebench.model.backbone import MultiExitConfig, MultiExitModel

SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, vocab_size=100)
BACKBONES = {
    "bert": dict(model_type="bert", max_position_embeddings=64, **SMALL),
    "albert": dict(model_type="albert", embedding_size=16, max_position_embeddings=64, **SMALL),
    "mpnet": dict(model_type="mpnet", max_position_embeddings=70, **SMALL),
}
# "-sdpa": the same backbone with SDPA attention (the CPU default is eager; simulation == true
# early exit must hold under either kernel).
BACKBONES["bert-sdpa"] = BACKBONES["bert"]
BACKBONES["albert-sdpa"] = BACKBONES["albert"]
POOLING = {"bert": "mean", "albert": "pooler", "mpnet": "cls", "bert-sdpa": "mean", "albert-sdpa": "pooler"}
SIGNALS = ("energy", "entropy", "softmax", "patience")


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_model(kind: str, num_labels: int = 3, seed: int = 0) -> MultiExitModel:
    torch.manual_seed(seed)
    cfg = MultiExitConfig(model="tiny", num_labels=num_labels, pooling=POOLING[kind], backbone_config=BACKBONES[kind],
                          attn_implementation="sdpa" if kind.endswith("-sdpa") else "eager")
    model = MultiExitModel.from_config(cfg).eval()
    assert model.backbone.config._attn_implementation == cfg.attn_implementation
    with torch.no_grad():
        for lin in model.heads.classifiers:
            lin.weight.normal_(0, 1.5)
            lin.bias.normal_(0, 0.5)
    return model


def make_examples(n: int = 16, seed: int = 1, token_types: bool = True) -> list[dict]:
    """Inputs of 2..30 tokens; some carry trailing padding in their own lists."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = int(torch.randint(2, 31, (1,), generator=g))
        ids = torch.randint(5, 100, (length,), generator=g).tolist()
        mask = [1] * length
        if k % 4 == 1:  # trailing padding inside the example itself
            ids, mask = ids + [0] * 3, mask + [0] * 3
        ex = {"input_ids": ids, "attention_mask": mask}
        if token_types:
            ex["token_type_ids"] = [0] * (length // 2) + [1] * (len(ids) - length // 2)
        out.append(ex)
    return out


@pytest.fixture(scope="module")
def setups():
    """kind -> (model, examples, one-pass logits [N, M, C])."""
    out = {}
    for kind in BACKBONES:
        model = make_model(kind)
        exs = make_examples(token_types=kind != "mpnet")
        out[kind] = (model, exs, one_pass_logits(model, exs, batch_size=5))
    return out


def per_sample_layers(calls: list[tuple[int, list[int]]], n: int) -> list[list[int]]:
    seen: dict[int, list[int]] = defaultdict(list)
    for layer, idx in calls:
        for k in idx:
            seen[k].append(layer)
    return [seen[k] for k in range(n)]


@pytest.mark.parametrize("kind", list(BACKBONES))
@pytest.mark.parametrize("signal", SIGNALS)
def test_every_mode_reproduces_the_simulation(setups, kind, signal):
    model, exs, logits = setups[kind]
    m, n = model.num_layers, len(exs)
    targets = (1.0, 1.7, 3.0) if signal != "patience" else (1.2, 2.5)
    seen_exits = set()
    for target in targets:
        choice = pick_threshold(logits, signal, target)
        assert choice.margin > 1e-5, "threshold too close to an observed signal value for a stable test"
        sim = simulate_exits(logits, signal, [choice.threshold])[0]
        preds = predictions_at_exit(logits, sim[None])[0]
        seen_exits.update(sim.tolist())
        engine = EarlyExitEngine(model, signal, choice.threshold)
        runs = [("single", 1, False), ("batched", 3, False), ("batched", 8, True),
                ("streaming", 3, False), ("streaming", 6, True)]
        for mode, b, srt in runs:
            calls: list[tuple[int, list[int]]] = []
            out = engine.run(exs, mode, b, on_layer=lambda layer, idx, calls=calls: calls.append((layer, list(idx))),
                             sort_by_length=srt)
            label = f"{kind} {signal} target {target} {mode} b={b} sorted={srt}"
            assert out.exit_layers.tolist() == sim.tolist(), label
            assert out.predictions.tolist() == preds.tolist(), label
            at_exit = logits[torch.arange(n), sim - 1]
            torch.testing.assert_close(out.logits, at_exit, atol=1e-4, rtol=1e-4, msg=label)
            # A sample runs exactly layers 1..its exit layer, each once, and never beyond.
            assert per_sample_layers(calls, n) == [list(range(1, int(e) + 1)) for e in sim], label
            assert sum(len(idx) for _, idx in calls) == int(sim.sum()), label
            assert all(len(idx) <= b for _, idx in calls), label
            assert out.speedup(m) == pytest.approx(speedup_ratio(sim, m))
    assert len(seen_exits) > 1, "thresholds never produced more than one exit layer"


def test_streaming_keeps_input_order_and_refills(setups):
    model, exs, logits = setups["bert"]
    choice = pick_threshold(logits, "entropy", 2.0)
    engine = EarlyExitEngine(model, "entropy", choice.threshold, split_gain=None)  # full batches only
    calls: list[tuple[int, list[int]]] = []
    out = engine.run(exs, "streaming", 4, on_layer=lambda layer, idx: calls.append((layer, list(idx))))
    sim = simulate_exits(logits, "entropy", [choice.threshold])[0]
    assert out.exit_layers.tolist() == sim.tolist()
    # Each input's exit logits are its own (order kept, no mix-up between samples).
    torch.testing.assert_close(out.logits, logits[torch.arange(len(exs)), sim - 1], atol=1e-4, rtol=1e-4)
    # Refilling: new inputs enter layer 1 while earlier ones are still deeper in the model.
    first_layer1_of = {}
    for step, (layer, idx) in enumerate(calls):
        for k in idx:
            if layer == 1:
                first_layer1_of[k] = step
    deeper_steps = [s for s, (layer, _) in enumerate(calls) if layer > 1]
    assert deeper_steps and min(deeper_steps) < max(first_layer1_of.values())
    # Every step but the final drains runs a full batch.
    sizes = [len(idx) for _, idx in calls]
    assert sizes.count(4) >= len(sizes) - model.num_layers - 1


@pytest.mark.parametrize("signal", ["energy", "entropy", "softmax", "raw-entropy"])
def test_scalar_form_is_within_its_bound_of_the_kernels(signal):
    """``Signal.scalar`` (float64 Python, the batch-size-1 fast path) is within its stated bound of
    ``score`` on one row and on the vectorised [N, M, C] kernels, at every scale of logits."""
    from eebench.exits.signals import get_signal

    sig = get_signal(signal)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for c in (2, 3, 7):
        for scale in (1e-3, 0.3, 3.0, 30.0, 300.0):
            z = torch.randn(64, 6, c, generator=g) * scale + torch.randn(64, 1, 1, generator=g) * scale
            vec = sig.score(z)
            for k in range(64):
                for m in range(6):
                    r = sig.scalar(z[k, m].tolist())
                    if r is None:
                        continue
                    value, bound = r
                    assert 0 <= bound < 1e-2 * max(abs(value), 1e-30) + 1e-4, (signal, c, scale)
                    for ref in (float(sig.score(z[k, m][None])[0]), float(vec[k, m])):
                        assert abs(value - ref) <= bound, (signal, c, scale, z[k, m].tolist(), value, ref, bound)
                    checked += 1
    assert checked > 3000
    assert sig.scalar([float("nan"), 0.0]) is None and sig.scalar([float("inf"), 0.0]) is None


@pytest.mark.parametrize("signal", ["energy", "entropy", "softmax"])
def test_batch_one_fast_path_decides_exactly_as_the_kernels(setups, signal):
    """Thresholds equal to observed batch-size-1 values (ties: the worst case for the fast path):
    the scalar form defers to the kernels there, and every exit equals the kernels-only engine's."""
    model, exs, _ = setups["bert"]
    ref_engine = EarlyExitEngine(model, signal, 0.5)
    ref_engine._scalar = None  # kernels only: the pre-fast-path engine
    # Every layer's batch-size-1 logits of a few inputs (run_full-like, one input at a time).
    items = prepare_examples(exs[:6])
    values = []
    with torch.inference_mode():
        for ex in items:
            hidden, state = model.stepper.embed(ex.input_ids[None], ex.attention_mask[None], ex.token_type_ids[None])
            for i in range(model.num_layers - 1):
                hidden = model.stepper.layer(i, hidden, state)
                values.append(float(ref_engine.signal.score(ref_engine._head_fns[i](hidden, None)[1])[0]))
    taken = [0, 0]
    for thr in sorted(set(values))[:: max(1, len(set(values)) // 6)]:
        fast, ref = EarlyExitEngine(model, signal, thr), EarlyExitEngine(model, signal, thr)
        ref._scalar = None
        a, b = fast.run(exs, "single"), ref.run(exs, "single")
        assert a.exit_layers.tolist() == b.exit_layers.tolist(), (signal, thr)
        assert torch.equal(a.logits, b.logits)
        taken = [x + y for x, y in zip(taken, fast.scalar_decisions, strict=True)]
    assert taken[0] > 0 and taken[1] > 0, taken  # both paths ran: fast away from ties, kernels at them


def test_length_groups_split_only_where_padding_drops():
    from eebench.inference.engine import length_groups

    def padded(groups, lengths):
        return sum(len(g) * max(lengths[k] for k in g) for g in groups)

    lengths = [40, 5, 41, 6, 5, 40, 7, 39]
    groups = length_groups(lengths, 0.05)
    # 8 x 41 = 328 padded tokens; cut after the four short rows: 4 x 7 + 4 x 41 = 192 (-41%); the
    # short half again: [5, 5] + [6, 7] = 24 vs 28 (-14%), [6] + [7] = 13 vs 14 (-7%); the long
    # half's best cut, [39, 40, 40] + [41] = 161 vs 164, saves only 1.8%: kept whole.
    assert groups == [[1, 4], [3], [6], [7, 0, 5, 2]]
    assert padded(groups, lengths) < 0.95 * 8 * 41
    assert [lengths[k] for g in groups for k in g] == sorted(lengths)  # shortest group first, each sorted
    assert length_groups(lengths, 0.05, min_size=2) == [[1, 4], [3, 6], [7, 0, 5, 2]]
    assert length_groups([10] * 6, 0.05) == [list(range(6))]  # nothing to gain
    assert length_groups(lengths, None) == [sorted(range(8), key=lambda k: lengths[k])]
    # A split must remove more than the gain: 20% here is not enough for gain 0.3.
    assert len(length_groups([8, 8, 10, 10], 0.3)) == 1 and len(length_groups([8, 8, 10, 10], 0.05)) == 2


def test_streaming_split_groups_match_the_simulation_and_stay_complete(setups):
    model, exs, logits = setups["bert"]
    choice = pick_threshold(logits, "energy", 2.0)
    sim = simulate_exits(logits, "energy", [choice.threshold])[0]
    calls: list[tuple[int, list[int]]] = []
    whole_calls: list[tuple[int, list[int]]] = []
    whole = EarlyExitEngine(model, "energy", choice.threshold, split_gain=None).run(
        exs, "streaming", 8, on_layer=lambda layer, idx: whole_calls.append((layer, list(idx))))
    split = EarlyExitEngine(model, "energy", choice.threshold, split_gain=0.05).run(
        exs, "streaming", 8, on_layer=lambda layer, idx: calls.append((layer, list(idx))))
    assert split.exit_layers.tolist() == whole.exit_layers.tolist() == sim.tolist()
    torch.testing.assert_close(split.logits, whole.logits, atol=1e-4, rtol=1e-4)
    assert per_sample_layers(calls, len(exs)) == [list(range(1, int(e) + 1)) for e in sim]
    assert len(calls) > len(whole_calls) and all(len(idx) <= 8 for _, idx in calls)  # it did split
    lengths = [len(e) for e in prepare_examples(exs)]
    tokens = [sum(len(idx) * max(lengths[k] for k in idx) for _, idx in c) for c in (calls, whole_calls)]
    assert tokens[0] < tokens[1]  # and padded less


def test_full_model_baseline(setups):
    model, exs, logits = setups["albert"]
    engine = EarlyExitEngine(model, "energy", 0.5)
    for b, srt in ((1, False), (4, False), (4, True)):
        calls: list[tuple[int, list[int]]] = []
        out = engine.run_full(exs, b, on_layer=lambda layer, idx, calls=calls: calls.append((layer, list(idx))),
                              sort_by_length=srt)
        assert out.exit_layers.tolist() == [model.num_layers] * len(exs)
        assert out.predictions.tolist() == logits[:, -1].argmax(-1).tolist()
        torch.testing.assert_close(out.logits, logits[:, -1], atol=1e-4, rtol=1e-4)
        assert per_sample_layers(calls, len(exs)) == [list(range(1, model.num_layers + 1))] * len(exs)


def test_padded_batch_input_matches_list_input(setups):
    model, exs, _ = setups["bert"]
    items = prepare_examples(exs)
    ids, mask, tt = collate(items)
    padded = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
    again = prepare_examples(padded)
    assert [len(e) for e in again] == [len(e) for e in items]
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.token_type_ids, b.token_type_ids)
               for a, b in zip(again, items, strict=True))
    engine = EarlyExitEngine(model, "softmax", 0.9)
    for mode in MODES:
        x, y = engine.run(padded, mode, 5), engine.run(exs, mode, 5)
        assert torch.equal(x.exit_layers, y.exit_layers) and torch.equal(x.predictions, y.predictions)


def test_pick_threshold_hits_the_target():
    logits = torch.randn(400, 6, 2, generator=torch.Generator().manual_seed(3)) * 3
    for signal in ("energy", "entropy", "softmax"):
        for target in (1.5, 2.0, 3.0):
            c = pick_threshold(logits, signal, target)
            sim = simulate_exits(logits, signal, [c.threshold])[0]
            assert c.layer_speedup == pytest.approx(speedup_ratio(sim, 6))
            assert abs(c.layer_speedup - target) < 0.05 * target
    c = pick_threshold(logits, "patience", 2.0)
    assert c.threshold in (1.0, 2.0, 3.0, 4.0, 5.0)


def test_bad_input_is_one_clear_error(setups):
    model, exs, _ = setups["bert"]
    engine = EarlyExitEngine(model, "energy", 0.5)
    with pytest.raises(EebenchError, match="unknown mode"):
        engine.run(exs, "parallel")
    with pytest.raises(EebenchError, match="batch size"):
        engine.run(exs, "batched", 0)
    with pytest.raises(EebenchError, match="no attended token"):
        prepare_examples([{"input_ids": [1, 2], "attention_mask": [0, 0]}])
    with pytest.raises(EebenchError, match="no inputs"):
        prepare_examples([])
    with pytest.raises(EebenchError, match=r"split_gain 1.5 is not allowed; give a share in \[0, 1\)"):
        EarlyExitEngine(model, "energy", 0.5, split_gain=1.5)


def test_bench_returns_the_documented_keys(setups):
    model, exs, _ = setups["bert"]
    old = torch.get_num_threads()
    res = bench(model, exs[:10], "energy", target_speedup=2.0, batch_size=4, repeats=1, warmup=0,
                threads=1, overhead_inputs=2)
    assert torch.get_num_threads() == old
    json.dumps(res)  # plain JSON
    for key in ("model", "signal", "num_layers", "num_inputs", "mean_tokens", "batch_size", "segment",
                "sort_by_length", "threads", "repeats", "warmup", "device", "torch", "platform", "full",
                "runs", "signal_overhead"):
        assert key in res, key
    assert res["threads"] == 1 and res["num_inputs"] == 10
    spread = {"min", "median", "max"}
    assert set(res["full"]) == {"single", "batched"}
    assert set(res["full"]["single"]["latency_ms"]) == {"median", "p90", "p99"}
    (run,) = res["runs"]
    for key in ("threshold", "target_speedup", "layer_speedup", "exit_counts", "matches_simulation",
                "single", "batched", "streaming", "wall_speedup", "wall_over_layer", "cpu_speedup",
                "scalar_share"):
        assert key in run, key
    assert sum(run["exit_counts"]) == 10
    assert 0.0 <= run["scalar_share"] <= 1.0  # energy has a scalar form
    for mode in MODES:
        assert set(run[mode]["total_s"]) == spread and set(run["wall_speedup"][mode]) == spread
        assert set(run["cpu_speedup"][mode]) == spread
        assert run["matches_simulation"][mode] == {"exit_layers": 1.0, "predictions": 1.0}
    assert set(res["signal_overhead"]) == {"layer_ms", "head_ms", "signal_ms", "fraction", "head_fraction"}
    # The numbers keep their definitions (oracles: a per-input loop of the spec's exit rule, Eq. 12
    # by hand, and the ratios of the reported times).
    lengths = [sum(e["attention_mask"]) for e in exs[:10]]
    assert res["mean_tokens"] == pytest.approx(sum(lengths) / 10)
    logits = one_pass_logits(model, exs[:10], batch_size=5)
    energy = 1 / (1 + torch.exp(torch.logsumexp(logits.double(), -1)))
    m = model.num_layers
    exits = [next((j + 1 for j in range(m - 1) if energy[i, j] < run["threshold"]), m) for i in range(10)]
    assert run["exit_counts"] == [exits.count(k) for k in range(1, m + 1)]
    assert run["layer_speedup"] == pytest.approx(m * 10 / sum(exits))
    full = res["full"]
    assert run["wall_speedup"]["single"]["median"] == pytest.approx(
        full["single"]["total_s"]["median"] / run["single"]["total_s"]["median"], rel=1e-9)
    for mode in ("batched", "streaming"):
        assert run["wall_speedup"][mode]["median"] == pytest.approx(
            full["batched"]["total_s"]["median"] / run[mode]["total_s"]["median"], rel=1e-9)
        assert run[mode]["throughput"]["median"] == pytest.approx(10 / run[mode]["total_s"]["median"], rel=1e-9)
        assert run["wall_over_layer"][mode] == pytest.approx(run["wall_speedup"][mode]["median"] / run["layer_speedup"])
    text = format_bench(res)
    assert "| streaming" in text and "signal overhead" in text

    two = bench(model, exs[:6], "patience", thresholds=[1, 2], batch_size=3, repeats=1, warmup=0,
                threads=1, overhead_inputs=1)
    assert [r["threshold"] for r in two["runs"]] == [1.0, 2.0]


def test_bench_records_precision_attention_and_cpu(setups, monkeypatch, capsys):
    import eebench.model.accel as accel

    model, exs, _ = setups["bert"]
    fake = accel.CpuInfo("Fake CPU without bf16", ("avx2",), False)
    monkeypatch.setattr(accel, "cpu_info", lambda: fake)
    res = bench(model, exs[:4], "energy", target_speedup=2.0, batch_size=2, repeats=1, warmup=0,
                threads=1, overhead_inputs=1, precision="bf16")
    assert "would be slow on this CPU (Fake CPU without bf16" in capsys.readouterr().out
    assert res["precision"] == "fp32" and res["attn_implementation"] == "eager"
    assert res["machine"]["cpu_model"] == "Fake CPU without bf16" and res["machine"]["native_bf16"] is False
    assert "precision fp32, attention eager, CPU Fake CPU without bf16" in format_bench(res)
    with pytest.raises(EebenchError, match="fp16 needs a CUDA device"):
        bench(model, exs[:4], "energy", precision="fp16")


@pytest.mark.parametrize("signal", ("energy", "patience"))
def test_bf16_engine_reproduces_its_own_simulation(setups, monkeypatch, signal):
    """Under bf16 autocast (forced on, whatever this CPU has) every mode still exits where the
    bf16 one-pass logits say; and those logits do differ from fp32 (autocast really ran)."""
    import eebench.model.accel as accel

    monkeypatch.setattr(accel, "cpu_info", lambda: accel.CpuInfo("Fake CPU with bf16", ("avx512_bf16",), True))
    model, exs, fp32_logits = setups["bert"]
    logits = one_pass_logits(model, exs, batch_size=5, precision="bf16")
    assert not torch.equal(logits, fp32_logits)
    choice = pick_threshold(logits, signal, 1.7)
    sim = simulate_exits(logits, signal, [choice.threshold])[0]
    engine = EarlyExitEngine(model, signal, choice.threshold, precision="bf16")
    assert engine.precision == "bf16"
    for mode, b, srt in (("single", 1, False), ("batched", 3, False), ("streaming", 4, True)):
        out = engine.run(exs, mode, b, sort_by_length=srt)
        assert out.exit_layers.tolist() == sim.tolist(), (mode, b)
        assert out.predictions.tolist() == predictions_at_exit(logits, sim[None])[0].tolist(), (mode, b)
