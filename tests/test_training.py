"""Trainer: determinism, resume after a kill, losses going down, COSEE range, warnings."""


import pytest
import torch
from transformers import AutoTokenizer

from eebench.data import get_task, load_task, tokenize
from eebench.model.backbone import MultiExitConfig, MultiExitModel
from eebench.strategy import build_strategy
from eebench.training.trainer import TrainConfig, Trainer, collapsed_layers, collect_logits, seed_everything
from tests.conftest import checkpoint_state, interrupted_at_step


@pytest.fixture
def toy(tiny_backbone_dir, toy_task):
    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    spec = get_task(str(toy_task))
    train = tokenize(load_task(str(toy_task), "train"), tok, spec, 32)
    dev = tokenize(load_task(str(toy_task), "dev"), tok, spec, 32)
    return tiny_backbone_dir, tok, spec, train, dev


def _train(toy, method="vanilla", out=None, resume=False, epochs=2, seed=7, lr=3e-3, **kw):
    path, tok, spec, train, dev = toy
    seed_everything(seed)
    model = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2, pooling="mean"))
    cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=16, seed=seed, progress=False, device="cpu", **kw)
    strategy = build_strategy(method)
    trainer = Trainer(model, strategy, cfg, tok, spec, out_dir=out)
    res = trainer.train(train, dev, resume=resume)
    return model, strategy, res


def _dev_loss(model, toy):
    _, tok, _, _, dev = toy
    logits, labels = collect_logits(model, dev, tok, 64)
    return torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), labels.unsqueeze(1).expand(-1, logits.shape[1]),
                                             reduction="none").mean(0)


def test_training_lowers_every_layer_loss(toy):
    path, *_ = toy
    seed_everything(7)
    before = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2, pooling="mean"))
    loss0 = _dev_loss(before, toy)
    model, _, res = _train(toy, "vanilla", epochs=3)
    loss1 = _dev_loss(model, toy)
    assert (loss1 < loss0).all(), (loss0, loss1)
    assert len(res.history) == 3 and len(res.history[0]["layers"]) == 4
    assert res.steps == 3 * 6  # 96 rows / 16


def test_same_seed_same_dev_logits(toy):
    m1, _, _ = _train(toy, "cosee", epochs=1)
    m2, _, _ = _train(toy, "cosee", epochs=1)
    l1, _ = collect_logits(m1, toy[4], toy[1])
    l2, _ = collect_logits(m2, toy[4], toy[1])
    assert torch.equal(l1, l2)


def test_resume_after_kill_matches_uninterrupted(toy, tmp_path, monkeypatch):
    full, _, _ = _train(toy, "cosee", out=tmp_path / "a", epochs=2, checkpoint_every=2)

    # Kill the second run in the middle of epoch 2 (after optimiser step 9 of 12).
    calls = interrupted_at_step(monkeypatch, 9, lambda: _train(toy, "cosee", out=tmp_path / "b", epochs=2, checkpoint_every=2))
    assert calls == 9  # the kill did happen, after 8 completed steps
    ckpt = tmp_path / "b" / "checkpoint"
    state = checkpoint_state(ckpt)
    assert state["state"]["step"] == 8 and state["state"]["epoch"] == 1  # mid-epoch checkpoint
    assert state["strategy"]["lo"] != 0.0 or state["strategy"]["hi"] != 1.0  # COSEE range after epoch 1
    assert 0 < state["state"]["train_seconds"]  # the first process's training time up to the checkpoint
    resumed, _, res = _train(toy, "cosee", out=tmp_path / "b", epochs=2, checkpoint_every=2, resume=True)
    assert res.resumed_from_step == 8
    assert res.seconds_before_resume == state["state"]["train_seconds"]
    assert res.total_seconds == res.seconds_before_resume + res.train_seconds
    assert res.steps == 12 and len(res.history) == 2
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_a_resume_from_a_checkpoint_without_its_training_time_says_the_total_is_unknown(toy, tmp_path, monkeypatch):
    """Checkpoints written before eebench recorded training time resume as before; the earlier
    processes' time is then unknown (None), not taken as zero."""
    import json

    from eebench.training.trainer import _sha256

    interrupted_at_step(monkeypatch, 5, lambda: _train(toy, "vanilla", out=tmp_path / "b", epochs=1, checkpoint_every=2))
    ckpt = tmp_path / "b" / "checkpoint"
    pointer = json.loads((ckpt / "current.json").read_text())
    f = ckpt / pointer["generation"] / "trainer_state.json"
    doc = json.loads(f.read_text())
    del doc["state"]["train_seconds"]  # as an older eebench wrote it
    f.write_text(json.dumps(doc))
    pointer["files"]["trainer_state.json"] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (ckpt / "current.json").write_text(json.dumps(pointer))
    _, _, res = _train(toy, "vanilla", out=tmp_path / "b", epochs=1, checkpoint_every=2, resume=True)
    assert res.resumed_from_step == 4 and res.steps == 6
    assert res.seconds_before_resume is None and res.total_seconds is None


