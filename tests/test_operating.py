"""Held-out operating points and the finite-sample guarantee (eebench.exits.operating), on synthetic
logits whose right answers are known by construction."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from eebench.errors import EebenchError
from eebench.exits.operating import (
    SplitSpec,
    Target,
    dev_splits,
    held_out,
    mlflow_summary,
    pick_threshold_held_out,
    upper_bound,
    violation_check,
)


def easy_hard(n: int = 400, seed: int = 0, hard_share: float = 0.5):
    """Two layers, two classes. The final layer is always right. At layer 1, "easy" examples are
    right with max softmax 0.9 and "hard" ones wrong with max softmax 0.6 (all ties within a
    group). So with the softmax signal: letting the easy ones out costs nothing (speed-up
    2 / (2 - share easy)); letting the hard ones out too gives 2x, accuracy 1 - share hard, and
    disagreement with the final layer = share hard."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    hard = torch.zeros(n, dtype=torch.bool)
    hard[torch.randperm(n, generator=g)[: int(hard_share * n)]] = True
    sign = torch.where(y == 1, 1.0, -1.0)
    logits = torch.zeros(n, 2, 2)
    gap1 = torch.where(hard, -math.log(0.6 / 0.4), math.log(0.9 / 0.1))  # hard: towards the wrong class
    logits[:, 0, 1] = sign * gap1
    logits[:, 1, 1] = sign * 5.0
    return logits, y, hard


def test_speedup_target_picks_the_known_threshold():
    logits, y, hard = easy_hard()
    # >= 1.2x: only "easy out" (about 1.33x, accuracy 1) and "everyone out" (2x, 0.5) qualify; the
    # best calibration accuracy is "easy out", which is perfect on evaluation too.
    op = held_out(logits, y, "softmax", Target(speedup=1.2), SplitSpec(repeats=10, seed=3))
    assert op.reached == 10
    assert all(r["eval_metric"] == 1.0 for r in op.repeats)
    # its speed-up on evaluation is 2 / (2 - share of easy examples there), about 4/3
    assert op.mean("eval_speedup") == pytest.approx(4 / 3, abs=0.03)
    # >= 1.5x: only "everyone out" qualifies: exactly 2x, accuracy 0.5 on a stratified evaluation part.
    op = held_out(logits, y, "softmax", Target(speedup=1.5), SplitSpec(repeats=5))
    assert all(r["eval_speedup"] == pytest.approx(2.0) for r in op.repeats)
    assert op.mean("eval_metric") == pytest.approx(1 - hard.float().mean().item(), abs=0.06)


def test_unreachable_target_is_not_reached_anywhere():
    logits, y, _ = easy_hard()
    op = held_out(logits, y, "softmax", Target(speedup=2.5), SplitSpec(repeats=3))  # a 2-layer model tops at 2x
    assert op.reached == 0 and op.summary()["metric"] is None and op.summary()["speedup"] is None
    with pytest.raises(EebenchError, match="no threshold of signal softmax reaches"):
        pick_threshold_held_out(logits, y, "softmax", Target(speedup=2.5))


def test_drop_target_is_the_fastest_within_the_drop():
    logits, y, _ = easy_hard()
    op = held_out(logits, y, "softmax", Target(drop=0.0), SplitSpec(repeats=4))
    assert all(r["eval_metric"] == 1.0 for r in op.repeats)  # the hard ones never leave early
    assert op.mean("eval_speedup") == pytest.approx(4 / 3, abs=0.03)
    op = held_out(logits, y, "softmax", Target(drop=0.6), SplitSpec(repeats=4))  # losing half is allowed
    assert all(r["eval_speedup"] == pytest.approx(2.0) for r in op.repeats)


def test_guarantee_with_ties_certifies_exactly_the_safe_threshold():
    logits, y, _ = easy_hard(n=1000)
    for correction in ("fixed-sequence", "bonferroni"):
        for bound in ("clopper-pearson", "hoeffding"):
            t = Target(epsilon=0.1, delta=0.05, bound=bound, correction=correction)
            op = held_out(logits, y, "softmax", t, SplitSpec(repeats=5))
            # easy out: 0 disagreements on 500 calibration examples (bound <= 0.06), certified;
            # hard out too: disagreement 0.5, never certified.
            assert all(r["eval_risk"] == 0.0 and r["violated"] == 0.0 for r in op.repeats), (bound, correction)
            assert op.mean("eval_speedup") == pytest.approx(4 / 3, abs=0.03)


def test_guarantee_on_a_tiny_calibration_part_falls_back_to_the_final_layer():
    logits, y, _ = easy_hard(n=20)
    # 10 calibration examples, 0 errors: the 95% Clopper-Pearson bound is 1 - 0.05^(1/10) = 0.26 > 0.1,
    # so nothing can be certified and no one may exit.
    op = held_out(logits, y, "softmax", Target(epsilon=0.1, delta=0.05), SplitSpec(repeats=3))
    assert all(r["eval_speedup"] == 1.0 and r["eval_risk"] == 0.0 for r in op.repeats)
    assert all(r["thresholds"] == [math.inf] for r in op.repeats)  # softmax: exits when > inf, i.e. never


