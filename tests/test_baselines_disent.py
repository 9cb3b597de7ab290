"""DisentangledEE: the "minimal tests" of the baselines' specification (section 6f), its patience
exit (simulation == true early exit in every mode, with its adapters and eval-mode BatchNorm), its
modules saved / restored, its two stages in the trainer and a bit-exact resume.

Expected values are computed by hand from the specification, never by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eebench.errors import EebenchError
from eebench.exits.policies import get_policy
from eebench.exits.rule import exit_layers_from_scores, predictions_at_exit
from eebench.inference import EarlyExitEngine, one_pass_scores, pick_threshold
from eebench.methods.disentangled import (
    EtfHead,
    ParallelAdapter,
    dot_regression,
    etf_matrix,
    stage2_weights,
)
from eebench.model.backbone import MultiExitConfig, MultiExitModel
from eebench.strategy import StepContext, build_strategy
from eebench.training.trainer import TrainConfig, Trainer, seed_everything
from tests.conftest import checkpoint_state, interrupted_at_step, padded_batch, tiny_model
from tests.test_inference import make_examples, per_sample_layers
from tests.test_training import toy  # noqa: F401 - the tiny task as a fixture


def _disent(num_labels: int = 2, seed: int = 3, pooling: str = "mean", **params) -> MultiExitModel:
    model = tiny_model("bert", num_labels=num_labels, pooling=pooling, seed=seed)
    model.attach(build_strategy("disentangled", params or None))
    return model


def _warm_bn(model: MultiExitModel, rounds: int = 3) -> None:
    """A few train-mode passes so that every BatchNorm holds running statistics of its own."""
    model.train()
    with torch.no_grad():
        for r in range(rounds):
            model(*padded_batch(8, 10, seed=10 + r))
    model.eval()


# ----------------------------------------------------------------------------- 6f: the ETF


def test_etf_gram_matrix_is_a_simplex():
    for c, hidden in ((3, 16), (4, 32), (2, 8)):
        m = etf_matrix(hidden, c, torch.Generator().manual_seed(c)).double()
        gram = m.T @ m
        want = torch.full((c, c), -1.0 / (c - 1), dtype=torch.float64)
        want.fill_diagonal_(1.0)  # unit-norm columns, pairwise cosine -1/(C-1): -0.5 for C = 3
        assert torch.allclose(gram, want, atol=1e-6), (c, gram)
    m2 = etf_matrix(8, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(m2[:, 0], -m2[:, 1], atol=1e-7)  # C = 2: antipodal columns


def test_etf_is_a_buffer_without_gradient_and_is_saved(tmp_path):
    model = _disent(num_labels=3)
    heads = model.extras["etf"]
    params = {n for n, _ in model.named_parameters()}
    assert all(f"extras.etf.{i}.etf" not in params for i in range(model.num_layers))
    assert all(not h.etf.requires_grad for h in heads)
    assert {n.split(".", 3)[3] for n, _ in heads.named_parameters(prefix="extras.etf")} == {"bn.weight", "bn.bias"}
    model.train()
    out = model(*padded_batch(6, 8))
    F.cross_entropy(out.logits[:, 0], torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert heads[0].etf.grad is None and heads[0].bn.weight.grad is not None
    # Logits are cosines with unit vectors: inside [-1, 1].
    assert out.logits.abs().max().item() <= 1.0 + 1e-6
    sd = model.state_dict()
    assert "extras.etf.0.etf" in sd and "extras.etf.0.bn.running_mean" in sd


def test_etf_head_by_hand():
    head = EtfHead(4, 2, torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():
        head.bn.running_mean.copy_(torch.tensor([0.5, 0.0, -1.0, 2.0]))
        head.bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25, 1.0]))
        head.bn.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 0.5]))
        head.bn.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    x = torch.tensor([[1.5, 1.0, 0.0, 4.0]])
    eps = head.bn.eps
    y = [(1.5 - 0.5) / math.sqrt(4 + eps), 2 * 1.0 / math.sqrt(1 + eps), (0 + 1) / math.sqrt(0.25 + eps) + 1,
         0.5 * 2.0 / math.sqrt(1 + eps)]
    norm = math.sqrt(sum(v * v for v in y))
    etf = head.etf.tolist()
    want = [sum(y[k] / norm * etf[k][c] for k in range(4)) for c in range(2)]
    assert head(x)[0].tolist() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------- 6f: adapters, weights


def test_empty_adapter_equals_the_main_path():
    """Up = 0 and the LayerNorm of the layer: e_i = LN(ffn + a) = the layer's output (eval)."""
    model = _disent(seed=5, ln_init="full")
    from eebench.methods.disentangled import init_adapter_norms

    init_adapter_norms(model, "full")
    seen = []
    for ad in model.extras["adapters"]:
        with torch.no_grad():
            ad.up.weight.zero_()
            ad.up.bias.zero_()
        ad.register_forward_hook(lambda mod, inp, out: seen.append(out))
    ids, mask = padded_batch(5, 9)
    with torch.no_grad():
        out = model(ids, mask, hidden_states=True)
    assert len(seen) == model.num_layers - 1
    for i, e in enumerate(seen):
        assert torch.equal(e, out.hidden_states[i]), i


