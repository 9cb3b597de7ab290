"""Training strategies: losses on hand-computed examples, registry, COSEE state."""

import math

import pytest
import torch
import torch.nn.functional as F

from eebench.errors import EebenchError
from eebench.methods.cosee import cosee_loss, osc_loss, swm_weights
from eebench.strategy import StepContext, build_strategy, get_method, list_methods


def test_registry_lists_methods_and_presets():
    names = {m.name for m in list_methods()}
    assert {"vanilla", "weighted", "cosee", "cosee-entropy", "cosee-softmax", "cosee-no-swm", "cosee-no-osc",
            "two-stage", "final-only"} <= names
    assert get_method("cosee").defaults["alpha"] == 0.1
    assert get_method("cosee").defaults["beta0"] == 10.0
    assert get_method("cosee").defaults["margin"] == 0.3
    assert get_method("cosee").defaults["num_thresholds"] == 5
    assert get_method("cosee-no-swm").defaults["swm"] is False
    assert get_method("cosee-entropy").defaults["signal"] == "entropy"
    with pytest.raises(ValueError, match="unknown method 'nope'; known: .*cosee"):
        get_method("nope")
    with pytest.raises(EebenchError, match="no hyper-parameter 'gamma'"):
        build_strategy("cosee", {"gamma": 1})
    with pytest.raises(EebenchError, match="cannot train with signal 'patience'"):
        build_strategy("cosee", {"signal": "patience"})


def _ctx(step=0, total=10):
    return StepContext(step=step, total_steps=total, epoch=0)


def test_vanilla_and_weighted_losses_by_hand():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # N=1, M=3
    labels = torch.tensor([0])
    ce = [F.cross_entropy(logits[:, m], labels).item() for m in range(3)]
    v, _ = build_strategy("vanilla").loss(logits, labels, _ctx())
    assert v.item() == pytest.approx(sum(ce), rel=1e-6)
    w, _ = build_strategy("weighted").loss(logits, labels, _ctx())
    assert w.item() == pytest.approx((1 * ce[0] + 2 * ce[1] + 3 * ce[2]) / 6, rel=1e-6)
    fo, _ = build_strategy("final-only").loss(logits, labels, _ctx())
    assert fo.item() == pytest.approx(ce[2], rel=1e-6)


def test_swm_weights():
    w = swm_weights(torch.tensor([1, 3, 4]), 4, beta=2.0)
    assert torch.allclose(w.sum(1), torch.ones(3))
    # row for m* = 3: softmax(-2 |m - 3|) over m = 1..4
    e = torch.tensor([math.exp(-4), math.exp(-2), 1.0, math.exp(-2)])
    assert torch.allclose(w[1], e / e.sum())
    assert w[0].argmax() == 0 and w[2].argmax() == 3
    u = swm_weights(torch.tensor([1, 2]), 5, beta=0.0)
    assert torch.allclose(u, torch.full((2, 5), 0.2))


