"""Training strategies: how a multi-exit model is trained. One module each in ``methods/``.

A strategy turns the logits of every layer from one training forward pass into a scalar loss.
Strategies are registered by name with ``@register_method`` (or as presets of a registered class
with other defaults); ``eebench list`` shows them. Adding a method is adding one module to
``methods/``: every module there is imported on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eebench.errors import EebenchError
from eebench.registry import Registry


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: a strategy class plus the defaults of this preset."""

    name: str
    cls: type[Strategy]
    defaults: dict[str, Any]
    description: str


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, description: str = "", **defaults):
    """Class decorator: register ``cls`` under ``name`` with these hyper-parameter defaults."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        add_preset(name, cls, description or (cls.__doc__ or "").strip().splitlines()[0], **defaults)
        return cls

    return deco


def add_preset(name: str, cls: type[Strategy], description: str, **defaults) -> None:
    """Register a named variant of a strategy (e.g. ``cosee-entropy``)."""
    merged = {**cls.defaults, **defaults}
    unknown = set(defaults) - set(cls.defaults)
    if unknown:
        raise ValueError(f"preset {name}: unknown hyper-parameters {sorted(unknown)}")
    METHODS.register(name, MethodSpec(name, cls, merged, description))


_loaded = False


def _load_methods() -> None:
    global _loaded
    if _loaded:
        return
    import eebench.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"eebench.methods.{mod.name}")
    _loaded = True


def list_methods() -> list[MethodSpec]:
    _load_methods()
    return [METHODS.get(n) for n in METHODS.names()]


def get_method(name: str) -> MethodSpec:
    _load_methods()
    return METHODS.get(name)


def build_strategy(name: str, overrides: dict[str, Any] | None = None) -> Strategy:
    """An instance of method ``name`` with its defaults updated by ``overrides``."""
    spec = get_method(name)
    params = dict(spec.defaults)
    for k, v in (overrides or {}).items():
        if k not in params:
            raise EebenchError(
                f"method {name!r} has no hyper-parameter {k!r}; its hyper-parameters: {', '.join(sorted(params)) or 'none'}"
            )
        params[k] = coerce_hparam(name, k, v, params[k])
    return spec.cls(name=name, **params)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce_hparam(method: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the hyper-parameter's default, or one clear error.

    Booleans take True / False (or the strings true/false, yes/no, on/off, 1/0: ``"false"`` is
    False, never ``bool("false")``); integers take whole numbers; floats take numbers; strings take
    strings. Nothing is truncated or guessed (``0.5`` is not an integer)."""
    if default is None:
        return value
    kind = type(default)

    def bad() -> EebenchError:
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        return EebenchError(f"{method}.{key}={value!r} is not {names.get(kind, kind.__name__)} "
                            f"(its default is {default!r})")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if isinstance(value, bool):  # True is an int in Python; never a number here
        raise bad()
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if kind is float:
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad()
    return value


@dataclass
class Phase:
    """A stage of training: which parameters learn and for how many epochs (x the run's epochs)."""

    name: str
    trainable: str = "all"  # all | backbone+final | internal-heads | final
    epochs_factor: int = 1


@dataclass
class StepContext:
    """What a loss may need to know about where training is."""

    step: int  # optimiser step, 0-based
    total_steps: int  # optimiser steps of the whole run
    epoch: int  # 0-based
    phase: int = 0


class Strategy:
    """Base class. Subclasses set ``defaults`` and implement ``loss``."""

    defaults: dict[str, Any] = {}
    #: The exit signal the strategy trains with (COSEE); None if it uses none.
    train_signal_param: str | None = None

    def __init__(self, name: str, **hparams):
        self.name = name
        self.hparams = hparams

    @property
    def train_signal(self) -> str | None:
        return self.hparams.get(self.train_signal_param) if self.train_signal_param else None

    def phases(self) -> list[Phase]:
        return [Phase("joint")]

    def loss(self, layer_logits: torch.Tensor, labels: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Called after every training epoch (COSEE updates its threshold range here)."""

    def protocol_warnings(self, epochs: int) -> list[str]:
        """Ways in which this training run departs from the method's protocol (printed and kept
        in the cell's result); none by default."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    #: Whether internal exits are trained (False for the final-only reference point).
    trains_exits: bool = True


def per_layer_ce(layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every sample at every layer: [N, M, C] x [N] -> [N, M]."""
    n, m, c = layer_logits.shape
    ce = F.cross_entropy(layer_logits.float().reshape(n * m, c), labels.repeat_interleave(m), reduction="none")
    return ce.view(n, m)


def set_trainable(model: nn.Module, which: str) -> None:
    """Freeze / unfreeze parameter groups of a MultiExitModel for a training phase."""
    m = model.num_layers
    for name, p in model.named_parameters():
        if which == "all":
            p.requires_grad_(True)
        elif which == "internal-heads":
            p.requires_grad_(name.startswith("heads.classifiers.") and int(name.split(".")[2]) < m - 1)
        elif which in ("backbone+final", "final"):
            internal = name.startswith("heads.classifiers.") and int(name.split(".")[2]) < m - 1
            p.requires_grad_(not internal)
        else:  # pragma: no cover - programming error
            raise ValueError(which)
