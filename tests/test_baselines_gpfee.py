"""GPFEE (methods/gpfee.py): the minimal tests of the baselines' specification (section 4) against plain-loop oracles,
simulation == true early exit, save / load, the engine's full-model baseline and the stochastic
bottom freezing in the trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eebench.api import MultiExitModel, StepContext, build_strategy
from eebench.methods.gpfee import GpfeeClassifier, imitation_loss, pabee_weights
from tests.conftest import checkpoint_state, interrupted_at_step, padded_batch, tiny_model
from tests.test_training import _train, toy  # noqa: F401 - the toy data fixture and its trainer


def _classifier(h=8, c=3, m=4, seed=0, gate_zero=False) -> GpfeeClassifier:
    torch.manual_seed(seed)
    comb = GpfeeClassifier(h, c, m, dropout=0.0)
    with torch.no_grad():
        for p in comb.parameters():  # large, distinct values: every term matters
            p.copy_(torch.randn_like(p) * 0.5)
        if gate_zero:
            comb.gate.weight.zero_()
            comb.gate.bias.zero_()
    return comb


def _oracle(comb: GpfeeClassifier, x: torch.Tensor) -> torch.Tensor:
    """z [N, M, C] by plain loops over samples, exits and positions (the spec's steps 1-5)."""
    n, m, _ = x.shape
    c = comb.num_labels
    out = torch.zeros(n, m, c, dtype=torch.float64)
    d = {k: v.detach().double() for k, v in comb.state_dict().items()}
    for s in range(n):
        pool = [torch.tanh(d[f"poolers.{j}.weight"] @ x[s, j].double() + d[f"poolers.{j}.bias"]) for j in range(m)]
        for i in range(m):
            past = torch.zeros(c, dtype=torch.float64)
            future = torch.zeros(c, dtype=torch.float64)
            gate = torch.zeros(c, dtype=torch.float64)
            for j in range(m):
                sj = pool[j] if j <= i else torch.tanh(pool[i] @ d["pred_weight"][j] + d["pred_bias"][j])
                a = sj @ d["cls_weight"][j] + d["cls_bias"][j]
                if j <= i:
                    past += a[:c]
                    gate += a[c:]
                else:
                    future += a[:c]
            lam = torch.sigmoid(d["gate.weight"] @ torch.tanh(gate / (i + 1)) + d["gate.bias"])
            out[s, i] = 2 * lam * past + (2 - 2 * lam) * future
    return out


def _both_forms(comb, x):
    comb.eval()
    with torch.no_grad():
        ev = comb(x)
        comb.train()  # dropout 0: the training form must give the same numbers
        tr = comb(x)
    comb.eval()
    return ev, tr


def test_gated_classifier_matches_a_plain_loop():
    comb = _classifier()
    x = torch.randn(3, 4, 8)
    ev, tr = _both_forms(comb, x)
    want = _oracle(comb, x)
    torch.testing.assert_close(ev.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr.double(), want, rtol=1e-5, atol=1e-5)


def test_zero_gate_is_the_plain_sum_of_every_position():
    """Minimal test 1: gate weights and bias 0 -> lambda = 0.5 -> z_i = sum over all j of a_j[:C]."""
    comb = _classifier(gate_zero=True)
    x = torch.randn(2, 4, 8)
    ev, tr = _both_forms(comb, x)
    with torch.no_grad():
        pool = torch.tanh(torch.stack([comb.poolers[j](x[:, j]) for j in range(4)], 1))
        for i in range(4):
            total = 0
            for j in range(4):
                sj = pool[:, j] if j <= i else torch.tanh(pool[:, i] @ comb.pred_weight[j] + comb.pred_bias[j])
                total = total + (sj @ comb.cls_weight[j] + comb.cls_bias[j])[:, :3]
            torch.testing.assert_close(ev[:, i], total, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tr[:, i], total, rtol=1e-5, atol=1e-5)


def test_last_exit_ignores_the_imitation_layer():
    """Minimal test 2: z_{M-1} does not depend on pred_layer; earlier exits do."""
    comb = _classifier()
    x = torch.randn(3, 4, 8)
    before, _ = _both_forms(comb, x)
    with torch.no_grad():
        comb.pred_weight.add_(torch.randn_like(comb.pred_weight))
        comb.pred_bias.add_(1.0)
    after, tr = _both_forms(comb, x)
    assert torch.equal(before[:, -1], after[:, -1])
    torch.testing.assert_close(tr[:, -1], before[:, -1], rtol=1e-5, atol=1e-5)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-3


def test_imitation_loss_zero_at_targets_and_by_hand():
    """Minimal test 3, plus a hand-computed value."""
    pool = torch.randn(2, 3, 5)
    fut = pool.unsqueeze(1).expand(2, 3, 3, 5).clone()  # f_j(pool_i) = pool_j for every i
    assert imitation_loss(fut, pool).abs().item() < 1e-6
    fut = torch.randn(2, 3, 3, 5)
    cos = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))  # noqa: E731
    # source 0: targets j = 1, 2; source 1: target j = 2; source 2 has none (not averaged in)
    s0 = sum(1 - cos(fut[n, 0, j], pool[n, j]) for n in range(2) for j in (1, 2)) / 4
    s1 = sum(1 - cos(fut[n, 1, 2], pool[n, 2]) for n in range(2)) / 2
    assert abs(imitation_loss(fut, pool).item() - (s0 + s1) / 2) < 1e-5