def test_adapter_by_hand():
    ad = ParallelAdapter(4, bottleneck=2, scaling=8.0, eps=1e-12)
    a, ffn = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    branch = 8.0 * (torch.relu(a @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias)
    s = branch + ffn + a
    want = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + 1e-12)
    assert torch.allclose(ad(a, ffn), want, atol=1e-5)
    assert sum(p.numel() for p in ParallelAdapter(768).parameters()) == 197_504 + 1_536


def test_main_path_is_the_backbone_layer():
    """The route runs each layer as its parts; the token states are the layer's own, bit for bit."""
    plain = tiny_model("bert", num_labels=2, pooling="mean", seed=2)
    model = _disent(seed=2)
    ids, mask = padded_batch(6, 11)
    with torch.no_grad():
        a, b = plain(ids, mask, hidden_states=True), model(ids, mask, hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert torch.equal(x, y)


def test_stage2_weights():
    assert stage2_weights(12).tolist() == pytest.approx([k / 66 for k in range(11, 0, -1)])
    assert stage2_weights(4).tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])


def test_losses_by_hand():
    model = _disent(num_labels=3, seed=4)
    strategy = model.stepper.route.strategy
    _warm_bn(model)
    ids, mask = padded_batch(5, 9)
    labels = torch.tensor([0, 2, 1, 1, 0])
    out = model(ids, mask)
    n, m, _ = out.logits.shape

    def ce(i, j):
        z = out.logits[i, j].tolist()
        return math.log(sum(math.exp(v) for v in z)) - z[labels[i]]

    l1, _ = strategy.compute_loss(out, labels, StepContext(0, 1, 0, phase=0))
    assert l1.item() == pytest.approx(sum(ce(i, m - 1) for i in range(n)) / n, rel=1e-6)
    l2, _ = strategy.compute_loss(out, labels, StepContext(0, 1, 0, phase=1))
    want = sum((m - 1 - j) * sum(ce(i, j) for i in range(n)) / n for j in range(m - 1)) / sum(range(1, m))
    assert l2.item() == pytest.approx(want, rel=1e-6)
    dr = dot_regression(out.logits, labels)
    assert dr[1, 2].item() == pytest.approx(0.5 * (out.logits[1, 2, 2].item() - 1) ** 2, rel=1e-6)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(EebenchError, match=r"disentangled.loss='mse'; known: ce, dr"):
        build_strategy("disentangled", {"loss": "mse"})
    with pytest.raises(EebenchError, match="needs a BERT-style encoder"):
        tiny_model("distilbert").attach(build_strategy("disentangled"))
    with pytest.raises(EebenchError, match="needs a classification task"):
        tiny_model("bert", num_labels=1).attach(build_strategy("disentangled"))


# ----------------------------------------------------------------------------- exits, persistence


