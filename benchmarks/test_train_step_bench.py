"""Issue 4: on a real SST-2 batch of 32, MiniLM-L6, CPU: a cosee training step costs at most 1.05x
a vanilla step, and a vanilla multi-exit step at most 1.10x a single-exit
AutoModelForSequenceClassification step. The three are timed in interleaved rounds of one run."""

import torch

from benchmarks.conftest import ASSERT_LIMITS, interleaved_medians, needs_glue, sst2_train_batch
from eebench.strategy import StepContext, build_strategy


@needs_glue
def test_train_step_ratios(benchmark, minilm):
    from transformers import AutoModelForSequenceClassification

    from eebench.model.backbone import MultiExitConfig, MultiExitModel, resolve_model

    _, tok = minilm
    path, _ = resolve_model("minilm-l6")
    inputs, labels = sst2_train_batch(tok)

    single = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).train()
    multi_v = MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2)).train()
    multi_c = MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2)).train()
    vanilla, cosee = build_strategy("vanilla"), build_strategy("cosee")
    opts = {k: torch.optim.AdamW(m.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.0)
            for k, m in (("single", single), ("vanilla", multi_v), ("cosee", multi_c))}
    ctx = StepContext(step=10, total_steps=100, epoch=0)

    def step(kind):
        opt = opts[kind]
        if kind == "single":
            loss = single(**inputs, labels=labels).loss
            model = single
        else:
            model = multi_v if kind == "vanilla" else multi_c
            loss, _ = (vanilla if kind == "vanilla" else cosee).compute_loss(model(**inputs), labels, ctx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    med = interleaved_medians(benchmark, step, ["single", "vanilla", "cosee"], rounds=15)
    r_cosee = med["cosee"] / med["vanilla"]
    r_multi = med["vanilla"] / med["single"]
    benchmark.extra_info.update({f"median_{k}_s": v for k, v in med.items()})
    benchmark.extra_info.update({"cosee_over_vanilla": r_cosee, "vanilla_multi_over_single": r_multi})
    print(f"\nmedian step (s): single-exit {med['single']:.3f}, vanilla multi-exit {med['vanilla']:.3f}, "
          f"cosee {med['cosee']:.3f}; cosee/vanilla {r_cosee:.3f}, vanilla/single {r_multi:.3f}")
    if ASSERT_LIMITS:  # a noisy shared machine must not fail CI; the ratios are reported either way
        assert r_cosee <= 1.05
        assert r_multi <= 1.10


@needs_glue
def test_disentangled_train_step_vs_vanilla(benchmark, minilm):
    """DisentangledEE's training step in each stage (stage 1: backbone + final ETF head, final CE;
    stage 2: adapters + ETF BatchNorms only, (M-i)-weighted CE) against vanilla's on the same real
    SST-2 batch of 32; interleaved rounds, medians reported (no limit asserted)."""
    from eebench.model.backbone import MultiExitConfig, MultiExitModel
    from eebench.strategy import set_trainable

    _, tok = minilm
    inputs, labels = sst2_train_batch(tok)
    vanilla = build_strategy("vanilla")
    runs = {"vanilla": (MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2)).train(), vanilla, 0)}
    for stage in (0, 1):
        model = MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2))
        strategy = build_strategy("disentangled")
        model.attach(strategy)
        set_trainable(model, strategy.phases()[stage].trainable)
        runs[f"disentangled-stage{stage + 1}"] = (model.train(), strategy, stage)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-5, eps=1e-8, weight_decay=0.0)
            for k, (m, _, _) in runs.items()}

    def step(kind):
        model, strategy, phase = runs[kind]
        loss, _ = strategy.compute_loss(model(**inputs), labels, StepContext(step=10, total_steps=100, epoch=0, phase=phase))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)

    med = interleaved_medians(benchmark, step, list(runs), rounds=10)
    ratios = {k: med[k] / med["vanilla"] for k in med if k != "vanilla"}
    benchmark.extra_info.update({f"median_{k}_s": v for k, v in med.items()})
    benchmark.extra_info.update({f"{k}_over_vanilla": r for k, r in ratios.items()})
    print("\nmedian step (s): " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()) + "; "
          + ", ".join(f"{k}/vanilla {r:.3f}" for k, r in ratios.items()))


