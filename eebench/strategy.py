"""Training strategies: how a multi-exit model is trained. One module each in ``methods/``.

The contract a method implements (every hook but ``loss`` / ``compute_loss`` has a default):

* ``compute_loss(out, labels, ctx)``: one training pass (``ExitOutput``: logits [N, M, C], exit
  features [N, M, H], mask, optionally hidden states) -> (scalar loss, logs); the default calls
  ``loss(out.logits, labels, ctx)``, the logits-only form of the built-in methods;
* ``modules(model)``: its own ``nn.Module``s, added to ``model.extras`` (saved and restored with
  the model);
* ``param_groups()``: named parameter groups with their own learning rate (a group is a list of
  parameter-name prefixes);
* ``phases()``: training stages, each with the groups that learn, an epoch count, its optimiser
  and schedule; ``trainable_now(ctx)`` can change the learning groups per step;
* ``policies()``: its own exit policies (``eebench.exits.policies``) by name;
* ``batch_copies(ctx)``: train on k copies of every row (dropout noise apart); ``ctx.rows`` gives
  the rows' positions in the training set;
* ``on_phase_start(index, phase, trainer, train_ds)``: when a phase begins (initialise a module,
  look at the training set).

Groups every model has: ``backbone``, ``internal`` (internal exit heads), ``final`` (the final
head and the shared pooler), ``extras`` (every method module) and ``extras.<name>``.

Strategies are registered by name with ``@register_method`` (or as presets of a registered class
with other defaults); ``eebench list`` shows them. Adding a method is adding one module to
``methods/``, or a file passed with ``--include`` (``eebench.plugins``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from eebench.errors import EebenchError, UnknownNameError
from eebench.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from eebench.exits.policies import ExitPolicy
    from eebench.model.backbone import ExitOutput, ExitRoute, MultiExitModel


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

    _loaded = True
    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"eebench.methods.{mod.name}")
    from eebench.plugins import load_entry_points

    load_entry_points()


def list_methods() -> list[MethodSpec]:
    _load_methods()
    return [METHODS.get(n) for n in METHODS.names()]


def get_method(name: str) -> MethodSpec:
    _load_methods()
    if name not in METHODS:
        raise UnknownNameError(f"unknown method {name!r}; known: {', '.join(METHODS.names())} "
                               "(a method of your own: --include DIR)")
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
    """A stage of training: which parameter groups learn, for how many epochs (x the run's
    epochs), with which optimiser (``adamw`` | ``adam``) and schedule (``linear`` decay to 0 over
    the phase | ``constant``). Every phase starts a fresh optimiser and schedule.

    ``trainable``: ``all``, a legacy name (``backbone+final``, ``final``: everything but the
    internal heads; ``internal-heads``: only them) or a list of group names (``param_groups``).
    """

    name: str
    trainable: str | Collection[str] = "all"
    epochs_factor: int = 1
    optimizer: str = "adamw"
    schedule: str = "linear"
    #: One learning rate for every parameter that learns in this phase (DisentangledEE's stage 2
    #: trains its adapters at 8e-3); None: the run's rates and the groups' own.
    lr: float | None = None


@dataclass
class StepContext:
    """What a loss may need to know about where training is."""

    step: int  # optimiser step, 0-based
    total_steps: int  # optimiser steps of the whole run
    epoch: int  # 0-based, within the phase
    phase: int = 0
    micro: int = 0  # micro-batch index within the epoch, 0-based (BERxiT's parity counter)
    extra: dict = field(default_factory=dict)
    #: The batch's rows as positions in the training set, [n] (repeated like the rows when the
    #: method asks for copies, ``Strategy.batch_copies``); None outside the trainer.
    rows: torch.Tensor | None = None
    #: How many copies of each row the pass holds (``Strategy.batch_copies``), each row's copies
    #: adjacent (``repeat_interleave``).
    copies: int = 1
    #: The factor the trainer applies to the returned loss before ``backward`` (this micro-batch's
    #: share of the optimiser step); a method that takes gradients itself scales them alike.
    loss_scale: float = 1.0
    #: The model inputs of this micro-batch (on the device), for a method that reruns the model.
    inputs: dict | None = None
    #: The learning rate of the body parameters at this step (the schedule's current value).
    lr: float | None = None


class Strategy:
    """Base class. Subclasses set ``defaults`` and implement ``loss``."""

    defaults: dict[str, Any] = {}
    #: The exit signal the strategy trains with (COSEE); None if it uses none.
    train_signal_param: str | None = None

    def __init__(self, name: str, **hparams):
        self.name = name
        self.hparams = hparams
        #: The model being trained (set by ``MultiExitModel.attach``): losses read ``model.extras``.
        self.model: MultiExitModel | None = None

    @property
    def train_signal(self) -> str | None:
        return self.hparams.get(self.train_signal_param) if self.train_signal_param else None

    #: Whether ``compute_loss`` needs every layer's token states (``ExitOutput.hidden_states``).
    needs_hidden_states: bool = False

    def phases(self) -> list[Phase]:
        return [Phase("joint")]

    def modules(self, model: MultiExitModel) -> dict[str, nn.Module]:
        """The method's own modules, by name (``model.extras[name]``); built once per model,
        before training and by ``MultiExitModel.load``."""
        return {}

    def param_groups(self) -> dict[str, dict]:
        """Named groups beyond the built-in ones: ``{"name": {"prefixes": [...], "lr": float}}``
        (``lr`` optional: a group without one learns at the run's rate)."""
        return {}

    def route(self, model: MultiExitModel) -> ExitRoute | None:
        """The method's own path through the layers to its exits (``eebench.models.ExitRoute``),
        used in every mode (training, one pass, true early exit); None: the model's usual layers
        and exit heads. Called by ``MultiExitModel.attach`` after ``modules``."""
        return None

    def trainable_now(self, ctx: StepContext) -> Collection[str] | None:
        """Groups that learn at this step (a per-step freeze), or None for the phase's."""
        return None

    def policies(self) -> dict[str, type[ExitPolicy]]:
        """The method's own exit policies by name (they read ``model.extras``)."""
        return {}

    def batch_copies(self, ctx: StepContext) -> int:
        """How many copies of every row this step's forward pass holds (default 1). With k > 1 the
        trainer repeats each row k times (copies adjacent) before the pass, so the copies differ
        only by dropout noise (ConsistentEE's REINFORCE baseline over K rollouts); the loss is
        still weighted as one micro-batch of the original size."""
        return 1

    def on_phase_start(self, index: int, phase: Phase, trainer, train_ds) -> None:
        """Called when phase ``index`` starts from its beginning (not when a checkpoint resumes
        inside it: the checkpoint holds what this did), after its freezes and optimiser, before
        its first step. ``self.model`` is the model: a method may initialise its modules in place
        (DisentangledEE's adapter LayerNorms) or evaluate the model on the training set
        (``trainer.collect(train_ds)``, ConsistentEE's memorised layers) and keep what it needs
        in its ``state_dict``."""

    def compute_loss(self, out: ExitOutput, labels: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """The training loss of one pass; the default is ``loss`` on the logits."""
        return self.loss(out.logits.float(), labels, ctx)

    def loss(self, layer_logits: torch.Tensor, labels: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Called after every training epoch (COSEE updates its threshold range here)."""

    def on_gradients(self, ctx: StepContext) -> None:
        """Called once per optimiser step, after every micro-batch's gradient is accumulated in
        ``.grad`` (unscaled under AMP) and before clipping and the optimiser step: a method may
        rewrite the gradients here (GAML-BERT's projection) or set its own parameters' (LeeBERT's
        loss weights). ``ctx`` is the step's last micro-batch's. The default does nothing."""

    def held_out(self) -> tuple[float, int] | None:
        """(fraction, seed): the share of the training split that the trainer holds out for this
        method (never trained on by the main loop; it reaches the method as ``self.held_out_data``,
        a ``eebench.training.HeldOutStream``), drawn with that seed; None (the default): none.
        The split is part of the cell's identity through the method's hyper-parameters."""
        return None

    #: The held-out rows' batch stream (set by the trainer when ``held_out`` asks for one).
    held_out_data: Any = None

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


def exit_kd_matrix(layer_logits: torch.Tensor, temperature: float = 1.0,
                   teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation between every pair of exits, [M, M]: entry [t, m] is
    T^2 * mean_n KL(softmax(sg(z_t)/T) || softmax(z_m/T)), teacher t (detached: no gradient ever
    reaches the teacher through this term), student m. Zero on the diagonal and wherever two exits
    emit the same logits (computed elementwise, so identical logits give exactly 0).
    ``teacher_logits`` (default: ``layer_logits``) holds the teachers fixed at other logits, e.g.
    to differentiate the student side alone by a finite difference."""
    z = layer_logits.float() / temperature
    teacher = (z if teacher_logits is None else teacher_logits.float() / temperature).detach()
    q, log_q = teacher.softmax(-1), teacher.log_softmax(-1)  # [N, M, C]
    log_p = z.log_softmax(-1)
    kl = (q.unsqueeze(2) * (log_q.unsqueeze(2) - log_p.unsqueeze(1))).sum(-1)  # [N, t, m]
    return kl.mean(0) * temperature**2


def group_of(name: str, num_layers: int) -> str:
    """The built-in group of a parameter: ``backbone``, ``internal``, ``final`` or ``extras.<module>``."""
    if name.startswith("backbone."):
        return "backbone"
    if name.startswith("extras."):
        return "extras." + name.split(".")[1]
    if name.startswith(("heads.classifiers.", "heads.exit_poolers.")):
        return "internal" if int(name.split(".")[2]) < num_layers - 1 else "final"
    return "final"  # the shared pooler and any other head parameter


_LEGACY = {"all": None, "backbone+final": ("backbone", "final", "extras"), "final": ("backbone", "final", "extras"),
           "internal-heads": ("internal",)}


def trainable_mask(model: nn.Module, which: str | Collection[str], extra_groups: dict[str, dict] | None = None) -> dict[str, bool]:
    """Parameter name -> learns, for ``which`` (a phase's ``trainable``)."""
    if isinstance(which, str):
        if which not in _LEGACY:
            which = [which]
        else:
            which = _LEGACY[which]
    m = model.num_layers
    out = {}
    for name, _ in model.named_parameters():
        if which is None:
            out[name] = True
            continue
        g = group_of(name, m)
        on = g in which or (g.startswith("extras.") and "extras" in which)
        for gname in which:
            spec = (extra_groups or {}).get(gname)
            if spec and any(name.startswith(p) for p in spec["prefixes"]):
                on = True
        out[name] = on
    known = {"backbone", "internal", "final", "extras", *(f"extras.{k}" for k in getattr(model, "extras", {})),
             *(extra_groups or {})}
    bad = [w for w in (which or []) if w not in known]
    if bad:
        raise EebenchError(f"unknown parameter group(s) {bad}; known: {', '.join(sorted(known))}")
    return out


def set_trainable(model: nn.Module, which: str | Collection[str], extra_groups: dict[str, dict] | None = None) -> None:
    """Freeze / unfreeze parameter groups of a MultiExitModel for a training phase or step."""
    mask = trainable_mask(model, which, extra_groups)
    for name, p in model.named_parameters():
        p.requires_grad_(mask[name])