def test_past_states_are_detached_in_training():
    """Minimal test 4: d(CE at exit i)/d pool_j = 0 for j < i, not for j = i (and not with
    detach_past=false)."""
    for detach in (True, False):
        comb = _classifier()
        comb.detach_past = detach
        comb.train()
        pool = torch.randn(3, 4, 8, requires_grad=True)
        z = comb.train_logits(torch.zeros(3, 4, 8), pool)
        i = 2
        F.cross_entropy(z[:, i], torch.tensor([0, 1, 2])).backward()
        g = pool.grad.abs().sum((0, 2))
        assert g[i] > 0 and g[i + 1] == 0
        if detach:
            assert g[0] == 0 and g[1] == 0
        else:
            assert g[0] > 0 and g[1] > 0


def test_parameter_count_of_bert_base():
    """Minimal test 5: 14,211,126 for C = 2 on BERT-base (poolers 7,087,104 + pred_layer
    7,087,104 + gated classifier 36,918)."""
    comb = GpfeeClassifier(768, 2, 12)
    count = lambda mods: sum(p.numel() for mod in mods for p in mod.parameters())  # noqa: E731
    assert count([comb.poolers]) == 7_087_104
    assert comb.pred_weight.numel() + comb.pred_bias.numel() == 7_087_104
    assert comb.cls_weight.numel() + comb.cls_bias.numel() + count([comb.gate]) == 36_918
    assert count([comb]) == 14_211_126


def test_loss_by_hand():
    """(PABEE-weighted CE + imitation) / 2, recomputed with loops from the model's own pieces."""
    model = tiny_model("bert", num_labels=3, pooling="cls", seed=2)
    strategy = build_strategy("gpfee", {"gpfee_dropout": 0.0, "imit_weight": 0.7})
    model.attach(strategy)
    model.train()
    ids, mask = padded_batch(4, 8)
    labels = torch.tensor([0, 1, 2, 1])
    out = model(ids, mask)
    loss, logs = strategy.compute_loss(out, labels, StepContext(0, 10, 0))
    m = model.num_layers
    task = sum((i + 1) * F.cross_entropy(out.logits[:, i].float(), labels) for i in range(m)) / (m * (m + 1) / 2)
    comb = model.extras["gpfee"]
    pool = torch.stack([torch.tanh(comb.poolers[i](out.pooled[:, i])) for i in range(m)], 1)
    per_source = []
    for i in range(m - 1):
        terms = [1 - F.cosine_similarity(torch.tanh(pool[:, i] @ comb.pred_weight[j] + comb.pred_bias[j]),
                                         pool[:, j], dim=-1) for j in range(i + 1, m)]
        per_source.append(torch.cat(terms).mean())
    imit = torch.stack(per_source).mean()
    torch.testing.assert_close(loss, (task + 0.7 * imit) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pabee_weights(3), torch.tensor([1 / 6, 2 / 6, 3 / 6]))


def test_simulation_equals_true_early_exit_and_full_model():
    """raw-entropy on GPFEE's gated logits: batch 1, batched and streaming reproduce the one-pass
    simulation (the shared test of test_baselines.py); the full-model baseline gives z_{M-1}."""
    from tests.test_baselines import _model_with, test_method_policies_simulation_equals_true_early_exit
    from tests.test_inference import make_examples

    test_method_policies_simulation_equals_true_early_exit("gpfee", "raw-entropy")
    from eebench.inference import EarlyExitEngine, one_pass_logits

    model = _model_with("gpfee")
    exs = make_examples(7)
    want = one_pass_logits(model, exs, batch_size=3)[:, -1]
    engine = EarlyExitEngine(model, "raw-entropy", 0.0)
    for b in (1, 3):
        torch.testing.assert_close(engine.run_full(exs, batch_size=b).logits, want.float(), rtol=1e-4, atol=1e-4)


def test_modules_saved_and_restored(tmp_path):
    model = tiny_model("bert", num_labels=2, pooling="cls", seed=4)
    model.attach(build_strategy("gpfee", {"freeze_lower": 2}))
    assert not any(m.training for m in model.modules())  # attached in the model's (eval) mode
    model.save(tmp_path / "m")
    loaded = MultiExitModel.load(tmp_path / "m").eval()
    assert loaded.config.method == "gpfee" and loaded.exit_combiner is loaded.extras["gpfee"]
    trained = tiny_model("bert", seed=4).train()
    trained.attach(build_strategy("gpfee"))
    assert all(m.training for m in trained.modules())  # and in training mode when the model trains
    assert loaded.config.method_params["freeze_lower"] == 2
    ids, mask = padded_batch(4, 8)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)


