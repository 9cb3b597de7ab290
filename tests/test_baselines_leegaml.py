"""LeeBERT-style and GAML-BERT-style methods: the "minimal tests" of the baselines' specification
(sections 2f and 3f), their held-out split, their gradient hooks in the trainer, simulation ==
true early exit for their exits, save / load and bit-exact resume, and an end-to-end CLI run.

Oracles are independent of the code under test: hand-computed tensors, per-layer / per-pair loops
with ``F.cross_entropy`` / ``F.kl_div``, the exact hyper-gradient by double back-propagation (the
method uses a finite difference) and the projection in float64 NumPy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from eebench.methods.gaml_bert import mutual_kd, project_kd
from eebench.methods.leebert import LossWeights, leebert_terms, teacher_mask
from eebench.model.backbone import MultiExitModel
from eebench.strategy import StepContext, build_strategy, exit_kd_matrix
from tests.conftest import interrupted_at_step, padded_batch, tiny_model
from tests.test_training import _train, toy  # noqa: F401 - toy is a fixture

CTX = StepContext(step=0, total_steps=1, epoch=0)


def _hand_ce(logits, labels):
    return [F.cross_entropy(logits[:, m], labels) for m in range(logits.shape[1])]


def _hand_kl(logits, t, m, temp=1.0):
    """T^2 mean_n KL(softmax(z_t/T) || softmax(z_m/T)), teacher detached, by F.kl_div."""
    return F.kl_div(F.log_softmax(logits[:, m] / temp, -1), F.softmax(logits[:, t].detach() / temp, -1),
                    reduction="batchmean") * temp**2


# ----------------------------------------------------------------------------- shared KD term


def test_kd_matrix_matches_kl_div_and_is_zero_for_identical_exits():
    logits = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0)) * 3
    kd = exit_kd_matrix(logits, 2.0)
    for t in range(4):
        for m in range(4):
            assert kd[t, m].item() == pytest.approx(_hand_kl(logits, t, m, 2.0).item(), abs=1e-6)
    same = torch.randn(5, 1, 3).expand(5, 4, 3)
    assert exit_kd_matrix(same).abs().max().item() == 0.0
    assert mutual_kd(same).item() == 0.0


def test_teacher_gets_no_gradient_from_kd():
    logits = torch.randn(4, 3, 2, requires_grad=True)
    w = torch.zeros(3, 3)
    w[2, 0] = 1.0  # exit 3 teaches exit 1
    (w * exit_kd_matrix(logits)).sum().backward()
    assert logits.grad[:, 2].abs().sum().item() == 0.0  # the teacher
    assert logits.grad[:, 0].abs().sum().item() > 0.0  # the student


# ----------------------------------------------------------------------------- LeeBERT (2f)


def test_leebert_teacher_sets_and_initial_weights():
    assert teacher_mask(3, "lle").int().tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]  # [t, m]: t > m
    assert teacher_mask(3, "lae").int().tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    for weighting in ("softmax", "softplus"):
        w_ce, w_kd = LossWeights(3, "lle", weighting)()
        assert w_ce.tolist() == pytest.approx([1.0, 1.0, 1.0])  # uniform: vanilla's CE at the start
        # every student's teachers share weight 1: exit 1 has teachers 2, 3; exit 2 has 3; exit 3 none
        torch.testing.assert_close(w_kd, torch.tensor([[0, 0, 0], [0.5, 0, 0], [0.5, 1, 0]]))
    lw = LossWeights(3, "lae")
    with torch.no_grad():
        lw.omega_ce.copy_(torch.tensor([0.0, math.log(2), 0.0]))
        lw.omega_kd[1, 0] = math.log(3)
    w_ce, w_kd = lw()
    assert w_ce.tolist() == pytest.approx([0.75, 1.5, 0.75])  # 3 softmax: 3 * (1, 2, 1) / 4
    assert w_kd[:, 0].tolist() == pytest.approx([0.0, 0.75, 0.25])


def test_leebert_under_lle_the_deepest_exit_gets_no_kd_gradient():
    model = tiny_model("bert", pooling="mean", seed=2)
    s = build_strategy("leebert-lle")
    model.attach(s)
    logits = torch.randn(6, model.num_layers, 2, requires_grad=True)
    _, w_kd = s.weights()
    (w_kd.detach() * exit_kd_matrix(logits)).sum().backward()
    assert logits.grad[:, -1].abs().sum().item() == 0.0
    assert all(logits.grad[:, m].abs().sum().item() > 0 for m in range(model.num_layers - 1))


def test_leebert_with_unit_weights_and_no_kd_is_vanilla():
    model = tiny_model("bert", pooling="mean", seed=3).train()
    s = build_strategy("leebert", {"kd_weight": 0.0})
    model.attach(s)
    ids, mask = padded_batch(6, 8)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    out = model(ids, mask)
    loss, _ = s.compute_loss(out, labels, CTX)
    assert loss.item() == pytest.approx(sum(_hand_ce(out.logits, labels)).item(), rel=1e-6)
    # with KD: sum CE + sum over students of the mean KL over its teachers (LAE, uniform start)
    s2 = build_strategy("leebert", {"kd_weight": 0.5})
    model.attach(s2)
    loss2, _ = s2.compute_loss(out, labels, CTX)
    m = model.num_layers
    kd = sum(_hand_kl(out.logits, t, j) for j in range(m) for t in range(m) if t != j) / (m - 1)
    assert loss2.item() == pytest.approx((sum(_hand_ce(out.logits, labels)) + 0.5 * kd).item(), rel=1e-5)


def _hyper_setup(seed=5):
    model = tiny_model("bert", pooling="mean", seed=seed)  # eval: no dropout, one function for the oracle
    s = build_strategy("leebert", {"variant": "lle"})
    model.attach(s)
    with torch.no_grad():  # weights away from uniform so that every term matters
        g = torch.Generator().manual_seed(seed)
        model.extras["loss_weights"].omega_ce.copy_(torch.randn(model.num_layers, generator=g))
        model.extras["loss_weights"].omega_kd.copy_(torch.randn(model.num_layers, model.num_layers, generator=g))
    ids, mask = padded_batch(6, 9, seed=1)
    ids2, mask2 = padded_batch(5, 7, seed=2)
    inner = [({"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 1, 1, 0, 1, 0]), 1.0)]
    outer = [({"input_ids": ids2, "attention_mask": mask2}, torch.tensor([1, 1, 0, 0, 1]), 1.0)]
    theta = {n: p for n, p in model.named_parameters() if not n.startswith("extras.")}
    return model, s, theta, inner, outer


def _exact_hypergradient(model, theta, inner, outer, xi):
    """d/dOmega sum_m CE_m(theta - xi grad_theta L_in(theta, Omega); outer), by double backward."""
    lw = model.extras["loss_weights"]
    w_ce, w_kd = lw()
    (x, y, _), = inner
    z = functional_call(model, theta, args=(), kwargs=x).logits
    m = z.shape[1]
    l_in = sum(w_ce[j] * c for j, c in enumerate(_hand_ce(z, y)))
    l_in = l_in + sum(w_kd[t, j] * _hand_kl(z, t, j) for t in range(m) for j in range(m) if t != j)
    grads = torch.autograd.grad(l_in, list(theta.values()), create_graph=True, allow_unused=True)
    primed = {n: p if g is None else p - xi * g for (n, p), g in zip(theta.items(), grads, strict=True)}
    (x2, y2, _), = outer
    z2 = functional_call(model, primed, args=(), kwargs=x2).logits
    return torch.autograd.grad(sum(_hand_ce(z2, y2)), [lw.omega_ce, lw.omega_kd])


def test_leebert_omega_gradient_flows_only_through_the_unrolled_step():
    model, s, theta, inner, outer = _hyper_setup()
    lw = model.extras["loss_weights"]
    # The outer loss does not depend on Omega at all: no path but theta'.
    (x2, y2, _), = outer
    direct = torch.autograd.grad(sum(_hand_ce(model(**x2).logits, y2)), [lw.omega_ce], allow_unused=True)
    assert direct == (None,)
    g_inner = s.inner_gradient(theta, inner)
    zero = s.hypergradient(theta, g_inner, inner, outer, xi=0.0)
    assert all(z.abs().sum().item() == 0.0 for z in zero)
    xi = 0.05
    got = s.hypergradient(theta, g_inner, inner, outer, xi)
    want = _exact_hypergradient(model, theta, inner, outer, xi)
    for a, b in zip(got, want, strict=True):
        assert b.abs().max().item() > 1e-5  # the unrolled path carries a gradient
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3 * b.abs().max().item())
    # LLE: omega_kd entries where t does not teach m get exactly no gradient
    assert got[1][~teacher_mask(model.num_layers, "lle")].abs().sum().item() == 0.0


def test_leebert_inner_gradient_is_the_weighted_loss_gradient():
    model, s, theta, inner, _ = _hyper_setup(seed=6)
    got = s.inner_gradient(theta, inner)
    (x, y, _), = inner
    out = model(**x)
    w_ce, w_kd = (w.detach() for w in s.weights())
    ce, kd = leebert_terms(out.logits, y, 1.0)
    want = torch.autograd.grad((w_ce * ce).sum() + (w_kd * kd).sum(), list(theta.values()), allow_unused=True)
    assert sum(b is not None for b in want) > 10
    for (n, p), b in zip(theta.items(), want, strict=True):
        torch.testing.assert_close(got[n], torch.zeros_like(p) if b is None else b)


def test_leebert_held_out_split_is_seeded_disjoint_and_train_only(toy):  # noqa: F811
    from eebench.training.trainer import TrainConfig, Trainer

    path, tok, spec, train, dev = toy

    def split(seed):
        model = tiny_model("bert", pooling="mean")
        s = build_strategy("leebert", {"heldout": 0.25, "heldout_seed": seed})
        tr = Trainer(model, s, TrainConfig(progress=False, device="cpu"), tok, spec)
        kept = tr._hold_out(train, 8)
        return [tuple(r) for r in kept["input_ids"]], [tuple(r) for r in s.held_out_data.rows["input_ids"]]

    kept, held = split(0)
    assert (kept, held) == split(0)  # deterministic
    assert split(1)[1] != held  # seeded
    assert len(held) == 24 and len(kept) == 72
    rows = [tuple(r) for r in train["input_ids"]]
    assert sorted(kept + held) == sorted(rows)  # a partition of the training rows
    dev_only = {tuple(r) for r in dev["input_ids"]} - set(rows)
    assert dev_only and not dev_only & set(held)


def test_leebert_trains_its_weights_in_the_trainer_and_resumes_bit_exact(toy, tmp_path, monkeypatch):  # noqa: F811
    full, s_full, res = _train(toy, "leebert", out=tmp_path / "a", epochs=2, checkpoint_every=2)
    lw = full.extras["loss_weights"]
    assert not torch.equal(lw.omega_ce, torch.zeros_like(lw.omega_ce))  # Omega learned
    assert res.steps == 2 * 3 and s_full.heldout_batches == 6  # 48 of 96 rows held out; one D2 batch a step
    interrupted_at_step(monkeypatch, 5, lambda: _train(toy, "leebert", out=tmp_path / "b", epochs=2, checkpoint_every=2))
    resumed, s_res, res = _train(toy, "leebert", out=tmp_path / "b", epochs=2, checkpoint_every=2, resume=True)
    assert res.resumed_from_step == 4 and s_res.heldout_batches == 6
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- GAML-BERT (3f)


def test_gaml_projection_hand_cases():
    (p,) = project_kd([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])])
    assert p.tolist() == [0.0, 1.0]
    assert (torch.tensor([1.0, 0.0]) + p).tolist() == [1.0, 1.0]  # the update g_CE + g_KD'
    (p,) = project_kd([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])])
    assert p.tolist() == [1.0, 1.0]  # aligned: unchanged
    (p,) = project_kd([torch.zeros(2)], [torch.tensor([-1.0, 1.0])])
    assert p.tolist() == [-1.0, 1.0]  # no CE direction: nothing to project on


@pytest.mark.parametrize("per_tensor", [False, True])
def test_gaml_projection_never_opposes_ce_on_random_gradients(per_tensor):
    g = torch.Generator().manual_seed(0)
    opposed = 0
    for trial in range(200):
        shapes = [(3, 4), (5,), (2, 2, 2)]
        ce = [torch.randn(s, generator=g) * float(torch.rand(1, generator=g) * 10) for s in shapes]
        kd = [torch.randn(s, generator=g) - 0.5 * c for s, c in zip(shapes, ce, strict=True)]
        out = project_kd(ce, kd, per_tensor)
        units = list(zip(ce, kd, out, strict=True)) if per_tensor else [
            (torch.cat([c.flatten() for c in ce]), torch.cat([k.flatten() for k in kd]),
             torch.cat([o.flatten() for o in out]))]
        for c, k, o in units:
            c64, k64, o64 = c.double().numpy().ravel(), k.double().numpy().ravel(), o.double().numpy().ravel()
            before = float(k64 @ c64)
            after = float(o64 @ c64)
            assert after >= -1e-5 * np.linalg.norm(c64) * np.linalg.norm(k64), (trial, before, after)
            if before < 0:
                opposed += 1
                assert after == pytest.approx(0.0, abs=1e-5 * np.linalg.norm(c64) * np.linalg.norm(k64))
                want = k64 - before / (c64 @ c64) * c64  # the projection in float64 by hand
                np.testing.assert_allclose(o64, want, rtol=1e-5, atol=1e-6)
            else:
                assert np.array_equal(o64, k64)
    assert opposed > 50  # the case that matters was exercised


def _gaml_oracle_grads(model, ids, mask, labels):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = model(ids, mask)
    m = model.num_layers
    g_ce = torch.autograd.grad(sum(_hand_ce(out.logits, labels)), [p for _, p in params], retain_graph=True,
                               allow_unused=True)
    kd = sum(_hand_kl(out.logits, t, j) for t in range(m) for j in range(m) if t != j) / (m * (m - 1))
    g_kd = torch.autograd.grad(kd, [p for _, p in params], retain_graph=True, allow_unused=True)
    return params, out, kd, g_ce, g_kd


@pytest.mark.parametrize("projection", ["global", "per-tensor"])
def test_gaml_real_step_gradient_is_ce_plus_projected_kd(projection):
    model = tiny_model("bert", pooling="mean", seed=7)  # eval: the oracle sees the same pass
    s = build_strategy("gaml-bert", {"projection": projection, "kd_weight": 0.7})
    model.attach(s)
    with torch.no_grad():  # exit 1 leans to the label (1), the others confidently to class 0: their
        for i, lin in enumerate(model.heads.classifiers):  # KD pulls exit 1 away from its label
            lin.bias.copy_(torch.tensor([-0.7, 0.7] if i == 0 else [3.0, -3.0]))
    if projection == "global":
        # Over the whole model a confidently wrong teacher's own CE and KD agree and dominate; with
        # only exit 1's head learning (a phase may freeze the rest) KD opposes CE globally.
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("heads.classifiers.0."))
    labels = torch.ones(8, dtype=torch.long)
    ids, mask = padded_batch(8, 10, seed=3)
    params, out, kd, g_ce, g_kd = _gaml_oracle_grads(model, ids, mask, labels)
    dot = sum(float((c.double() * k.double()).sum()) for c, k in zip(g_ce, g_kd, strict=True)
              if c is not None and k is not None)
    assert dot < 0 or projection == "per-tensor"  # KD opposes CE over all learning parameters
    loss, logs = s.compute_loss(out, labels, StepContext(0, 1, 0, loss_scale=1.0))
    assert loss.item() == pytest.approx(sum(_hand_ce(out.logits, labels)).item() + 0.7 * kd.item(), rel=1e-5)
    loss.backward()
    s.on_gradients(CTX)
    units = []
    for (n, p), c, k in zip(params, g_ce, g_kd, strict=True):
        if c is None:
            assert p.grad is None, n
            continue
        k = torch.zeros_like(c) if k is None else k
        units.append((n, p, c.double().numpy().ravel(), k.double().numpy().ravel()))
    if projection == "global":
        c_all = np.concatenate([u[2] for u in units])
        k_all = np.concatenate([u[3] for u in units])
        dot = float(k_all @ c_all)
        coef = dot / float(c_all @ c_all) if dot < 0 else 0.0
        coefs = [coef] * len(units)
    else:
        coefs = [min(float(k @ c), 0.0) / float(c @ c) if float(c @ c) > 0 else 0.0 for _, _, c, k in units]
    assert any(c != 0.0 for c in coefs)  # this step did have KD opposing CE somewhere
    new_kd = []
    for (n, p, c, k), coef in zip(units, coefs, strict=True):
        want = c + 0.7 * (k - coef * c)
        np.testing.assert_allclose(p.grad.double().numpy().ravel(), want, rtol=1e-4, atol=1e-7, err_msg=n)
        new_kd.append((p.grad.double().numpy().ravel() - c) / 0.7)
    if projection == "global":
        c_all = np.concatenate([u[2] for u in units])
        assert float(np.concatenate(new_kd) @ c_all) >= -1e-6 * np.linalg.norm(c_all) ** 2
    else:
        for (_, _, c, _), k in zip(units, new_kd, strict=True):
            assert float(k @ c) >= -1e-6 * max(float(c @ c), 1e-12)


def test_gaml_projects_once_per_optimiser_step_on_accumulated_gradients(toy, monkeypatch):  # noqa: F811
    from eebench.methods.gaml_bert import GamlBert

    seen = []
    real = GamlBert.on_gradients

    def spy(self, ctx):
        seen.append((ctx.step, len(self._g_kd) > 0))
        return real(self, ctx)

    monkeypatch.setattr(GamlBert, "on_gradients", spy)
    _, _, res = _train(toy, "gaml-bert", epochs=1, micro_batch_size=8)  # 2 micro-batches per step
    assert res.steps == 6 and seen == [(k, True) for k in range(6)]


# ----------------------------------------------------------------------------- exits, modules, CLI


@pytest.mark.parametrize("method,policy", [("leebert", "patience"), ("gaml-bert", "patience"),
                                           ("leebert-lle", "entropy")])
def test_exits_simulation_equals_true_early_exit(method, policy):
    from tests.test_baselines import test_method_policies_simulation_equals_true_early_exit as check

    check(method, policy)


def test_leebert_weights_are_saved_and_restored(tmp_path):
    model = tiny_model("bert", pooling="mean", seed=1)
    model.attach(build_strategy("leebert-lle"))
    with torch.no_grad():
        model.extras["loss_weights"].omega_kd.normal_()
    model.save(tmp_path / "m")
    loaded = MultiExitModel.load(tmp_path / "m")
    assert loaded.config.method == "leebert-lle"
    for a, b in zip(model.extras["loss_weights"](), loaded.extras["loss_weights"](), strict=True):
        assert torch.equal(a, b)


def test_cli_run_list_report_and_identity(tmp_path, tiny_backbone_dir, toy_task, capsys):
    import mlflow

    from eebench.cli import main
    from eebench.runs.results import find_results
    from tests.test_cli import _run_args

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "leebert" in listed and "leebert-lle" in listed and "gaml-bert" in listed
    out = tmp_path / "runs"
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "leebert,gaml-bert,vanilla",
                          "--signals", "patience,entropy")) == 0
    results = {r.method: r for r in find_results(out)}
    assert set(results) == {"leebert", "gaml-bert", "vanilla"}
    for r in results.values():
        assert set(r.sweeps) == {"patience", "entropy"}
        assert all(c["exit_mismatches"] == 0 for sw in r.sweeps.values() for c in sw.confirm)
    assert results["leebert"].training["hparams"]["heldout_seed"] == 0
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eebench-toy"], output_format="pandas")
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert set(children["params.method"]) == {"leebert", "gaml-bert", "vanilla"}
    lee = children[children["params.method"] == "leebert"].iloc[0]
    assert lee["params.method_params.heldout"] == "0.5" and lee["params.method_params.clo"] == "True"
    assert children[children["params.method"] == "gaml-bert"].iloc[0]["params.method_params.projection"] == "global"
    capsys.readouterr()
    assert main(["report", "--results", str(out), "--signal", "patience", "--out", str(tmp_path / "rep")]) == 0
    report = capsys.readouterr().out
    assert "leebert" in report and "gaml-bert" in report
    # another held-out draw is another cell (it changes the numbers)
    assert main(_run_args(toy_task, tiny_backbone_dir, out, "--methods", "leebert", "--signals", "patience",
                          "leebert.heldout_seed=1")) == 0
    lees = [r for r in find_results(out) if r.method == "leebert"]
    assert len(lees) == 2 and len({r.cell_id for r in lees}) == 2
