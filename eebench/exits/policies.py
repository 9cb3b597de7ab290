"""Exit policies: when does a sample leave.

One protocol, two forms that must agree:

* **vectorised** -- ``scores(out)`` turns one pass over every layer (``ExitOutput``: logits,
  exit features) into a value per sample and layer, [N, M]; ``eebench.exits.rule`` then simulates any
  number of thresholds at once with the shared rule ("leave at the first internal layer whose
  value meets the threshold, else at the last"). Sweeps, COSEE's training-time exits and the
  cached dev scores use this form.
* **incremental** -- ``begin`` / ``step``: the engine calls ``step`` after every layer with that
  layer's logits and features for the rows still running and gets their values [n]; the
  policy's state between layers is a tuple of batch-first tensors (or None), which the engine
  keeps, subsets and regroups with the rows.

A signal + threshold (energy, entropy, softmax, patience, ...) is one implementation,
``SignalPolicy``; a method may declare its own (``Strategy.policies``: BERxiT's LTE uncertainty,
PALBERT's Q-exit), reading the method's modules from ``model.extras`` after ``bind(model)``.
Values are compared in float64 in both forms, so simulation and true early exit make the same
decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from eebench.errors import EebenchError, UnknownNameError
from eebench.exits.signals import SIGNALS, Signal, exit_condition, get_signal
from eebench.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from eebench.model.backbone import ExitOutput, MultiExitModel

#: Policy state between layers: batch-first tensors (the engine subsets / regroups them) or None.
State = tuple[torch.Tensor, ...] | None


class ExitPolicy:
    """Base class. Subclasses set the rule's direction and implement ``scores`` and ``step``."""

    name: str = ""
    #: True when a high value means "leave" (exit when the value is above the threshold).
    higher_is_easier: bool = False
    #: Strict comparison (``<`` / ``>``) or inclusive (``<=`` / ``>=``).
    strict: bool = True
    #: Whether thresholds take integer values only.
    integer: bool = False
    #: Whether the values depend on the method's own modules (then they are cached with the dev
    #: logits, since logits alone cannot reproduce them).
    uses_model: bool = False
    #: A fixed operating point: the one threshold this rule is defined with (a router such as
    #: ConsistentEE's "policy probability > 0.5"), or None for a tunable rule. A policy with one
    #: yields one (speed-up, metric) point per model: sweeps store that point only, held-out
    #: operating points and ``eebench bench`` use it whatever the target (and say whether it is
    #: met), and reports draw it as a marker and print its own speed-up, never a curve.
    fixed_threshold: float | None = None

    def __init__(self) -> None:
        self.model: MultiExitModel | None = None

    def bind(self, model: MultiExitModel) -> ExitPolicy:
        """Attach the model whose modules the policy reads; returns self."""
        self.model = model
        return self

    def check_task(self, num_labels: int) -> None:
        """Raise ``EebenchError`` if the policy cannot run on a task with this many outputs."""

    def meets(self, scores: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
        """Boolean "exit here" for values against thresholds (broadcast)."""
        return exit_condition(scores, thresholds, self.higher_is_easier, self.strict)

    def scores(self, out: ExitOutput) -> torch.Tensor:
        """Vectorised: values [N, M] of every layer from one pass."""
        raise NotImplementedError

    def begin(self) -> State:
        """Incremental: the state before layer 1."""
        return None

    def step(self, layer: int, logits: torch.Tensor, features: torch.Tensor, state: State):
        """Incremental: (values [n], new state) after 0-based ``layer`` for n running rows."""
        raise NotImplementedError

    def rule(self) -> str:
        op = (">" if self.strict else ">=") if self.higher_is_easier else ("<" if self.strict else "<=")
        if self.fixed_threshold is not None:
            return f"exits when value {op} {self.fixed_threshold:g} (fixed operating point)"
        return f"exits when value {op} tau"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class SignalPolicy(ExitPolicy):
    """A signal of the logits (``eebench.exits.signals``) against one threshold."""

    def __init__(self, signal: str | Signal):
        super().__init__()
        self.signal = get_signal(signal)
        self.name = self.signal.name
        self.higher_is_easier = self.signal.higher_is_easier
        self.strict = self.signal.strict
        self.integer = self.signal.integer
        self._history = self.signal.needs_history
        self._score = self.signal.score

    def check_task(self, num_labels: int) -> None:
        self.signal.check_task(num_labels)

    def meets(self, scores, thresholds):
        return self.signal.meets(scores, thresholds)

    def scores(self, out) -> torch.Tensor:
        return self._score(out if isinstance(out, torch.Tensor) else out.logits)

    def step(self, layer, logits, features, state):
        if self._history:  # patience: the values depend on every layer's logits so far
            history = logits.unsqueeze(1) if state is None else torch.cat([state[0], logits.unsqueeze(1)], 1)
            return self._score(history)[:, -1], (history,)
        # [n, C] -> [n]: the same reduction over classes as on [N, M, C] (one kernel fewer than
        # going through [n, 1, C]); this runs after every layer of true early exit.
        return self._score(logits), None


#: Policies available on every cell besides the signals (plugins register here).
POLICIES: Registry[type[ExitPolicy]] = Registry("exit policy")


def register_policy(name: str):
    """Class decorator: an ``ExitPolicy`` usable on every cell under ``name``."""

    def deco(cls: type[ExitPolicy]) -> type[ExitPolicy]:
        cls.name = name
        POLICIES.register(name, cls)
        return cls

    return deco


def method_policies(method: str | None, method_params: dict | None = None) -> dict[str, type[ExitPolicy]]:
    """The policies a method declares (``Strategy.policies``), by name; {} for none."""
    if not method:
        return {}
    from eebench.strategy import build_strategy

    return build_strategy(method, method_params).policies()


def available_policies(method: str | None = None, method_params: dict | None = None) -> list[str]:
    """Every policy name a cell of ``method`` can be swept / run with."""
    return sorted({*SIGNALS.names(), *POLICIES.names(), *method_policies(method, method_params)})


def get_policy(name: str | Signal | ExitPolicy, method: str | None = None, method_params: dict | None = None,
               model: MultiExitModel | None = None) -> ExitPolicy:
    """An exit policy by name: a signal, a registered policy, or one that ``method`` declares
    (with ``model`` given, bound to it). Unknown or not available for this method: one clear
    ``EebenchError`` naming the ones that are."""
    if isinstance(name, ExitPolicy):
        return name.bind(model) if model is not None and name.model is None else name
    if isinstance(name, Signal):
        return SignalPolicy(name)
    if name not in SIGNALS and name not in POLICIES:  # methods (and plugins) may register signals
        from eebench.strategy import _load_methods

        _load_methods()
    if name in SIGNALS:
        pol: ExitPolicy = SignalPolicy(name)
    elif name in POLICIES:
        pol = POLICIES.get(name)()
    else:
        if model is not None and method is None:
            method, method_params = model.config.method, model.config.method_params
        own = method_policies(method, method_params)
        if name not in own:
            where = f"method {method!r}" if method else "this model"
            raise UnknownNameError(
                f"exit policy {name!r} is not available for {where}; available: "
                f"{', '.join(available_policies(method, method_params))}")
        pol = own[name]()
    return pol.bind(model) if model is not None else pol


def fixed_threshold(policy) -> float | None:
    """The fixed threshold of a policy or signal (``ExitPolicy.fixed_threshold``); None if tunable."""
    return getattr(policy, "fixed_threshold", None)


def policy_direction(name: str, method: str | None = None, method_params: dict | None = None) -> ExitPolicy:
    """An unbound policy (its rule only), e.g. to sweep cached values."""
    return get_policy(name, method, method_params)


def check_policy_names(names: list[str]) -> None:
    """Every name must be a signal, a registered policy or some registered method's policy."""
    from eebench.strategy import list_methods

    known = {*SIGNALS.names(), *POLICIES.names()}
    for spec in list_methods():
        try:
            known |= set(spec.cls(name=spec.name, **spec.defaults).policies())
        except EebenchError:  # pragma: no cover - a broken preset is reported where it is used
            pass
    for n in names:
        if n not in known:
            raise UnknownNameError(f"unknown exit policy {n!r}; known: {', '.join(sorted(known))}")
