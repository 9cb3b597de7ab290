"""BERxiT and PALBERT: the "minimal tests" of the baselines' specification (sections 1f and 5f),
plus their exit policies (simulation == true early exit in every mode), their own modules
(saved / restored, own parameter group) and BERxiT's alternating objective in the trainer.

Expected values are computed by hand from the specification, never by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from eebench.exits.policies import get_policy
from eebench.exits.rule import exit_layers_from_scores, predictions_at_exit, simulate_exits
from eebench.inference import EarlyExitEngine, one_pass_scores, pick_threshold
from eebench.methods.berxit import LteExit, lte_loss, lte_targets, lte_targets_regression
from eebench.methods.palbert import (
    LambdaLayer,
    QExit,
    exit_distribution,
    geometric_prior,
    kl_prior_to_p,
    q_exit_cdf,
)
from eebench.model.backbone import MultiExitModel
from eebench.strategy import StepContext, build_strategy
from tests.conftest import padded_batch, tiny_model

# ----------------------------------------------------------------------------- BERxiT (1f)


def test_berxit_lte_targets():
    # Layer 1 predicts class 1, layer 2 class 0; the label is 0: wrong -> 1, right -> 0.
    logits = torch.tensor([[[0.0, 2.0], [3.0, 1.0]]])
    assert lte_targets(logits, torch.tensor([0])).tolist() == [[1.0, 0.0]]
    assert lte_targets(logits, torch.tensor([1])).tolist() == [[0.0, 1.0]]
    # Regression: y_hat = y -> 0; otherwise |tanh(y_hat - y)|.
    t = lte_targets_regression(torch.tensor([[0.5, 1.5]]), torch.tensor([0.5]))
    assert t[0, 0].item() == 0.0 and t[0, 1].item() == pytest.approx(math.tanh(1.0))
    u = torch.tensor([[0.2, 0.6]])
    assert lte_loss(u, torch.tensor([[1.0, 0.0]])).item() == pytest.approx((0.8**2 + 0.6**2) / 2)


def test_berxit_lte_exit_rule():
    pol = LteExit()
    u = torch.tensor([[0.30, 0.10, 0.05, 0.50], [0.30, 0.25, 0.20, 0.01]], dtype=torch.float64)
    # tau = 0.2: first u < 0.2 at layer 2; the second row never goes below it before M (0.20 is
    # not < 0.20: strict), so it answers from layer M = 4 although u_M = 0.01.
    assert exit_layers_from_scores(u, pol, [0.2]).tolist() == [[2, 4]]


def _grads(model, out, strategy, labels, micro, phase=0):
    model.zero_grad(set_to_none=True)
    loss, _ = strategy.compute_loss(out, labels, StepContext(step=0, total_steps=10, epoch=0, phase=phase, micro=micro))
    loss.backward()

    def g(p):
        return 0.0 if p.grad is None else float(p.grad.abs().sum())

    return g


@pytest.mark.parametrize("method", ["berxit-alternate", "berxit-alternate-lte", "berxit-alternate-lte+final"])
def test_berxit_alternate_gradients(method):
    params = {"odd_final_loss": True} if method.endswith("+final") else None
    strategy = build_strategy(method.removesuffix("+final"), params)
    model = tiny_model("bert", pooling="mean", seed=1)
    model.attach(strategy)
    model.train()
    ids, mask = padded_batch(6, 8)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    internal = model.heads.classifiers[0].weight
    final = model.heads.classifiers[-1].weight
    # even step: only L_M (+ L_LTE): the internal classifiers get no gradient
    g = _grads(model, model(ids, mask), strategy, labels, micro=0)
    assert g(internal) == 0.0 and g(final) > 0
    # odd step: the internal classifiers learn; the final classifier too, except in the
    # code-faithful alternate-lte (no L_M on odd steps)
    g = _grads(model, model(ids, mask), strategy, labels, micro=1)
    assert g(internal) > 0
    if method == "berxit-alternate-lte":
        assert g(final) == 0.0
    else:
        assert g(final) > 0
    if "-lte" in method:
        assert g(model.extras["lte"].linear.weight) > 0


def test_berxit_two_stage_keeps_backbone_and_final_head_in_stage_two(tiny_backbone_dir, toy_task):
    from transformers import AutoTokenizer

    from eebench.data import get_task, load_task, tokenize
    from eebench.model.backbone import MultiExitConfig
    from eebench.training.trainer import TrainConfig, Trainer, seed_everything

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    spec = get_task(str(toy_task))
    train = tokenize(load_task(str(toy_task), "train"), tok, spec, 32).select(range(32))
    dev = tokenize(load_task(str(toy_task), "dev"), tok, spec, 32).select(range(16))
    seed_everything(3)
    model = MultiExitModel.from_config(MultiExitConfig(model=str(tiny_backbone_dir), num_labels=2,
                                                       pooling="exit-pooler", final_pooling="pooler"))
    strategy = build_strategy("berxit-two-stage")
    model.attach(strategy)
    snaps = []

    def on_epoch(n, entry):
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    cfg = TrainConfig(lr=3e-3, epochs=1, batch_size=16, seed=3, progress=False, device="cpu")
    Trainer(model, strategy, cfg, tok, spec, on_epoch=on_epoch).train(train, dev)
    stage1, stage2 = snaps
    m = model.num_layers
    frozen = [k for k in stage1 if k.startswith("backbone.") or k.startswith(f"heads.classifiers.{m - 1}.")
              or k.startswith("heads.pooler.")]
    assert frozen and all(torch.equal(stage1[k], stage2[k]) for k in frozen)
    learned = [k for k in stage1 if k.startswith(("heads.classifiers.0.", "heads.exit_poolers.0."))]
    assert len(learned) == 4 and all(not torch.equal(stage1[k], stage2[k]) for k in learned)


def test_exit_pooler_starts_from_the_pretrained_pooler():
    model = tiny_model("bert", pooling="exit-pooler", final_pooling="pooler")
    pre = model.backbone.pooler.dense
    assert set(model.heads.exit_poolers) == {"0", "1", "2"}
    for lin in [*model.heads.exit_poolers.values(), model.heads.pooler]:
        assert torch.equal(lin.weight, pre.weight) and torch.equal(lin.bias, pre.bias)
        assert lin.weight.data_ptr() != pre.weight.data_ptr()  # copies, not shared


def test_raw_entropy_is_nats_and_finite():
    logits = torch.tensor([[[0.0, 0.0], [1000.0, -1000.0]]])
    s = get_policy("raw-entropy").scores(logits)
    assert s[0, 0].item() == pytest.approx(math.log(2)) and s[0, 1].item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- PALBERT (5f)


def test_palbert_q_exit_cdf_and_rule():
    lam = torch.tensor([[0.2, 0.5, 1.0]], dtype=torch.float64)
    p, computed = exit_distribution(lam, eps=None)
    assert p.tolist()[0] == pytest.approx([0.2, 0.4, 0.4]) and computed == 3
    cdf = q_exit_cdf(lam)
    assert cdf.tolist()[0] == pytest.approx([0.2, 0.6, 1.0])
    pol = QExit()
    assert exit_layers_from_scores(cdf, pol, [0.5]).tolist() == [[2]]
    assert exit_layers_from_scores(cdf, pol, [0.7]).tolist() == [[3]]


def test_palbert_eps_truncation():
    lam = torch.tensor([[0.96, 0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    p, computed = exit_distribution(lam, eps=0.05)
    assert p.tolist()[0] == pytest.approx([0.96, 1 / 60, 1 / 60])
    assert computed == 1  # every sample of the batch is past 1 - eps after layer 1
    p[0, 1:].sum().backward()
    assert lam.grad.abs().sum().item() == 0.0  # the constants carry no gradient


def test_palbert_prior_and_kl():
    prior = geometric_prior(0.1, 12)
    assert prior[0].item() == pytest.approx(0.1)
    assert prior[10].item() == pytest.approx(0.1 * 0.9**10) and prior[10].item() == pytest.approx(0.03487, abs=1e-5)
    assert prior[11].item() == pytest.approx(0.9**11) and prior[11].item() == pytest.approx(0.31381, abs=1e-5)
    assert prior.sum().item() == pytest.approx(1.0)
    assert kl_prior_to_p(prior.unsqueeze(0).repeat(3, 1), prior).item() == pytest.approx(0.0, abs=1e-12)
    # direction: KL(prior || p), not KL(p || prior)
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([0.9, 0.1], dtype=torch.float64)
    want = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_prior_to_p(p, q).item() == pytest.approx(want)


def test_palbert_lambda_layer_parameter_count():
    assert sum(p.numel() for p in LambdaLayer(768).parameters()) == 7_084_033


def test_palbert_own_parameter_group_and_adam(tiny_backbone_dir, toy_task):
    from transformers import AutoTokenizer

    from eebench.data import get_task
    from eebench.model.backbone import MultiExitConfig
    from eebench.training.trainer import TrainConfig, Trainer

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    model = MultiExitModel.from_config(MultiExitConfig(model=str(tiny_backbone_dir), num_labels=2, pooling="mean"))
    strategy = build_strategy("palbert", {"lambda_lr": 7e-4})
    model.attach(strategy)
    trainer = Trainer(model, strategy, TrainConfig(lr=1e-3, progress=False, device="cpu"), tok, get_task(str(toy_task)))
    opt = trainer._optimizer(strategy.phases()[0])
    assert type(opt) is torch.optim.Adam
    lam_ids = {id(p) for p in model.extras["lambda_layer"].parameters()}
    groups = [(g["lr"], {id(p) for p in g["params"]}) for g in opt.param_groups]
    assert (7e-4, lam_ids) in groups
    assert all(not (ids & lam_ids) for lr, ids in groups if lr != 7e-4)


def test_palbert_loss_by_hand():
    strategy = build_strategy("palbert", {"beta": 0.5, "eps": 0.05, "lambda_p": 0.1})
    model = tiny_model("bert", pooling="mean", seed=4)
    model.attach(strategy)
    model.eval()  # no dropout: the hand computation sees the same lambdas
    ids, mask = padded_batch(5, 9)
    labels = torch.tensor([0, 1, 1, 0, 1])
    out = model(ids, mask)
    loss, logs = strategy.compute_loss(out, labels, StepContext(0, 1, 0))
    lam_layer, pooled = model.extras["lambda_layer"], out.pooled
    n, m, _ = out.logits.shape
    lam = [[lam_layer(pooled[i, j], pooled[i, j - 1] if j else torch.zeros_like(pooled[i, 0])).item()
            for j in range(m)] for i in range(n)]
    prior = [0.1 * 0.9**k for k in range(m - 1)] + [0.9 ** (m - 1)]
    task = kl = 0.0
    for i in range(n):
        surv, logp = 1.0, []
        for j in range(m):
            pij = 0.05 / m if 1 - surv > 0.95 else lam[i][j] * surv
            surv *= 1 - lam[i][j]
            ce = -torch.log_softmax(out.logits[i, j], -1)[labels[i]].item()
            task += pij * ce / n
            logp.append(math.log(pij))
        kl += sum(prior[k] * (math.log(prior[k]) - logp[k]) for k in range(m)) / n
    assert loss.item() == pytest.approx(task + 0.5 * kl, rel=1e-5)


# ----------------------------------------------------------------------------- policies, modules


def _model_with(method: str, seed: int = 3) -> MultiExitModel:
    model = tiny_model("bert", num_labels=3, pooling="mean", seed=seed)
    model.attach(build_strategy(method))
    with torch.no_grad():  # spread values so thresholds sit far from float noise
        for lin in model.heads.classifiers:
            lin.weight.mul_(40)
        for p in model.extras.parameters():
            p.mul_(5)
    return model.eval()


@pytest.mark.parametrize("method,policy", [("berxit-alternate-lte", "lte"), ("palbert", "q-exit"),
                                           ("berxit-alternate", "raw-entropy")])
def test_method_policies_simulation_equals_true_early_exit(method, policy):
    from tests.test_inference import make_examples, per_sample_layers

    model = _model_with(method)
    exs = make_examples(16)
    logits, scores = one_pass_scores(model, exs, policy, batch_size=5)
    pol = get_policy(policy, model=model)
    seen = set()
    for target in (1.3, 2.0, 3.0):
        choice = pick_threshold(logits, pol, target, scores=scores)
        assert choice.margin > 1e-6
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


def test_extras_are_saved_and_restored(tmp_path):
    model = _model_with("palbert")
    model.save(tmp_path / "m")
    loaded = MultiExitModel.load(tmp_path / "m").eval()
    assert loaded.config.method == "palbert" and "lambda_layer" in loaded.extras
    ids, mask = padded_batch(4, 8)
    with torch.no_grad():
        a, b = model(ids, mask), loaded(ids, mask)
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(get_policy("q-exit", model=model).scores(a), get_policy("q-exit", model=loaded).scores(b))


def test_policy_of_another_method_is_a_clear_error():
    from eebench.errors import EebenchError

    model = tiny_model("bert")
    model.attach(build_strategy("cosee"))
    with pytest.raises(EebenchError, match=r"exit policy 'lte' is not available for this model.*available: energy"):
        EarlyExitEngine(model, "lte", 0.1)
    with pytest.raises(EebenchError, match="not available for method 'cosee'"):
        get_policy("q-exit", "cosee")
    with pytest.raises(EebenchError, match="reads the model's own modules"):
        simulate_exits(torch.randn(2, 4, 2), get_policy("q-exit", "palbert"), [0.5])


def test_per_step_freeze_in_the_trainer(tiny_backbone_dir, toy_task):
    """A method may freeze any named group per step: here the backbone learns on even steps only."""
    from transformers import AutoTokenizer

    from eebench.data import get_task, load_task, tokenize
    from eebench.model.backbone import MultiExitConfig
    from eebench.strategy import Strategy
    from eebench.training.trainer import TrainConfig, Trainer

    class EvenBackbone(Strategy):
        def loss(self, layer_logits, labels, ctx):
            from eebench.strategy import per_layer_ce

            return per_layer_ce(layer_logits, labels).mean(0).sum(), {}

        def trainable_now(self, ctx):
            return None if ctx.micro % 2 == 0 else ["internal", "final"]

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    spec = get_task(str(toy_task))
    train = tokenize(load_task(str(toy_task), "train"), tok, spec, 32).select(range(32))
    model = MultiExitModel.from_config(MultiExitConfig(model=str(tiny_backbone_dir), num_labels=2, pooling="mean"))
    strategy = EvenBackbone("even")
    model.attach(strategy)
    seen = []
    orig = strategy.compute_loss

    def spy(out, labels, ctx):
        seen.append((ctx.micro, model.backbone.embeddings.word_embeddings.weight.requires_grad,
                     model.heads.classifiers[0].weight.requires_grad))
        return orig(out, labels, ctx)

    strategy.compute_loss = spy
    trainer = Trainer(model, strategy, TrainConfig(lr=1e-3, batch_size=8, progress=False, device="cpu"), tok, spec)
    trainer.evaluate = lambda ds: []
    trainer.train(train, train)
    assert seen == [(0, True, True), (1, False, True), (2, True, True), (3, False, True)]