def test_bottom_freezing_groups_and_coins():
    model = tiny_model("bert", pooling="cls")
    strategy = build_strategy("gpfee", {"freeze_lower": 1})
    model.attach(strategy)
    groups = strategy.param_groups()
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    lower = {n for n in names if any(n.startswith(p) for p in groups["gpfee-lower"]["prefixes"])}
    assert lower == {n for n in names if n.startswith(("backbone.embeddings.", "backbone.encoder.layer.0.",
                                                       "backbone.pooler."))}
    # the coin: P(frozen) = 1 - t/T; always at t = 0, never at t = T, about half at T/2
    T = 400
    assert strategy.frozen_at(StepContext(0, T, 0))
    assert not strategy.frozen_at(StepContext(T, T, 0))
    mid = sum(strategy.frozen_at(StepContext(t, T, 0)) for t in range(150, 250)) / 100
    assert 0.3 < mid < 0.7
    assert build_strategy("gpfee", {"freeze_lower": 0}).trainable_now(StepContext(0, T, 0)) is None


def test_bottom_freezing_in_the_trainer(tiny_backbone_dir, toy_task):
    """Frozen steps: the embeddings and layer 0 do not move, layer 1 and the GPFEE modules do."""
    from transformers import AutoTokenizer

    from eebench.data import get_task, load_task, tokenize
    from eebench.model.backbone import MultiExitConfig
    from eebench.training.trainer import TrainConfig, Trainer

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    spec = get_task(str(toy_task))
    train = tokenize(load_task(str(toy_task), "train"), tok, spec, 32).select(range(32))
    model = MultiExitModel.from_config(MultiExitConfig(model=str(tiny_backbone_dir), num_labels=2, pooling="cls"))
    strategy = build_strategy("gpfee", {"freeze_lower": 1})
    model.attach(strategy)
    emb = model.backbone.embeddings.word_embeddings.weight
    l0 = model.backbone.encoder.layer[0].attention.self.query.weight
    l1 = model.backbone.encoder.layer[1].attention.self.query.weight
    seen, snaps = [], []
    orig = strategy.compute_loss

    def spy(out, labels, ctx):
        seen.append(strategy.frozen_at(ctx))
        snaps.append([t.detach().clone() for t in (emb, l0, l1, model.extras["gpfee"].pred_weight)])
        return orig(out, labels, ctx)

    strategy.compute_loss = spy
    trainer = Trainer(model, strategy, TrainConfig(lr=1e-3, batch_size=8, progress=False, device="cpu"), tok, spec)
    trainer.evaluate = lambda ds: []
    trainer.train(train, train)
    snaps.append([t.detach().clone() for t in (emb, l0, l1, model.extras["gpfee"].pred_weight)])
    assert seen[0] and True in seen and len(seen) == 4
    for k, frozen in enumerate(seen):
        moved = [not torch.equal(a, b) for a, b in zip(snaps[k], snaps[k + 1], strict=True)]
        assert moved[2] and moved[3]
        assert moved[0] == moved[1] == (not frozen)


def test_loss_reuses_the_forward_futures_only_for_the_same_pass():
    """The imitation loss reads the training pass's (pool, futures) for that pass's tensor, and
    recomputes them for any other input (same values: nothing random comes before them)."""
    comb = _classifier()
    comb.train()
    x = torch.randn(2, 4, 8)
    comb(x)
    pool, fut = comb.pool_and_futures(x)
    assert comb._cache is None
    pool2, fut2 = comb.pool_and_futures(x.clone())
    torch.testing.assert_close(pool, pool2)
    torch.testing.assert_close(fut, fut2)


def test_resume_is_bit_exact_with_the_freezing_coins(toy, tmp_path, monkeypatch):  # noqa: F811
    """GPFEE keeps no state beyond its modules: the per-step coins come from (freeze_seed, step),
    so a run killed mid-epoch and resumed ends bit for bit where the uninterrupted one does."""
    data = toy
    full, strategy, _ = _train(data, "gpfee", out=tmp_path / "a", epochs=2, checkpoint_every=3)
    interrupted_at_step(monkeypatch, 8, lambda: _train(data, "gpfee", out=tmp_path / "b", epochs=2, checkpoint_every=3))
    ckpt = tmp_path / "b" / "checkpoint"
    state = checkpoint_state(ckpt)
    assert state["state"]["step"] == 6
    coins = [strategy.frozen_at(StepContext(t, 12, 0)) for t in range(12)]
    assert coins[0] and not all(coins)  # the run froze the bottom block on some steps, not all
    resumed, _, res = _train(data, "gpfee", out=tmp_path / "b", epochs=2, checkpoint_every=3, resume=True)
    assert res.resumed_from_step == 6
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
