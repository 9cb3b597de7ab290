"""Machine-dependent speed choices: attention kernel, precision resolution, CPU description;
and that the Trainer and ``eebench run`` apply and record them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import eebench.model.accel as accel
from eebench.errors import EebenchError
from tests.conftest import padded_batch, tiny_model

NO_BF16 = accel.CpuInfo("Fake CPU without bf16", ("avx2",), False)
WITH_BF16 = accel.CpuInfo("Fake CPU with bf16", ("avx2", "avx512_bf16"), True)


def test_attention_choice_per_device_and_override():
    assert accel.choose_attn_implementation("auto", "cpu") == "eager"
    assert accel.choose_attn_implementation("auto", torch.device("cuda")) == "sdpa"
    assert accel.choose_attn_implementation("sdpa", "cpu") == "sdpa"
    assert accel.choose_attn_implementation("eager", torch.device("cuda")) == "eager"
    with pytest.raises(EebenchError, match=r"unknown attention implementation 'flash'; known: auto, eager, sdpa"):
        accel.choose_attn_implementation("flash", "cpu")


def test_precision_resolution(monkeypatch):
    monkeypatch.setattr(accel, "cpu_info", lambda: NO_BF16)
    used, note = accel.resolve_precision("bf16", "cpu")
    assert used == "fp32" and "would be slow on this CPU (Fake CPU without bf16" in note and "\n" not in note
    monkeypatch.setattr(accel, "cpu_info", lambda: WITH_BF16)
    assert accel.resolve_precision("bf16", "cpu") == ("bf16", None)
    assert accel.resolve_precision("fp32", "cpu") == ("fp32", None)
    assert accel.resolve_precision("fp16", torch.device("cuda")) == ("fp16", None)
    with pytest.raises(EebenchError, match="fp16 needs a CUDA device"):
        accel.resolve_precision("fp16", "cpu")
    with pytest.raises(EebenchError, match="unknown precision 'fp8'; known: fp32, bf16, fp16"):
        accel.resolve_precision("fp8", "cpu")


def test_cpu_info_agrees_with_proc_cpuinfo():
    p = Path("/proc/cpuinfo")
    if not p.exists():
        pytest.skip("no /proc/cpuinfo on this OS")
    flags = next(line.split(":", 1)[1].split() for line in p.read_text().splitlines() if line.startswith("flags"))
    info = accel.cpu_info()
    assert info.native_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert ("avx512_bf16" in info.flags) == ("avx512_bf16" in flags)
    assert info.model and info.model != "unknown"
    assert set(accel.machine_info()) >= {"cpu_model", "cpu_signature", "cpu_flags", "native_bf16", "torch_threads"}
    ids = dict(line.split(":", 1) for line in p.read_text().splitlines() if line.count(":") and line[:1] != " ")
    ids = {k.strip(): v.strip() for k, v in ids.items()}
    if "cpu family" in ids:  # x86: the kind of CPU, which a VM's model name may hide
        assert info.signature == f"family {ids['cpu family']} model {ids['model']} stepping {ids['stepping']}"
        assert info.signature in accel.describe_cpu(accel.machine_info())


@pytest.mark.parametrize("arch", ["bert", "albert", "distilbert", "roberta"])
def test_eager_and_sdpa_compute_the_same_logits(arch):
    """Kernel choice changes speed, not the function: both give the same logits on padded input."""
    eager = tiny_model(arch, pooling="mean", attn_implementation="eager")
    sdpa = tiny_model(arch, pooling="mean", attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    assert eager.backbone.config._attn_implementation == "eager"
    assert sdpa.backbone.config._attn_implementation == "sdpa"
    ids, mask = padded_batch(6, 12)
    with torch.no_grad():
        torch.testing.assert_close(eager(ids, mask).logits, sdpa(ids, mask).logits, atol=1e-5, rtol=1e-4)


def test_attention_saved_and_overridable_on_load(tmp_path):
    from eebench.model.backbone import MultiExitModel

    model = tiny_model("bert", attn_implementation="sdpa")
    model.save(tmp_path)
    assert MultiExitModel.load(tmp_path).backbone.config._attn_implementation == "sdpa"
    again = MultiExitModel.load(tmp_path, attn_implementation="eager")
    assert again.backbone.config._attn_implementation == "eager" and again.config.attn_implementation == "eager"
    # A kernel a backbone type lacks: auto falls back, an explicit request is one clear line.
    assert tiny_model("mpnet", attn_implementation="auto").config.attn_implementation == "eager"
    with pytest.raises(EebenchError, match="does not support attention implementation 'sdpa'; use --attn-implementation eager"):
        tiny_model("mpnet", attn_implementation="sdpa")


def _toy_trainer(toy_dir, toy_task, precision: str, seed: int = 7):
    from transformers import AutoTokenizer

    from eebench.data import get_task, load_task, tokenize
    from eebench.model.backbone import MultiExitConfig, MultiExitModel
    from eebench.strategy import build_strategy
    from eebench.training.trainer import TrainConfig, Trainer, seed_everything

    tok = AutoTokenizer.from_pretrained(toy_dir)
    spec = get_task(str(toy_task))
    train = tokenize(load_task(str(toy_task), "train"), tok, spec, 32).select(range(32))
    seed_everything(seed)
    model = MultiExitModel.from_config(MultiExitConfig(model=str(toy_dir), num_labels=2, pooling="mean"))
    cfg = TrainConfig(lr=3e-3, batch_size=16, seed=seed, device="cpu", precision=precision, progress=False,
                      checkpoint_every=0)
    return Trainer(model, build_strategy("vanilla"), cfg, tok, spec), train


def test_trainer_bf16_autocasts_only_where_native(tiny_backbone_dir, toy_task, monkeypatch, capsys):
    seen = []

    def spy(model, args, kwargs, out):
        seen.append((torch.is_autocast_enabled("cpu"), out.logits.dtype, model.training))

    monkeypatch.setattr(accel, "cpu_info", lambda: NO_BF16)
    trainer, ds = _toy_trainer(tiny_backbone_dir, toy_task, "bf16")
    assert "would be slow on this CPU" in capsys.readouterr().out and trainer.precision == "fp32"
    trainer.model.register_forward_hook(spy, with_kwargs=True)
    trainer.train(ds, ds)
    ref, _ = _toy_trainer(tiny_backbone_dir, toy_task, "fp32")
    ref.train(ds, ds)
    # The fallback is plain fp32 training, bit for bit.
    for (k, a), b in zip(trainer.model.state_dict().items(), ref.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert {s for s in seen if s[2]} == {(False, torch.float32, True)}

    monkeypatch.setattr(accel, "cpu_info", lambda: WITH_BF16)
    seen.clear()
    trainer, ds = _toy_trainer(tiny_backbone_dir, toy_task, "bf16")
    assert trainer.precision == "bf16"
    trainer.model.register_forward_hook(spy, with_kwargs=True)
    trainer.train(ds, ds)
    train_calls = {s for s in seen if s[2]}
    eval_calls = {s for s in seen if not s[2]}
    assert train_calls == {(True, torch.bfloat16, True)}  # autocast while training
    assert eval_calls == {(False, torch.float32, False)}  # evaluation stays fp32
    # fp32 master weights and optimiser state.
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