def test_osc_loss_by_hand_energy():
    # 4 samples, M = 3 (2 internal layers), 2 classes.
    logits = torch.tensor(
        [
            [[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]],
            [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]],
            [[0.5, 0.0], [0.0, 2.0], [1.0, 0.0]],
            [[0.0, 0.2], [0.0, 1.0], [0.0, 1.0]],
        ]
    )
    labels = torch.tensor([0, 0, 0, 1])
    e = torch.sigmoid(-torch.logsumexp(logits, -1))
    expected = []
    for m in range(2):
        right = logits[:, m].argmax(-1) == labels
        gap = e[right, m].mean() - e[~right, m].mean()
        expected.append(max(0.0, gap.item() + 0.3))
    got = osc_loss(logits, labels, "energy", 0.3)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_osc_high_is_easy_and_skips_uniform_layers():
    logits = torch.tensor([[[3.0, 0.0], [3.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]]])  # layer 1 all right
    labels = torch.tensor([0, 0])
    assert osc_loss(logits, labels, "softmax", 0.3).item() == 0.0  # the only internal layer is all easy
    logits = torch.tensor([[[3.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]])
    p = torch.softmax(logits[:, 0], -1).amax(-1)
    # sample 0 right (easy), sample 1 wrong (hard): max(0, s_hard - s_easy + eps)
    expected = max(0.0, (p[1] - p[0]).item() + 0.3)
    assert osc_loss(logits, labels, "softmax", 0.3).item() == pytest.approx(expected, rel=1e-5)


def test_osc_gradient_reaches_logits():
    torch.manual_seed(0)
    logits = torch.randn(8, 4, 3, requires_grad=True)
    labels = torch.randint(0, 3, (8,))
    loss = osc_loss(logits, labels, "energy", 5.0)  # a large margin keeps every hinge active
    loss.backward()
    assert logits.grad is not None and logits.grad[:, :-1].abs().sum() > 0
    assert logits.grad[:, -1].abs().sum() == 0  # the final layer takes no OSC term


def _cosee_by_loops(x: list, y: list, thresholds, beta, alpha, margin, swm=True, osc=True) -> float:
    """COSEE's loss from METHODS.md in plain Python floats, one loop per sum (no eebench code)."""
    n, m = len(x), len(x[0])

    def lse(v):
        top = max(v)
        return top + math.log(sum(math.exp(a - top) for a in v))

    ce = [[lse(x[i][j]) - x[i][j][y[i]] for j in range(m)] for i in range(n)]
    energy = [[1.0 / (1.0 + math.exp(lse(x[i][j]))) for j in range(m)] for i in range(n)]
    l_ce = 0.0
    for tau in thresholds:
        total = 0.0
        for i in range(n):
            m_star = next((j + 1 for j in range(m - 1) if energy[i][j] < tau), m)
            b = beta if swm else 0.0
            e = [math.exp(-b * abs((j + 1) - m_star)) for j in range(m)]
            total += sum(e[j] / sum(e) * ce[i][j] for j in range(m))
        l_ce += total / n / len(thresholds)
    if not osc:
        return l_ce
    hinges = []
    for j in range(m - 1):
        right = [energy[i][j] for i in range(n) if max(range(len(x[i][j])), key=lambda c: x[i][j][c]) == y[i]]
        wrong = [energy[i][j] for i in range(n) if max(range(len(x[i][j])), key=lambda c: x[i][j][c]) != y[i]]
        if right and wrong:
            hinges.append(max(0.0, sum(right) / len(right) - sum(wrong) / len(wrong) + margin))
    return l_ce + alpha * (sum(hinges) / len(hinges) if hinges else 0.0)


def test_cosee_loss_by_hand():
    torch.manual_seed(1)
    logits = torch.randn(6, 3, 2, dtype=torch.float64) * 2
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    x, y = logits.tolist(), labels.tolist()
    thresholds, beta = [0.05, 0.2, 0.5], 1.5
    e = torch.sigmoid(-torch.logsumexp(logits, -1))
    assert len({int((e[:, :2] < t).any(1).sum()) for t in thresholds}) > 1  # thresholds send samples out differently
    got = cosee_loss(logits, labels, thresholds, beta, "energy", alpha=0.1, margin=0.3)
    assert got.item() == pytest.approx(_cosee_by_loops(x, y, thresholds, beta, 0.1, 0.3), rel=1e-6)
    # ablations
    for swm, osc in ((True, False), (False, True), (False, False)):
        got = cosee_loss(logits, labels, thresholds, beta, alpha=0.1, margin=0.3, swm=swm, osc=osc)
        assert got.item() == pytest.approx(_cosee_by_loops(x, y, thresholds, beta, 0.1, 0.3, swm, osc), rel=1e-6)
    beta0 = cosee_loss(logits, labels, thresholds, 0.0, swm=True, osc=False)
    assert beta0.item() == pytest.approx(_cosee_by_loops(x, y, thresholds, 0.0, 0.1, 0.3, osc=False), rel=1e-6)


def test_cosee_threshold_range_and_beta_schedule():
    torch.manual_seed(0)
    s = build_strategy("cosee")
    assert (s.lo, s.hi) == (0.0, 1.0)
    logits = torch.randn(6, 4, 2)
    labels = torch.randint(0, 2, (6,))
    _, logs = s.loss(logits, labels, _ctx(step=5, total=10))
    assert logs["beta"] == pytest.approx(5.0)
    _, logs = s.loss(logits * 2, labels, _ctx(step=0, total=10))
    assert logs["beta"] == 0.0
    e = torch.sigmoid(-torch.logsumexp(torch.cat([logits, logits * 2])[:, :-1], -1))
    s.on_epoch_end(0)
    assert s.lo == pytest.approx(e.min().item()) and s.hi == pytest.approx(e.max().item())
    st = s.state_dict()
    s2 = build_strategy("cosee")
    s2.load_state_dict(st)
    assert (s2.lo, s2.hi) == (s.lo, s.hi)