@needs_glue
def test_consistentee_train_step_vs_vanilla(benchmark, minilm):
    """ConsistentEE's step in each of its phases against vanilla's on the same SST-2 batch of 32
    (MiniLM-L6, CPU): warm-up (PABEE-weighted CE, one copy), policy (REINFORCE on K = 8 copies,
    only the policy networks learn) and joint (K = 8 copies, everything learns). The copies are
    made as the trainer makes them (``Strategy.batch_copies``)."""
    from eebench.model.backbone import MultiExitConfig, MultiExitModel
    from eebench.strategy import set_trainable

    _, tok = minilm
    inputs, labels = sst2_train_batch(tok)
    vanilla, cee = build_strategy("vanilla"), build_strategy("consistentee")
    k = int(cee.hparams["copies"])
    models = {"vanilla": MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2)).train()}
    strategies = {}
    for phase in ("warmup", "policy", "joint"):
        models[phase] = MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2)).train()
        strategies[phase] = build_strategy("consistentee")
        models[phase].attach(strategies[phase])
    groups = cee.param_groups()
    for ph in cee.phases():
        set_trainable(models[ph.name], ph.trainable, groups)
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-5) for n, m in models.items()}

    def step(kind):
        model = models[kind]
        if kind == "vanilla":
            loss, _ = vanilla.compute_loss(model(**inputs), labels, StepContext(step=10, total_steps=100, epoch=0))
        else:
            phase = ["warmup", "policy", "joint"].index(kind)
            c = 1 if phase == 0 else k
            ctx = StepContext(step=10, total_steps=100, epoch=0, phase=phase, copies=c)
            rep = {n: v.repeat_interleave(c, 0) for n, v in inputs.items()}
            loss, _ = strategies[kind].compute_loss(model(**rep), labels.repeat_interleave(c, 0), ctx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)

    med = interleaved_medians(benchmark, step, list(models), rounds=5)
    ratios = {f"consistentee_{n}_over_vanilla": med[n] / med["vanilla"] for n in ("warmup", "policy", "joint")}
    benchmark.extra_info.update({f"median_{n}_s": v for n, v in med.items()} | ratios)
    print("\nmedian step (s): " + ", ".join(f"{n} {v:.3f}" for n, v in med.items()) + "; "
          + ", ".join(f"{n} {v:.2f}x" for n, v in ratios.items()))


class _SameBatch:
    """LeeBERT's held-out stream in the benchmark: the step's own batch (the cost is the same)."""

    def __init__(self, inputs, labels):
        self.inputs, self.labels = inputs, labels

    def batch(self, k):
        return self.inputs, self.labels


@needs_glue
def test_train_step_leebert_gaml_over_vanilla(benchmark, minilm):
    """LeeBERT-style (Omega step every optimiser step, with and without CLO) and GAML-BERT-style
    (KD gradient + projection) training steps against vanilla's, on the same real SST-2 batch of
    32, MiniLM-L6, interleaved rounds; the ratios are reported (no limit: these methods cost more
    by design)."""
    from eebench.model.backbone import MultiExitConfig, MultiExitModel

    _, tok = minilm
    inputs, labels = sst2_train_batch(tok)
    kinds = {"vanilla": ("vanilla", None), "leebert": ("leebert", None), "leebert-noclo": ("leebert", {"clo": False}),
             "gaml-bert": ("gaml-bert", None)}
    models, strategies, opts = {}, {}, {}
    for kind, (name, params) in kinds.items():
        models[kind] = MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2)).train()
        strategies[kind] = build_strategy(name, params)
        models[kind].attach(strategies[kind])
        strategies[kind].held_out_data = _SameBatch(inputs, labels)
        opts[kind] = torch.optim.AdamW(models[kind].parameters(), lr=2e-5, eps=1e-8, weight_decay=0.0)
    ctx = StepContext(step=10, total_steps=100, epoch=0, loss_scale=1.0, inputs=inputs, lr=2e-5)

    def step(kind):
        model, strategy, opt = models[kind], strategies[kind], opts[kind]
        loss, _ = strategy.compute_loss(model(**inputs), labels, ctx)
        loss.backward()
        strategy.on_gradients(ctx)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    med = interleaved_medians(benchmark, step, list(kinds), rounds=5)
    ratios = {f"{k}_over_vanilla": med[k] / med["vanilla"] for k in kinds if k != "vanilla"}
    benchmark.extra_info.update({f"median_{k}_s": v for k, v in med.items()} | ratios)
    print("\nmedian step (s): " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()) + "; "
          + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    assert all(v > 0 for v in ratios.values())


@needs_glue
def test_gpfee_train_step_vs_vanilla(benchmark, minilm):
    """GPFEE's training step (its gated classifier, imitation loss and per-step freeze decision)
    against vanilla's on the same real SST-2 batch of 32, MiniLM-L6, interleaved rounds; reported,
    not asserted (GPFEE adds ~2 M^2 H^2 work per sample: cheap next to the backbone)."""
    from eebench.model.backbone import MultiExitConfig, MultiExitModel

    _, tok = minilm
    inputs, labels = sst2_train_batch(tok)
    ctx = StepContext(step=10, total_steps=100, epoch=0)
    runs = {}
    for kind in ("vanilla", "gpfee"):
        model = MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=2))
        strategy = build_strategy(kind)
        model.attach(strategy)
        model.train()
        runs[kind] = (model, strategy, torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.0))

    def step(kind):
        model, strategy, opt = runs[kind]
        strategy.trainable_now(ctx)  # the freeze decision is part of GPFEE's step
        loss, _ = strategy.compute_loss(model(**inputs), labels, ctx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    med = interleaved_medians(benchmark, step, ["vanilla", "gpfee"], rounds=10)
    ratio = med["gpfee"] / med["vanilla"]
    benchmark.extra_info.update({"median_vanilla_s": med["vanilla"], "median_gpfee_s": med["gpfee"],
                                 "gpfee_over_vanilla": ratio})
    print(f"\nmedian step (s): vanilla {med['vanilla']:.3f}, gpfee {med['gpfee']:.3f}; gpfee/vanilla {ratio:.3f}")
