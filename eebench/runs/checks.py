"""Every check of a run's settings, done before any work starts (exit code 2 with the accepted
values) and creating nothing: the output folder is only probed for being writable."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from eebench.errors import EebenchError
from eebench.model.backbone import resolve_model
from eebench.runs.config import RunConfig
from eebench.runs.identity import speed_settings


def validate(cfg: RunConfig):
    """Check every setting before any work starts (exit code 2 with the accepted values), and
    create nothing: the output folder is only checked for being writable. ``Runner.prepare``
    then loads the data before the first file is written."""
    from eebench.data import check_trainable, get_task
    from eebench.model.accel import check_attn_implementation
    from eebench.plugins import load_include
    from eebench.strategy import build_strategy, get_method

    load_include(cfg.include)  # also in Ray workers, which rebuild the config from its dump
    spec = get_task(cfg.task)
    check_trainable(spec)
    check_attn_implementation(cfg.attn_implementation)
    speed_settings(cfg)  # fp16 on the CPU, an unknown device: refused before any work
    for m in dict.fromkeys([*cfg.methods, *cfg.method_params]):  # overrides of other methods are checked too
        get_method(m)
        build_strategy(m, cfg.method_params.get(m))
    check_run_policies(cfg.signals, {m: cfg.method_params.get(m) for m in cfg.methods}, spec.num_labels)
    operating_settings(cfg)
    if not cfg.seeds:
        raise EebenchError("--seeds is empty; give at least one seed, e.g. --seeds 42")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise EebenchError(f"unknown precision {cfg.precision!r}; known: fp32, bf16, fp16")
    for flag, v in (("--pooling", cfg.pooling), ("--final-pooling", cfg.final_pooling)):
        if v is not None and v not in ("cls", "mean", "pooler"):
            raise EebenchError(f"unknown {flag} {v!r}; known: cls, mean, pooler")
    check_device(cfg.device)
    check_model(cfg.model, cfg.num_layers)
    check_writable(Path(cfg.output))
    return spec


def check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` / ``cuda:N`` (when that GPU exists) or ``mps`` (when present)."""
    from eebench.util import pick_device

    known = "auto, cpu, cuda, cuda:N, mps"
    if device == "auto":
        return
    try:
        dev = pick_device(device)
    except EebenchError:
        raise EebenchError(f"unknown device {device!r}; known: {known}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise EebenchError(f"device {device!r}: no CUDA GPU is visible; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise EebenchError(f"device {device!r}: only {n} CUDA GPU(s) are visible (cuda:0..cuda:{n - 1})")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise EebenchError(f"device {device!r}: MPS is not available on this machine; use --device cpu (or auto)")
        return
    raise EebenchError(f"unsupported device {device!r}; known: {known}")


def backbone_layers(model: str) -> int | None:
    """Layers of the backbone ``model`` from its config alone (no weights loaded); None when the
    config cannot tell (the model constructor checks again)."""
    from transformers import AutoConfig

    path, _ = resolve_model(model)
    try:
        if (Path(path) / "backbone_config.json").exists():  # a saved eebench model
            conf = json.loads((Path(path) / "backbone_config.json").read_text())
            conf = AutoConfig.for_model(**conf)
        else:
            conf = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EebenchError(f"cannot load model {model!r}: {str(e).splitlines()[0][:200]}") from None
    n = getattr(conf, "num_hidden_layers", None) or getattr(conf, "n_layers", None)
    return int(n) if n else None


def check_model(model: str, num_layers: int | None) -> None:
    total = backbone_layers(model)
    if num_layers is not None and total is not None and not 1 <= num_layers <= total:
        raise EebenchError(f"--num-layers {num_layers} is outside 1..{total} for model {model!r}")


def check_writable(out: Path) -> None:
    """``out`` exists as a writable folder or can be created (nothing is left behind)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        # A probe of its own (not a fixed name): cells validating the same folder at once on Ray
        # must not delete each other's probe.
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".eebench-write-test-"):
            pass
    except OSError as e:
        raise EebenchError(f"output folder {out} cannot be written ({e.strerror}); choose another with --output") from None


def create_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EebenchError(f"output folder {out} cannot be written ({e.strerror}); choose another with --output") from None


def operating_settings(cfg: RunConfig):
    """The split and the optional guarantee of the held-out summaries (checked: exit 2 if bad)."""
    from eebench.exits.operating import SplitSpec, Target

    split = SplitSpec(cfg.cal_fraction, cfg.folds, cfg.split_repeats, cfg.split_seed)
    split.check()
    guarantee = Target(epsilon=cfg.epsilon, delta=cfg.delta) if cfg.epsilon is not None else None
    Target(speedup=2.0, delta=cfg.delta).check() if guarantee is None else guarantee.check()
    return split, guarantee


def check_run_policies(names: list[str], methods: dict[str, dict | None], num_labels: int) -> None:
    """Every exit policy asked for must exist on at least one method of the run (a method's own
    policy, e.g. BERxiT's ``lte``, is swept on the cells of the methods that have it)."""
    from eebench.exits.policies import available_policies, check_policy_names, get_policy

    check_policy_names(names)
    for s in names:
        have = [m for m, p in methods.items() if s in available_policies(m, p)]
        if not have:
            raise EebenchError(
                f"exit policy {s!r} is not available for any method of this run ({', '.join(methods)}); "
                f"they have: {', '.join(sorted(set().union(*(available_policies(m, p) for m, p in methods.items()))))}")
        get_policy(s, have[0], methods[have[0]]).check_task(num_labels)
