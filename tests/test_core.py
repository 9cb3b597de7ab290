"""Core: signals, exit rule, speed-up, sweep, and the multi-exit backbone's two forward modes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from eebench.data.metrics import METRICS
from eebench.errors import EebenchError, UnknownNameError
from eebench.exits.metrics import exit_counts, speedup_ratio
from eebench.exits.rule import (
    area_under_front,
    metric_at_speedup,
    pareto_front,
    predictions_at_exit,
    simulate_exits,
    sweep,
    threshold_grid,
)
from eebench.exits.signals import get_signal, list_signals
from eebench.inference import early_exit
from eebench.model.backbone import MultiExitModel
from tests.conftest import TINY_CONFIGS, padded_batch, tiny_model

SIGNALS = ["energy", "entropy", "softmax", "patience"]


# ----------------------------------------------------------------------------- signals


def test_registry_and_unknown_name():
    assert set(SIGNALS) <= set(list_signals())
    assert get_signal("energy").higher_is_easier is False
    assert get_signal("softmax").higher_is_easier is True
    assert get_signal("patience").higher_is_easier is True
    with pytest.raises(ValueError, match="known: energy, entropy, patience, raw-entropy, softmax"):
        get_signal("confidence")
    with pytest.raises(UnknownNameError):
        get_signal("nope")


def test_energy_matches_definition_and_is_stable():
    logits = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    e = get_signal("energy").score(logits)
    expected = 1 / (1 + torch.exp(torch.logsumexp(logits, -1)))
    assert torch.allclose(e, expected)
    big = torch.tensor([[[1e4, -1e4, 3.0], [-1e4, -1e4, -1e4]]])
    e_big = get_signal("energy").score(big)
    assert torch.isfinite(e_big).all()
    assert e_big[0, 0] == 0.0 and e_big[0, 1] == pytest.approx(1.0)
    for name in ("entropy", "softmax"):
        assert torch.isfinite(get_signal(name).score(big)).all()


def test_entropy_normalised_and_softmax():
    uniform = torch.zeros(1, 1, 4)
    assert get_signal("entropy").score(uniform).item() == pytest.approx(1.0)
    assert get_signal("softmax").score(uniform).item() == pytest.approx(0.25)
    peaked = torch.tensor([[[50.0, 0.0, 0.0]]])
    assert get_signal("entropy").score(peaked).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), 0)
    h = -(p * p.log()).sum() / math.log(3)
    assert get_signal("entropy").score(torch.tensor([[[2.0, 1.0, 0.5]]])).item() == pytest.approx(h.item(), rel=1e-5)


def test_patience_counts_consecutive_agreement():
    # argmax per layer: 0, 0, 1, 1, 1, 0
    preds = [0, 0, 1, 1, 1, 0]
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 2).float().unsqueeze(0)
    assert get_signal("patience").score(logits)[0].tolist() == [0, 1, 0, 1, 2, 0]


# ----------------------------------------------------------------------------- exit rule


def test_simulate_exits_hand_made():
    # 3 samples, 3 layers, energy-like scores given directly through a custom logit layout.
    logits = torch.tensor(
        [
            [[9.0, 0.0], [9.0, 0.0], [9.0, 0.0]],  # confident everywhere -> exits at 1
            [[0.0, 0.0], [9.0, 0.0], [9.0, 0.0]],  # confident from layer 2
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # never confident -> last layer
        ]
    )
    el = simulate_exits(logits, "entropy", [0.1, 1.01, -1.0])
    assert el.tolist() == [[1, 2, 3], [1, 1, 1], [3, 3, 3]]
    assert el.dtype == torch.long
    # patience 1: exit at the first layer that agrees with the previous one
    el = simulate_exits(logits, "patience", [1])
    assert el.tolist() == [[2, 2, 2]]  # argmax ties resolve to class 0, so layer 1 agrees with 2
    preds = predictions_at_exit(logits, el)
    assert preds.shape == (1, 3)


def test_speedup_formula():
    assert speedup_ratio(torch.tensor([6, 6, 6]), 6) == 1.0
    assert speedup_ratio(torch.tensor([1, 1]), 6) == 6.0
    # N = 4, M = 4: sum m N_m = 1 + 2 + 4 + 4 = 11 -> 16 / 11
    assert speedup_ratio([1, 2, 4, 4], 4) == pytest.approx(16 / 11)
    assert speedup_ratio(torch.tensor([3, 3]), 6) == 2.0
    assert exit_counts(torch.tensor([[1, 2, 4, 4]]), 4).tolist() == [[1, 1, 0, 2]]
    with pytest.raises(ValueError):
        speedup_ratio(torch.tensor([0, 1]), 4)


logit_tensors = st.integers(1, 6).flatmap(
    lambda n: st.integers(2, 6).flatmap(
        lambda m: st.integers(2, 4).flatmap(
            lambda c: st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=n * m * c, max_size=n * m * c).map(
                lambda xs: torch.tensor(xs).view(n, m, c)
            )
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(logit_tensors, st.floats(0, 1), st.floats(0, 1))
def test_raising_low_is_easy_threshold_never_delays(logits, a, b):
    lo, hi = sorted([a, b])
    for name in ("energy", "entropy"):
        el = simulate_exits(logits, name, [lo, hi])
        assert (el[1] <= el[0]).all()


@settings(max_examples=60, deadline=None)
@given(logit_tensors, st.floats(0, 1), st.floats(0, 1), st.integers(0, 6), st.integers(0, 6))
def test_raising_high_is_easy_threshold_never_advances(logits, a, b, p, q):
    lo, hi = sorted([a, b])
    el = simulate_exits(logits, "softmax", [lo, hi])
    assert (el[1] >= el[0]).all()
    lo_p, hi_p = sorted([p, q])
    el = simulate_exits(logits, "patience", [lo_p, hi_p])
    assert (el[1] >= el[0]).all()


# The exit rules as METHODS.md states them (the oracle; not the code's own ``meets``).
SPEC_RULES = {
    "energy": lambda s, t: s < t,
    "entropy": lambda s, t: s < t,
    "softmax": lambda s, t: s > t,
    "patience": lambda s, t: s >= t,
}


@settings(max_examples=40, deadline=None)
@given(logit_tensors, st.floats(0, 1))
def test_exit_is_first_layer_meeting_the_rule(logits, tau):
    n, m, _ = logits.shape
    for name in SIGNALS:
        sig = get_signal(name)
        scores = sig.score(logits).double()
        t = tau * (m if sig.integer else 1)
        el = simulate_exits(logits, sig, [t])[0]
        for i in range(n):
            meets = [SPEC_RULES[name](float(scores[i, j]), t) for j in range(m - 1)]
            expected = meets.index(True) + 1 if any(meets) else m
            assert el[i].item() == expected


def test_score_equal_to_threshold_follows_the_spec():
    """score == tau: energy, entropy and max softmax do not exit (strict), patience does (>=)."""
    # layer 1: two equal logits, so max softmax is exactly 0.5 and entropy exactly 1; layer 2: confident
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [9.0, 0.0], [9.0, 0.0]]])
    for name in ("energy", "entropy", "softmax"):
        tau = float(get_signal(name).score(logits)[0, 0])  # the first layer's own value, exactly
        assert simulate_exits(logits, name, [tau]).tolist() == [[3]], name  # strict: layers 1 and 2 sit exactly at tau
    assert float(get_signal("softmax").score(logits)[0, 0]) == 0.5
    # patience at layer 2 is exactly 1 (layer 1 agrees): >= 1 exits there
    assert simulate_exits(logits, "patience", [1.0]).tolist() == [[2]]
    assert simulate_exits(logits, "patience", [2.0]).tolist() == [[3]]


def test_one_layer_model_exits_at_its_only_layer():
    logits = torch.randn(5, 1, 3)
    for name in SIGNALS:
        assert simulate_exits(logits, name, [0.1, 0.9]).tolist() == [[1] * 5] * 2
    assert speedup_ratio(torch.ones(5, dtype=torch.long), 1) == 1.0


# ----------------------------------------------------------------------------- sweep


def test_sweep_metrics_match_sklearn_and_front():
    torch.manual_seed(0)
    logits = torch.randn(50, 5, 2) * 3
    labels = torch.randint(0, 2, (50,))
    for name in SIGNALS:
        sw = sweep(logits, labels, name, metrics=("accuracy", "f1", "matthews"), num_thresholds=30)
        assert sw.speedups.shape == sw.thresholds.shape
        assert sw.counts.sum(1).eq(50).all()
        preds = predictions_at_exit(logits, sw.exit_layers)
        for t in range(len(sw.thresholds)):
            y, p = labels.numpy(), preds[t].numpy()
            assert sw.metrics["accuracy"][t].item() == pytest.approx(skm.accuracy_score(y, p))
            assert sw.metrics["f1"][t].item() == pytest.approx(skm.f1_score(y, p, zero_division=0))
            assert sw.metrics["matthews"][t].item() == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-9)
        # the grid reaches both extremes for continuous signals
        if name != "patience":
            assert sw.speedups.max().item() == pytest.approx(5.0)
            assert sw.speedups.min().item() == pytest.approx(1.0)


def test_batched_matthews_multiclass_matches_sklearn():
    torch.manual_seed(1)
    preds = torch.randint(0, 3, (7, 40))
    labels = torch.randint(0, 3, (40,))
    got = METRICS["matthews"].batched(preds, labels)
    for t in range(7):
        assert got[t].item() == pytest.approx(skm.matthews_corrcoef(labels.numpy(), preds[t].numpy()), abs=1e-9)


def test_pareto_front_and_readouts():
    speed = [1.0, 1.5, 2.0, 2.0, 3.0, 4.0]
    score = [0.9, 0.92, 0.85, 0.88, 0.80, 0.70]
    front = pareto_front(speed, score).tolist()
    assert front == [1, 3, 4, 5]
    assert metric_at_speedup(speed, score, 2.0) == pytest.approx(0.88)
    assert metric_at_speedup(speed, score, 1.0) == pytest.approx(0.92)
    assert math.isnan(metric_at_speedup(speed, score, 5.0))
    # staircase: [1, 1.5] 0.92, [1.5, 2] 0.88, [2, 3] 0.80, [3, 4] 0.70 over M - 1 = 3
    assert area_under_front(speed, score, 4) == pytest.approx((0.5 * 0.92 + 0.5 * 0.88 + 0.80 + 0.70) / 3)


def test_threshold_grid_patience_is_integers():
    scores = get_signal("patience").score(torch.randn(10, 6, 2))
    assert threshold_grid(scores, get_signal("patience")).tolist() == [1, 2, 3, 4, 5]


def test_signal_rejects_regression():
    with pytest.raises(EebenchError, match="classification"):
        sweep(torch.randn(4, 3, 1), torch.zeros(4), "entropy")


# ----------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_all_layer_logits_match_hf_hidden_states(arch, pooling):
    model = tiny_model(arch, num_labels=3, pooling=pooling)
    ids, mask = padded_batch(6, 10)
    with torch.no_grad():
        ours = model(ids, mask).logits
        hs = model.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ref = torch.stack([model.heads(i, h, mask) for i, h in enumerate(hs[-model.num_layers:])], 1)
    assert ours.shape == (6, 4, 3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def _thresholds_in_gaps(scores: torch.Tensor, sig, k: int = 4) -> list[float]:
    """Thresholds at midpoints of wide gaps between observed internal-layer scores, so that
    float noise between batch compositions cannot flip a decision."""
    if sig.integer:
        return [1, 2, 3]
    vals = torch.unique(scores[:, :-1].reshape(-1).double())
    mids = [(a + b) / 2 for a, b in zip(vals[:-1].tolist(), vals[1:].tolist(), strict=True) if b - a > 1e-4]
    step = max(len(mids) // k, 1)
    return mids[::step][:k] + [float(vals.min()) - 1, float(vals.max()) + 1]


@pytest.mark.parametrize("arch", ["bert", "albert", "mpnet", "distilbert"])
@pytest.mark.parametrize("signal", SIGNALS)
def test_true_early_exit_matches_simulation(arch, signal):
    model = tiny_model(arch, num_labels=3, pooling="mean", seed=3)
    # scale the heads so that signals spread over their range
    with torch.no_grad():
        for lin in model.heads.classifiers:
            lin.weight.mul_(40)
    ids, mask = padded_batch(16, 12, seed=5)
    sig = get_signal(signal)
    with torch.no_grad():
        logits = model(ids, mask).logits
    for thr in _thresholds_in_gaps(sig.score(logits), sig):
        sim = simulate_exits(logits, sig, [thr])[0]
        sim_pred = predictions_at_exit(logits, sim[None])[0]
        el, pred, _ = early_exit(model, ids, mask, sig, thr)  # batched, samples leave
        assert el.tolist() == sim.tolist()
        assert pred.tolist() == sim_pred.tolist()
        for i in range(len(ids)):  # batch size 1, no padding
            n = int(mask[i].sum())
            el1, pred1, _ = early_exit(model, ids[i : i + 1, :n], mask[i : i + 1, :n], sig, thr)
            assert (el1.item(), pred1.item()) == (sim[i].item(), sim_pred[i].item())


def test_early_exit_stops_computing():
    model = tiny_model("bert", pooling="cls", seed=1)
    ids, mask = padded_batch(8, 10)
    calls = []
    el, _, _ = early_exit(model, ids, mask, get_signal("entropy"), 2.0, on_layer=lambda layer, idx: calls.append((layer, len(idx))))
    assert el.tolist() == [1] * 8 and calls == [(1, 8)]  # every sample exits after layer 1
    calls.clear()
    early_exit(model, ids, mask, get_signal("entropy"), -1.0, on_layer=lambda layer, idx: calls.append((layer, len(idx))))
    assert calls == [(m, 8) for m in range(1, 5)]


@pytest.mark.parametrize("arch", ["bert", "albert"])
def test_save_load_roundtrip_safetensors(tmp_path, arch):
    model = tiny_model(arch, pooling="pooler")
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "backbone_config.json", "eebench_config.json", "model.safetensors"]
    loaded = MultiExitModel.load(tmp_path / "m").eval()
    ids, mask = padded_batch(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).logits, loaded(ids, mask).logits, atol=0, rtol=0)


def test_budget_exiting_keeps_first_layers():
    model = tiny_model("bert", num_layers=2)
    ids, mask = padded_batch(3, 6)
    assert model(ids, mask).shape == (3, 2, 2)
    with pytest.raises(EebenchError, match="outside 1..4"):
        tiny_model("bert", num_layers=9)


def test_pooling_ignores_padding():
    model = tiny_model("bert", pooling="mean", seed=2)
    ids, mask = padded_batch(5, 10, seed=7)
    with torch.no_grad():
        batched = model(ids, mask).logits
        for i in range(5):
            n = int(mask[i].sum())
            single = model(ids[i : i + 1, :n], mask[i : i + 1, :n]).logits
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)


def test_unknown_pooling_and_arch():
    with pytest.raises(EebenchError, match="known: cls, exit-pooler, mean, pooler"):
        tiny_model("bert", pooling="max")


def test_premature_and_delayed_rates_match_their_definition():
    from eebench.exits.metrics import exit_decision_rates

    torch.manual_seed(0)
    n, m, t = 30, 5, 7
    correct = torch.rand(n, m) > 0.4
    el = torch.randint(1, m + 1, (t, n))
    premature, delayed = exit_decision_rates(el, correct)
    for k in range(t):
        exits = [bool(correct[i, el[k, i] - 1]) for i in range(n) if el[k, i] < m]
        conts = [bool(correct[i, j]) for i in range(n) for j in range(int(el[k, i]) - 1)]
        assert premature[k].item() == pytest.approx(sum(not x for x in exits) / len(exits))
        assert delayed[k].item() == pytest.approx(sum(conts) / len(conts))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), min_size=1, max_size=25))
def test_pareto_front_is_exactly_the_non_dominated_points(points):
    s = [float(a) for a, _ in points]
    v = [float(b) for _, b in points]
    front = pareto_front(s, v).tolist()

    def dominated(i):
        return any(s[j] >= s[i] and v[j] >= v[i] and (s[j] > s[i] or v[j] > v[i]) for j in range(len(s)))

    assert not any(dominated(i) for i in front)
    assert {(s[i], v[i]) for i in front} == {(s[i], v[i]) for i in range(len(s)) if not dominated(i)}
    assert len(front) == len({(s[i], v[i]) for i in front})  # one index per distinct point