def test_accuracy_loss_risk_counts_final_right_exit_wrong():
    logits, y, hard = easy_hard(n=1000)
    logits[hard] = -logits[hard]  # hard ones: layer 1 now right, the final layer wrong
    # Letting everyone out changes half the predictions (disagreement 0.5: not certified, only the
    # easy ones leave) but loses no accuracy (accuracy-loss 0: everyone leaves, 2x).
    op = held_out(logits, y, "softmax", Target(epsilon=0.05, risk="disagreement"), SplitSpec(repeats=3))
    assert all(r["eval_risk"] == 0.0 for r in op.repeats) and op.mean("eval_speedup") == pytest.approx(4 / 3, abs=0.03)
    op = held_out(logits, y, "softmax", Target(epsilon=0.05, risk="accuracy-loss"), SplitSpec(repeats=3))
    assert all(r["eval_speedup"] == pytest.approx(2.0) and r["eval_risk"] == 0.0 and r["eval_metric"] == 1.0
               for r in op.repeats)


def test_bounds_match_their_definitions():
    n, delta = 50, 0.1
    k = np.array([0, 3, 10, 49])
    ucb = upper_bound(k, n, delta, "clopper-pearson")
    # the exact bound u solves P(Bin(n, u) <= k) = delta
    assert np.allclose(binom.cdf(k, n, ucb), delta, atol=1e-9)
    assert upper_bound(np.array([50]), n, delta)[0] == 1.0
    assert np.allclose(upper_bound(k, n, delta, "hoeffding"), np.minimum(1, k / n + np.sqrt(np.log(10) / 100)))


@pytest.fixture
def one_thread():
    """Small tensors: one thread is far faster than several on a shared, loaded machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_violation_rate_stays_below_delta(one_thread):
    """Risk grows smoothly with aggressiveness. Calibration parts of 400; evaluation parts of
    3,600 estimate the true risk closely (standard error about 0.004), so over many splits the
    rate at which they break the promise must stay <= delta up to the noise of that rate."""
    g = torch.Generator().manual_seed(1)
    n = 4000
    y = torch.arange(n) % 2
    conf = torch.rand(n, generator=g)  # layer-1 confidence
    agree = torch.rand(n, generator=g) < 0.5 + 0.5 * conf  # confident examples agree with the final layer more
    sign = torch.where(y == 1, 1.0, -1.0)
    logits = torch.zeros(n, 3, 2)
    logits[:, 2, 1] = sign * 4
    logits[:, 1, 1] = sign * 4
    logits[:, 0, 1] = sign * torch.where(agree, 1.0, -1.0) * (0.05 + 3 * conf)
    t = Target(epsilon=0.08, delta=0.1)
    r = 60
    res = violation_check(logits, y, "softmax", t, SplitSpec(cal_fraction=0.1, repeats=r, seed=0), num_thresholds=40)
    assert res["mean_eval_speedup"] > 1.3  # the guarantee is not met by never exiting
    assert 0.04 < res["mean_eval_risk"] < t.epsilon  # and it is not trivially loose
    assert res["rate"] <= t.delta + 2 * math.sqrt(t.delta * (1 - t.delta) / r)


def test_cross_fitting_scores_every_example_once():
    logits, y, _ = easy_hard(n=200)
    op = held_out(logits, y, "softmax", Target(speedup=1.2), SplitSpec(folds=4, repeats=2))
    assert all(r["n_eval"] == 200 and len(r["thresholds"]) == 4 and r["eval_metric"] == 1.0 for r in op.repeats)


def test_splits_are_stratified_seeded_and_keep_every_class():
    y = torch.tensor([0] * 30 + [1] * 10 + [2] * 4)
    a, b = dev_splits(y, SplitSpec(repeats=2, seed=7)), dev_splits(y, SplitSpec(repeats=2, seed=7))
    assert all(np.array_equal(p[0][0], q[0][0]) for p, q in zip(a, b, strict=True))
    cal, ev = a[0][0]
    assert sorted(np.bincount(y[cal].numpy()).tolist()) == [2, 5, 15] and len(ev) == 22
    with pytest.raises(EebenchError, match=r"class\(es\) 2 \(1 example\)"):
        dev_splits(torch.tensor([0] * 10 + [1] * 10 + [2]), SplitSpec())
    with pytest.raises(EebenchError, match="evaluation part"):
        dev_splits(y, SplitSpec(cal_fraction=0.95))
    with pytest.raises(EebenchError, match="fewer than 5 examples"):
        dev_splits(y, SplitSpec(folds=5))


@pytest.mark.parametrize("kw, msg", [
    (dict(epsilon=0.0), "--epsilon must lie in \\(0, 1\\), got 0.0"),
    (dict(epsilon=1.5), "--epsilon must lie in \\(0, 1\\), got 1.5"),
    (dict(epsilon=0.1, delta=1.0), "--delta must lie in \\(0, 1\\), got 1.0"),
    (dict(speedup=2.0, delta=-0.1), "--delta must lie in"),
    (dict(speedup=2.0, drop=0.1), "exactly one operating-point target"),
])
def test_bad_targets_are_one_line_errors(kw, msg):
    with pytest.raises(EebenchError, match=msg):
        Target(**kw).check()


def test_mlflow_names_keep_oracle_and_held_out_apart():
    names = mlflow_summary({"accuracy_at_2x": 0.8, "heldout_accuracy_at_2x": 0.7, "heldout_speedup_at_2x": 2.1,
                            "auc": 0.5, "accuracy_at_3x": None})
    assert names == {"oracle_accuracy_at_2x": 0.8, "heldout_accuracy_at_2x": 0.7, "heldout_speedup_at_2x": 2.1, "auc": 0.5}


def test_cli_rejects_bad_epsilon_and_delta(tmp_path, capsys):
    from eebench.cli import main

    for args in (["--epsilon", "1.2"], ["--epsilon", "0.1", "--delta", "0"], ["--cal-fraction", "1"]):
        assert main(["report", "--results", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "eebench: error:" in err and "Traceback" not in err
