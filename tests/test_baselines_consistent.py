"""ConsistentEE: the "minimal tests" of the baselines' specification (section 7f), its loss against a
plain-loop re-implementation, its exit policy (simulation == true early exit in every mode), its
modules (saved / restored), seeded REINFORCE sampling (bit-exact resume), and the fixed operating
point that its router declares, through every report path (sweep, held-out choice, tables, Table
2, Pareto plots, ``eebench bench``).

Expected values are computed by hand from the specification, never by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from eebench.exits.operating import SplitSpec, Target, held_out, pick_threshold_held_out
from eebench.exits.policies import get_policy
from eebench.exits.rule import exit_layers_from_scores, predictions_at_exit, sweep, threshold_grid
from eebench.inference import EarlyExitEngine, one_pass_scores, pick_threshold
from eebench.methods.consistentee import PiExit, PolicyNet, advantages, memorized_layer, rewards, trajectory
from eebench.model.backbone import MultiExitConfig, MultiExitModel
from eebench.strategy import StepContext, build_strategy
from tests.conftest import checkpoint_state, interrupted_at_step, padded_batch, tiny_model

# ----------------------------------------------------------------------------- BASELINES.md 7f


def test_memorized_layer():
    c = torch.tensor([[0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]).bool()
    assert memorized_layer(c).tolist() == [4, 1, 6, 6]


def test_advantages_sum_to_zero_over_copies():
    r = torch.tensor([1.0, 3.0, -2.0, 0.0, 4.0, 8.0])  # two rows x K = 3 copies, adjacent
    a = advantages(r, 3)
    assert a.tolist() == pytest.approx([1 / 3, 7 / 3, -8 / 3, -4.0, 0.0, 4.0])  # r - 2/3, r - 4
    assert a.view(2, 3).sum(1).abs().max().item() < 1e-6


def test_exit_layer_of_constant_policies():
    m = 6
    pol = PiExit()
    for p, want in ((0.9, 1), (0.1, m)):
        pi = torch.full((3, m), p, dtype=torch.float64)
        assert exit_layers_from_scores(pi, pol, [pol.fixed_threshold]).tolist() == [[want] * 3]
        t, _ = trajectory(pi, pi > 0.5)  # the greedy rollout of training agrees
        assert t.tolist() == [want] * 3


def test_trajectory_log_prob():
    pi = torch.tensor([[0.2, 0.7, 0.4], [0.2, 0.3, 0.4]], dtype=torch.float64)
    t, logp = trajectory(pi, pi > 0.5)
    assert t.tolist() == [2, 3]
    assert logp[0].item() == pytest.approx(math.log(0.8) + math.log(0.7))
    # no layer says exit: every layer, the last included, continued
    assert logp[1].item() == pytest.approx(math.log(0.8) + math.log(0.7) + math.log(0.6))
    # an explicit exit at the last layer
    t, logp = trajectory(pi[1:], torch.tensor([[False, False, True]]))
    assert t.tolist() == [3] and logp[0].item() == pytest.approx(math.log(0.8) + math.log(0.7) + math.log(0.4))


def test_rewards_by_hand():
    ce = torch.tensor([0.5, 2.0])
    t = torch.tensor([2, 6])
    assert rewards(ce, t, 6).tolist() == [-0.5, -2.0]
    assert rewards(ce, t, 6, "depth", 0.1).tolist() == pytest.approx([-0.7, -2.6])
    # hardness: m = 1 (easy: all right) -> full depth penalty x (1 - 1/6); m = 6 -> none
    got = rewards(ce, t, 6, "hardness", 0.1, torch.tensor([1, 6]))
    assert got.tolist() == pytest.approx([-0.5 - 0.1 * 2 * (5 / 6), -2.0])


def test_policy_net_parameter_count():
    # BASELINES.md 7a: 24,641 per layer at H = 768, 295,692 for 12 layers
    assert sum(p.numel() for p in PolicyNet(768).parameters()) == 24_641


def _model(seed: int = 3, **params) -> tuple[MultiExitModel, object]:
    strategy = build_strategy("consistentee", params or None)
    model = tiny_model("bert", pooling="mean", seed=seed)
    model.attach(strategy)
    return model, strategy


def test_policy_loss_by_hand():
    """Phase 2 (policy) and phase 3 (joint) losses against a plain loop over rows and copies."""
    k = 3
    model, strategy = _model(copies=k)
    model.eval()  # no dropout: the loop below sees the same numbers
    ids, mask = padded_batch(4, 9)
    labels = torch.tensor([0, 1, 1, 0]).repeat_interleave(k)
    out = model(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0))
    n, m, _ = out.logits.shape
    pol = model.extras["policy"]
    r, logp, ce_t = [], [], []
    for i in range(n):
        lp, t = 0.0, m
        for j in range(m):
            p = pol[j](out.pooled[i, j]).item()
            if p > 0.5:
                lp += math.log(p)
                t = j + 1
                break
            lp += math.log(1 - p)
        ce = -torch.log_softmax(out.logits[i, t - 1], -1)[labels[i]].item()
        r.append(-ce)
        logp.append(lp)
        ce_t.append(ce)
    l_pi = 0.0
    for i in range(n):
        base = sum(r[(i // k) * k:(i // k + 1) * k]) / k
        l_pi -= (r[i] - base) * logp[i] / n
    for phase, want in ((1, l_pi), (2, sum(ce_t) / n + l_pi)):
        loss, _ = strategy.compute_loss(out, labels, StepContext(0, 1, 0, phase=phase, copies=k))
        assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    # warm-up: PABEE weights sum_i i CE_i / sum_i i
    ce = [sum(-torch.log_softmax(out.logits[i, j], -1)[labels[i]].item() for i in range(n)) / n for j in range(m)]
    loss, _ = strategy.compute_loss(out, labels, StepContext(0, 1, 0, phase=0))
    assert loss.item() == pytest.approx(sum((j + 1) * ce[j] for j in range(m)) / sum(range(1, m + 1)), rel=1e-5)


# ----------------------------------------------------------------------------- trainer


@pytest.fixture
def toy(tiny_backbone_dir, toy_task):
    from transformers import AutoTokenizer

    from eebench.data import get_task, load_task, tokenize

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    spec = get_task(str(toy_task))
    train = tokenize(load_task(str(toy_task), "train"), tok, spec, 32)
    dev = tokenize(load_task(str(toy_task), "dev"), tok, spec, 32).select(range(16))
    return tiny_backbone_dir, tok, spec, train, dev


def _train(toy, params, out=None, resume=False, on_epoch=None, **kw):
    from eebench.training.trainer import TrainConfig, Trainer, seed_everything

    path, tok, spec, train, dev = toy
    seed_everything(5)
    model = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2, pooling="mean"))
    strategy = build_strategy("consistentee", params)
    cfg = TrainConfig(lr=3e-3, epochs=1, batch_size=16, seed=5, progress=False, device="cpu", **kw)
    trainer = Trainer(model, strategy, cfg, tok, spec, out_dir=out, on_epoch=on_epoch)
    res = trainer.train(train, dev, resume=resume)
    return model, strategy, res


def test_phases_freeze_what_the_code_freezes(toy):
    """Warm-up: everything but the policy networks; policy phase: only them; joint: everything."""
    snaps = []
    model_ref = {}

    def on_epoch(n, entry):
        snaps.append({k: v.detach().clone() for k, v in model_ref["m"].state_dict().items()})

    from eebench.training.trainer import TrainConfig, Trainer, seed_everything

    path, tok, spec, train, dev = toy
    seed_everything(5)
    model = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2, pooling="mean"))
    model_ref["m"] = model
    strategy = build_strategy("consistentee", {"copies": 2})
    model.attach(strategy)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copies_seen = []
    orig = strategy.compute_loss

    def spy(out, labels, ctx):
        copies_seen.append((ctx.phase, ctx.copies, out.logits.shape[0], len(labels), ctx.rows.shape[0]))
        return orig(out, labels, ctx)

    strategy.compute_loss = spy
    res = Trainer(model, strategy, TrainConfig(lr=3e-3, epochs=1, batch_size=16, seed=5, progress=False, device="cpu"),
                  tok, spec, on_epoch=on_epoch).train(train, dev)
    assert [h["phase"] for h in res.history] == ["warmup", "policy", "joint"]
    assert {c for c in copies_seen if c[0] == 0} == {(0, 1, 16, 16, 16)}
    assert {c for c in copies_seen if c[0] > 0} == {(1, 2, 32, 32, 32), (2, 2, 32, 32, 32)}
    warm, pol, joint = snaps

    def changed(a, b):
        return {k for k in a if not torch.equal(a[k], b[k])}

    is_policy = lambda k: k.startswith("extras.policy.")  # noqa: E731
    c0, c1, c2 = changed(start, warm), changed(warm, pol), changed(pol, joint)
    assert c0 and not any(is_policy(k) for k in c0)
    assert c1 and all(is_policy(k) for k in c1)  # BASELINES.md 7f.5: only the policy parameters change
    assert any(k.startswith("backbone.") for k in c2) and any(is_policy(k) for k in c2)


def test_policy_group_learning_rate(toy):
    from eebench.training.trainer import TrainConfig, Trainer

    path, tok, spec, _, _ = toy
    model = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2, pooling="mean"))
    strategy = build_strategy("consistentee", {"policy_lr": 7e-4})
    model.attach(strategy)
    trainer = Trainer(model, strategy, TrainConfig(lr=1e-3, progress=False, device="cpu"), tok, spec)
    opt = trainer._optimizer()
    ids = {id(p) for p in model.extras["policy"].parameters()}
    assert (7e-4, ids) in [(g["lr"], {id(p) for p in g["params"]}) for g in opt.param_groups]


def test_sampled_rollouts_are_seeded_and_resume_bit_exact(toy, tmp_path, monkeypatch):
    """Sampled actions (paper reading) + hardness reward (extra state: the memorised layers): the
    same seed gives the same model, and a kill in the joint phase resumes bit for bit."""
    params = {"copies": 2, "sample_actions": True, "reward": "hardness", "alpha": 0.5}
    full, strat_a, _ = _train(toy, params, out=tmp_path / "a", checkpoint_every=3)
    again, _, _ = _train(toy, params)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values(), strict=True))
    # an oracle for the memorised layers: the warm-up model's own correctness, looped by hand
    assert strat_a.memorized is not None and strat_a.memorized.shape == (len(toy[3]),)
    interrupted_at_step(monkeypatch, 17, lambda: _train(toy, params, out=tmp_path / "b", checkpoint_every=3))
    ckpt = tmp_path / "b" / "checkpoint"
    doc = checkpoint_state(ckpt)
    assert doc["state"]["step"] == 15 and doc["state"]["phase"] == 2  # inside the joint phase
    assert len(doc["strategy"]["memorized"]) == len(toy[3])
    resumed, strat_b, res = _train(toy, params, out=tmp_path / "b", checkpoint_every=3, resume=True)
    assert res.resumed_from_step == 15 and res.steps == 18
    assert torch.equal(strat_a.memorized, strat_b.memorized)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # greedy (the code) and sampled rollouts train different models
    greedy, _, _ = _train(toy, {**params, "sample_actions": False})
    assert not torch.equal(greedy.extras["policy"][0].net[0].weight, full.extras["policy"][0].net[0].weight)


def test_memorized_layers_come_from_the_warmup_model(toy):
    from eebench.training.trainer import collect_logits

    captured = {}
    from eebench.methods import consistentee as mod

    real = mod.ConsistentEE.on_phase_start

    def spy(self, index, phase, trainer, train_ds):
        if index == 1:  # before the policy phase: the model is the warm-up model
            logits, labels = collect_logits(trainer.model, train_ds, trainer.tokenizer)
            captured["want"] = []
            for i in range(len(labels)):
                right = [int(logits[i, j].argmax()) == int(labels[i]) for j in range(logits.shape[1])]
                m = len(right)
                for j in reversed(range(len(right))):  # from the last exit back to the first wrong one
                    if not right[j]:
                        break
                    m = j + 1
                captured["want"].append(m)
        return real(self, index, phase, trainer, train_ds)

    mod.ConsistentEE.on_phase_start = spy
    try:
        _, strategy, _ = _train(toy, {"copies": 2, "reward": "hardness"})
    finally:
        mod.ConsistentEE.on_phase_start = real
    assert strategy.memorized.tolist() == captured["want"]


# ----------------------------------------------------------------------------- exit policy, modules


def _spread_model(seed: int = 4) -> MultiExitModel:
    model = tiny_model("bert", num_labels=3, pooling="mean", seed=seed)
    model.attach(build_strategy("consistentee"))
    with torch.no_grad():  # spread values so that pi sits far from 0.5
        for lin in model.heads.classifiers:
            lin.weight.mul_(40)
        for p in model.extras.parameters():
            p.mul_(20)
    return model.eval()


def test_pi_exit_simulation_equals_true_early_exit():
    from tests.test_inference import make_examples, per_sample_layers

    model = _spread_model()
    exs = make_examples(16)
    logits, scores = one_pass_scores(model, exs, "pi-exit", batch_size=5)
    pol = get_policy("pi-exit", model=model)
    choice = pick_threshold(logits, pol, 2.0, scores=scores)
    assert choice.threshold == 0.5 and choice.margin > 1e-6  # nothing chosen: the fixed point
    sim = exit_layers_from_scores(scores, pol, [0.5])[0]
    assert len(set(sim.tolist())) > 1
    preds = predictions_at_exit(logits, sim[None])[0]
    engine = EarlyExitEngine(model, "pi-exit", 0.5)
    for mode, b, srt in [("single", 1, False), ("batched", 4, False), ("batched", 6, True),
                         ("streaming", 3, False), ("streaming", 5, True)]:
        calls = []
        out = engine.run(exs, mode, b, sort_by_length=srt, on_layer=lambda la, idx, c=calls: c.append((la, list(idx))))
        assert out.exit_layers.tolist() == sim.tolist(), (mode, b)
        assert out.predictions.tolist() == preds.tolist(), (mode, b)
        assert per_sample_layers(calls, len(exs)) == [list(range(1, int(e) + 1)) for e in sim]


def test_policy_modules_are_saved_and_restored(tmp_path):
    model = _spread_model()
    model.save(tmp_path / "m")
    loaded = MultiExitModel.load(tmp_path / "m").eval()
    assert loaded.config.method == "consistentee" and len(loaded.extras["policy"]) == model.num_layers
    ids, mask = padded_batch(4, 8)
    with torch.no_grad():
        a, b = model(ids, mask), loaded(ids, mask)
        assert torch.equal(get_policy("pi-exit", model=model).scores(a), get_policy("pi-exit", model=loaded).scores(b))


# ----------------------------------------------------------------------------- fixed operating point


def _fixed_case():
    """Logits [N, 3, 2] and policy values: rows 0-3 leave at layer 1 (pi > 0.5), the rest at 3."""
    n = 40
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    logits = torch.randn(n, 3, 2, generator=g)
    scores = torch.full((n, 3), 0.2, dtype=torch.float64)
    scores[::4, 0] = 0.9  # every 4th row exits at layer 1 (both labels are represented)
    return logits, labels, scores


def test_fixed_policy_sweeps_one_point():
    logits, labels, scores = _fixed_case()
    pol = PiExit()
    assert threshold_grid(scores, pol, 100).tolist() == [0.5]
    sw = sweep(logits, labels, pol, scores=scores)
    n = len(labels)
    want = 3 * n / (1 * 10 + 3 * 30)  # Eq. 12 by hand: 10 rows at layer 1, 30 at layer 3
    assert len(sw.thresholds) == 1 and sw.speedups.tolist() == pytest.approx([want])


def test_fixed_policy_held_out_scores_its_one_point_and_says_if_the_target_is_met():
    logits, labels, scores = _fixed_case()
    pol = PiExit()
    split = SplitSpec(repeats=3)
    for target, met in ((1.1, 3.0), (2.0, 0.0)):
        from eebench.exits.operating import held_out_many

        op = held_out_many(logits, labels, pol, [Target(speedup=target)], split, scores=scores)[0]
        s = op.summary()
        assert s["fixed_point"] == 1.0 and s["met_target"] == met and s["reached"] == 3.0
        assert all(r["thresholds"] == [0.5] for r in op.repeats)
        # the evaluation figures are the fixed point's own (hand-computed from the exits)
        for r in op.repeats:
            assert 1.0 < r["eval_speedup"] < 2.0
    # the stored summary: the point's figures once, and per target how often it was met (no "at 2x")
    from eebench.exits.operating import sweep_summary

    summ, _ = sweep_summary(logits, labels, pol, [1.1, 2.0], split, scores=scores)
    assert not any("_at_" in k for k in summ)
    assert summ["heldout_met_1.1x"] == 1.0 and summ["heldout_met_2x"] == 0.0
    assert 1.0 < summ["heldout_speedup"] < 2.0 and summ["heldout_accuracy"] is not None
    thr, cal, ev, choice = pick_threshold_held_out(logits, labels, pol, Target(speedup=3.0), scores=scores)
    assert thr == 0.5 and choice["fixed"] and choice["met_target"] is False
    # a signal keeps its old behaviour: an unreachable target is refused
    from eebench.errors import EebenchError

    with pytest.raises(EebenchError, match="reaches"):
        pick_threshold_held_out(logits, labels, "energy", Target(speedup=50.0))
    assert "fixed_point" not in held_out(logits, labels, "energy", Target(speedup=1.2), split).summary()


@pytest.fixture(scope="module")
def consistent_run(tmp_path_factory, tiny_backbone_dir):
    from eebench.cli import main
    from tests.conftest import write_toy_task

    toy_task = write_toy_task(tmp_path_factory.mktemp("toy"))
    out = tmp_path_factory.mktemp("cee") / "runs"
    rc = main(["run", "--task", str(toy_task), "--model", str(tiny_backbone_dir), "--epochs", "1", "--batch-size", "16",
               "--lr", "3e-3", "--pooling", "mean", "--num-thresholds", "20", "--output", str(out),
               "--methods", "vanilla,consistentee", "--signals", "energy,pi-exit", "consistentee.copies=2"])
    assert rc == 0
    return out


def test_cli_run_list_mlflow_and_reports_show_a_point(consistent_run, tmp_path, capsys, monkeypatch):
    import matplotlib.axes
    from mlflow.tracking import MlflowClient

    from eebench.cli import main
    from eebench.runs.results import find_results

    cee = next(r for r in find_results(consistent_run) if r.method == "consistentee")
    sw = cee.sweeps["pi-exit"]
    assert len(sw.points) == 1 and sw.summary["fixed_threshold"] == 0.5 and sw.points[0]["threshold"] == 0.5
    assert cee.early_exit_exact is True
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "consistentee" in listed and "pi-exit" in listed and "fixed operating point" in listed
    client = MlflowClient(tracking_uri=f"sqlite:///{consistent_run}/mlflow.db")
    run = client.get_run(cee.mlflow_run_id)
    assert run.data.params["method_params.copies"] == "2" and run.data.params["method_params.reward"] == "ce"
    # the plots: the fixed point is drawn as markers only (no line), the others as curves
    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        drawn.append((kw.get("label"), kw.get("linestyle"), kw.get("marker")))
        return real_plot(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    sp = sw.points[0]["speedup"]
    for operating in ("heldout", "oracle"):
        capsys.readouterr()
        assert main(["report", "--results", str(consistent_run), "--out", str(tmp_path / operating),
                     "--operating", operating]) == 0
        text = capsys.readouterr().out
        main_rows = [ln for ln in text.splitlines() if ln.startswith("| consistentee")]
        # main table: its own column with the point's speed-up, marked; Table 2: its own row
        assert any("fixed point" in ln for ln in main_rows), text
        t2 = [ln for ln in text.splitlines() if ln.startswith("| consistentee") and "/ pi-exit" in ln]
        assert len(t2) == 1 and "fixed point" in t2[0]
        if operating == "oracle":
            assert f"{sp:.2f}x fixed point" in t2[0]
            assert f"{100 * sw.points[0]['accuracy']:.1f}" in t2[0]
        far = abs(sp - 2.0) > 0.1
        assert (", not 2x" in t2[0]) == far
    marks = [d for d in drawn if d[0] and "pi-exit" in d[0]]
    assert marks and all(d[1] == "none" and d[2] == "*" for d in marks)
    assert any(d[0] and "energy" in d[0] and d[1] not in (None, "none") for d in drawn)


def test_a_one_point_front_is_not_drawn_as_a_fixed_point(tmp_path, monkeypatch):
    """A tunable policy whose Pareto front is a single point (every other threshold dominated)
    gets a diamond; only a fixed operating point gets the star."""
    import matplotlib.axes

    from eebench.runs.plots import plot_pareto
    from eebench.runs.results import SignalSweep

    pt = {"threshold": 0.3, "speedup": 6.0, "accuracy": 0.56, "pareto": True, "exit_counts": [10, 0]}
    curves = {"a / entropy": SignalSweep(signal="entropy", points=[pt], summary={}),
              "b / pi-exit": SignalSweep(signal="pi-exit", points=[pt], summary={"fixed_threshold": 0.5})}
    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        drawn.append((kw.get("label"), kw.get("marker")))
        return real_plot(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot_pareto(curves, tmp_path / "p.png")
    assert ("a / entropy", "D") in drawn and ("b / pi-exit", "*") in drawn


def test_bench_uses_the_fixed_point(consistent_run, capsys):
    from eebench.cli import main
    from eebench.runs.results import find_results

    cell = next(d for d in (consistent_run / "toy").iterdir() if d.name.startswith("consistentee"))
    assert main(["bench", str(cell), "--signal", "pi-exit", "--target-speedup", "3.5", "--batch-size", "8",
                 "--repeats", "1", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "fixed operating point" in out
    r = next(r for r in find_results(consistent_run) if r.method == "consistentee")
    b = r.bench[-1]
    assert b["fixed_operating_point"] is True and b["operating_point"]["threshold"] == 0.5
    assert all(run["threshold"] == 0.5 for run in b["runs"])