def test_resume_with_method_modules_and_per_step_objectives(toy, tmp_path, monkeypatch):
    """BERxiT alternate-lte: its LTE module, its optimiser state and the per-step parity survive a
    kill mid-epoch; the resumed run ends bit for bit where the uninterrupted one does."""
    full, _, _ = _train(toy, "berxit-alternate-lte", out=tmp_path / "a", epochs=2, checkpoint_every=3)
    interrupted_at_step(monkeypatch, 10, lambda: _train(toy, "berxit-alternate-lte", out=tmp_path / "b", epochs=2, checkpoint_every=3))
    ckpt = tmp_path / "b" / "checkpoint"
    state = checkpoint_state(ckpt)
    assert state["state"]["step"] == 9 and state["state"]["micro"] == 3  # an odd micro-batch comes next
    resumed, _, res = _train(toy, "berxit-alternate-lte", out=tmp_path / "b", epochs=2, checkpoint_every=3, resume=True)
    assert res.resumed_from_step == 9
    assert "extras.lte.linear.weight" in dict(resumed.named_parameters())
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("method, kill_at, ckpt_step, ckpt_phase", [
    ("two-stage", 8, 6, 0),  # killed in stage 1 of 2
    ("consistentee", 17, 15, 1),  # killed in the policy phase, before the joint one
])
def test_resume_in_an_earlier_phase_runs_the_later_phases_afresh(toy, tmp_path, monkeypatch, method, kill_at,
                                                                 ckpt_step, ckpt_phase):
    """A run resumed before its last phase reloads the checkpoint once: the later phases start
    with their own optimiser, schedule and method state, bit for bit as in an uninterrupted run
    (it once reloaded the old phase's checkpoint at every later phase start)."""
    full, _, _ = _train(toy, method, out=tmp_path / "a", epochs=2, checkpoint_every=3)
    interrupted_at_step(monkeypatch, kill_at, lambda: _train(toy, method, out=tmp_path / "b", epochs=2, checkpoint_every=3))
    ckpt = tmp_path / "b" / "checkpoint"
    state = checkpoint_state(ckpt)
    assert (state["state"]["step"], state["state"]["phase"]) == (ckpt_step, ckpt_phase)
    resumed, _, res = _train(toy, method, out=tmp_path / "b", epochs=2, checkpoint_every=3, resume=True)
    assert res.resumed_from_step == ckpt_step and res.steps > 12 * (ckpt_phase + 1)  # through the later phases
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_cosee_threshold_range_follows_observed_signals(toy):
    _, strategy, _ = _train(toy, "cosee", epochs=1)
    assert (strategy.lo, strategy.hi) != (0.0, 1.0)
    assert 0.0 < strategy.lo < strategy.hi < 1.0


def test_two_stage_freezes_backbone_in_stage_two(toy):
    """Stage 1 moves the backbone and the final head, never an internal head; stage 2 moves
    only the internal heads: the backbone and final head end exactly as stage 1 left them."""
    path, tok, spec, train, dev = toy
    seed_everything(7)
    model = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2, pooling="mean"))
    snap = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    states = [snap()]
    trainer = Trainer(model, build_strategy("two-stage"), TrainConfig(lr=3e-3, epochs=1, batch_size=16, seed=7,
                                                                      progress=False, device="cpu"),
                      tok, spec, on_epoch=lambda n, entry: states.append(snap()))
    res = trainer.train(train, dev)
    assert [h["phase"] for h in res.history] == ["backbone+final", "internal-heads"] and len(states) == 3
    m = model.num_layers

    def internal(k):
        return k.startswith("heads.classifiers.") and int(k.split(".")[2]) < m - 1

    def moved(a, b, keys):
        return {k for k in keys if not torch.equal(a[k], b[k])}

    keys = [k for k in states[0] if states[0][k].is_floating_point()]
    heads = [k for k in keys if internal(k)]
    rest = [k for k in keys if not internal(k)]
    backbone = [k for k in rest if k.startswith("backbone.") and "pooler" not in k]
    final = [k for k in rest if k.startswith(f"heads.classifiers.{m - 1}.")]
    s0, s1, s2 = states
    assert not moved(s0, s1, heads)  # stage 1: internal heads frozen
    assert moved(s0, s1, backbone) and set(final) <= moved(s0, s1, final)
    assert not moved(s1, s2, rest)  # stage 2: backbone and final head frozen
    assert set(heads) == moved(s1, s2, heads)  # every internal head learns


def test_head_lr_is_a_separate_group(toy):
    path, tok, spec, train, dev = toy
    model = MultiExitModel.from_config(MultiExitConfig(model=str(path), num_labels=2))
    t = Trainer(model, build_strategy("vanilla"), TrainConfig(lr=1e-4, head_lr=5e-3, progress=False), tok, spec)
    lrs = sorted(g["lr"] for g in t._optimizer().param_groups)
    assert lrs == [1e-4, 5e-3]


def test_collapse_warning_fires_on_constant_heads():
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1])
    logits = torch.zeros(8, 3, 2)
    logits[:, :2, 0] = 5.0  # internal heads always predict class 0 (the majority)
    logits[:, 2] = torch.nn.functional.one_hot(labels, 2).float()  # the final head is perfect
    assert collapsed_layers(logits, labels, "accuracy") == [1, 2]
    logits[:, 1] = torch.nn.functional.one_hot(labels, 2).float()
    assert collapsed_layers(logits, labels, "accuracy") == [1]


def test_accumulation_needs_divisible_batch():
    from eebench.errors import EebenchError

    with pytest.raises(EebenchError, match="not a multiple"):
        TrainConfig(batch_size=32, micro_batch_size=5).accumulation()