@pytest.mark.parametrize("policy", ["patience", "energy"])
def test_simulation_equals_true_early_exit(policy):
    model = _disent(num_labels=3, seed=6)
    with torch.no_grad():  # varied predictions across layers and sharp ETF logits
        for p in model.extras.parameters():
            p.mul_(5)
    _warm_bn(model)
    exs = make_examples(16)
    logits, scores = one_pass_scores(model, exs, policy, batch_size=5)
    pol = get_policy(policy, model=model)
    seen = set()
    targets = (1.2, 1.6, 2.5) if policy == "patience" else (1.3, 2.0, 3.0)
    for target in targets:
        choice = pick_threshold(logits, pol, target, scores=scores)
        sim = exit_layers_from_scores(scores, pol, [choice.threshold])[0]
        preds = predictions_at_exit(logits, sim[None])[0]
        seen.update(sim.tolist())
        engine = EarlyExitEngine(model, policy, choice.threshold)
        for mode, b, srt in [("single", 1, False), ("batched", 4, False), ("batched", 6, True),
                             ("streaming", 3, False), ("streaming", 5, True)]:
            calls = []
            out = engine.run(exs, mode, b, sort_by_length=srt, on_layer=lambda la, idx, c=calls: c.append((la, list(idx))))
            assert out.exit_layers.tolist() == sim.tolist(), (policy, target, mode, b)
            assert out.predictions.tolist() == preds.tolist(), (policy, target, mode, b)
            assert per_sample_layers(calls, len(exs)) == [list(range(1, int(e) + 1)) for e in sim]
    assert len(seen) > 1


def test_modules_and_bn_statistics_are_saved_and_restored(tmp_path):
    model = _disent(num_labels=3, seed=7, bottleneck=16)
    _warm_bn(model)
    model.save(tmp_path / "m")
    loaded = MultiExitModel.load(tmp_path / "m").eval()
    assert loaded.config.method == "disentangled" and loaded.config.method_params["bottleneck"] == 16
    assert loaded.stepper.route is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids, mask = padded_batch(4, 8)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)


# ----------------------------------------------------------------------------- the trainer


def _train(toy, out=None, resume=False, epochs=1, **params):  # noqa: F811
    path, tok, spec, train, dev = toy
    seed_everything(7)
    model = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2, pooling="pooler"))
    strategy = build_strategy("disentangled", params or None)
    model.attach(strategy)
    snaps = []

    def on_epoch(n, entry):
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    cfg = TrainConfig(lr=3e-3, epochs=epochs, batch_size=16, seed=7, progress=False, device="cpu",
                      checkpoint_every=2 if out else 0)
    trainer = Trainer(model, strategy, cfg, tok, spec, out_dir=out, on_epoch=on_epoch)
    res = trainer.train(train, dev, resume=resume)
    return model, strategy, res, snaps, trainer


def test_two_stages(toy):  # noqa: F811
    model, strategy, res, snaps, trainer = _train(toy, stage2_lr=2e-2)
    stage1, stage2 = snaps
    m = model.num_layers
    # 6f.3: the backbone (and the shared pooler) are bit-identical after stage 2
    frozen = [k for k in stage1 if k.startswith(("backbone.", "heads."))]
    assert frozen and all(torch.equal(stage1[k], stage2[k]) for k in frozen)
    # stage 2 moves every adapter and every internal BatchNorm
    for i in range(m - 1):
        for k in (f"extras.adapters.{i}.down.weight", f"extras.adapters.{i}.up.weight", f"extras.etf.{i}.bn.weight"):
            assert not torch.equal(stage1[k], stage2[k]), k
    # the final head's affine parameters get no gradient in stage 2; its statistics drift (the code)
    assert torch.equal(stage1[f"extras.etf.{m - 1}.bn.weight"], stage2[f"extras.etf.{m - 1}.bn.weight"])
    assert not torch.equal(stage1[f"extras.etf.{m - 1}.bn.running_mean"], stage2[f"extras.etf.{m - 1}.bn.running_mean"])
    # the ETF matrices never move
    assert all(torch.equal(stage1[f"extras.etf.{i}.etf"], stage2[f"extras.etf.{i}.etf"]) for i in range(m))
    # stage 1 trains the backbone at the run's rate; stage 2 everything at stage2_lr
    opt = trainer._optimizer(strategy.phases()[1])
    assert {g["lr"] for g in opt.param_groups} == {2e-2}
    assert res.steps == 12 and [h["phase"] for h in res.history] == ["stage1-final", "stage2-adapters"]


def test_adapter_layernorm_init_at_stage_two(toy):  # noqa: F811
    """The code's loop bug: every weight copied from the stage-1 layer LayerNorm, the bias only for
    the last internal layer (the others keep 0)."""
    path, tok, spec, train, dev = toy
    model = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2, pooling="mean"))
    strategy = build_strategy("disentangled")
    model.attach(strategy)
    with torch.no_grad():
        for lay in model.backbone.encoder.layer:
            lay.output.LayerNorm.weight.uniform_(0.5, 1.5)
            lay.output.LayerNorm.bias.uniform_(-1, 1)
    phases = strategy.phases()
    strategy.on_phase_start(0, phases[0], None, None)
    assert all(torch.equal(ad.ln.weight, torch.ones_like(ad.ln.weight)) for ad in model.extras["adapters"])
    strategy.on_phase_start(1, phases[1], None, None)
    layers, ads = model.backbone.encoder.layer, model.extras["adapters"]
    for i, ad in enumerate(ads):
        assert torch.equal(ad.ln.weight, layers[i].output.LayerNorm.weight)
        want_bias = layers[i].output.LayerNorm.bias if i == len(ads) - 1 else torch.zeros_like(ad.ln.bias)
        assert torch.equal(ad.ln.bias, want_bias), i
    assert ads[0].ln.weight.data_ptr() != layers[0].output.LayerNorm.weight.data_ptr()  # copies


def test_final_bn_eval_keeps_the_final_statistics_in_stage_two(toy):  # noqa: F811
    _, _, _, (stage1, stage2), _ = _train(toy, final_bn="eval")
    k = "extras.etf.3.bn.running_mean"
    assert torch.equal(stage1[k], stage2[k])


def test_resume_inside_stage_two_is_bit_exact(toy, tmp_path, monkeypatch):  # noqa: F811
    params = {"final_bn": "eval", "ln_init": "full"}
    full, *_ = _train(toy, out=tmp_path / "a", **params)
    interrupted_at_step(monkeypatch, 10, lambda: _train(toy, out=tmp_path / "b", **params))
    ckpt = tmp_path / "b" / "checkpoint"
    doc = checkpoint_state(ckpt)
    assert doc["state"]["phase"] == 1 and doc["state"]["step"] == 8 and doc["strategy"] == {"stage": 1}
    resumed, strategy, res, _, _ = _train(toy, out=tmp_path / "b", resume=True, **params)
    assert res.resumed_from_step == 8 and strategy.stage == 1
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- the CLI


def test_cli_run_list_mlflow_and_report(tmp_path, tiny_backbone_dir, capsys):
    import mlflow

    from eebench.cli import main
    from tests.conftest import write_toy_task

    task = write_toy_task(tmp_path / "toy")
    out = tmp_path / "runs"
    assert main(["run", "--task", str(task), "--model", str(tiny_backbone_dir), "--epochs", "1", "--batch-size", "16",
                 "--lr", "3e-3", "--pooling", "mean", "--num-thresholds", "20", "--output", str(out), "--seeds", "1",
                 "--methods", "disentangled", "--signals", "patience,energy", "disentangled.stage2_lr=0.01"]) == 0
    assert "early-exit check: 0 mismatches" in capsys.readouterr().out
    assert main(["list"]) == 0
    assert "disentangled " in capsys.readouterr().out
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eebench-toy"], output_format="pandas")
    child = runs[runs["tags.mlflow.parentRunId"].notna()].iloc[0]
    assert child["params.method"] == "disentangled" and child["params.method_params.stage2_lr"] == "0.01"
    assert child["params.method_params.ln_init"] == "code"
    assert main(["report", "--results", str(out), "--out", str(tmp_path / "rep")]) == 0
    for table in ("main_2x.md", "layers.md"):
        assert "| disentangled" in (tmp_path / "rep" / "toy" / table).read_text(), table
