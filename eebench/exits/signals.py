"""Exit signals: one number per sample and layer, plus the rule that turns it into an exit.

Every formula follows docs/methods.md. All signals work on logits of every layer,
``layer_logits`` of shape [N, M, C], and return scores of shape [N, M]. A new signal is one
class registered with ``@SIGNALS.register("name")``.
"""

from __future__ import annotations

import math
import operator

import torch

from eebench.errors import EebenchError
from eebench.registry import Registry

#: The exit condition's comparison by (higher_is_easier, strict): ``>`` / ``>=`` when a high value
#: means easy, else ``<`` / ``<=``. The operators work on tensors and on Python floats alike (the
#: inference engine's batch-size-1 path compares floats with the same entry).
EXIT_COMPARE = {(False, True): operator.lt, (False, False): operator.le, (True, True): operator.gt,
                (True, False): operator.ge}


def exit_condition(scores: torch.Tensor, thresholds: torch.Tensor | float, higher_is_easier: bool,
                   strict: bool) -> torch.Tensor:
    """The exit condition, the one comparison every signal and exit policy uses: boolean "exit
    here" for values against thresholds (broadcast)."""
    return EXIT_COMPARE[(bool(higher_is_easier), bool(strict))](scores, thresholds)


class Signal:
    """Base class: ``score`` turns logits into a per-layer value, ``meets`` applies the exit rule."""

    name: str = ""
    #: True when a high value means "easy" (exit when the value is above the threshold).
    higher_is_easier: bool = False
    #: Test-time rule: strict comparison (``<`` / ``>``) or inclusive (``>=``, PABEE's patience).
    strict: bool = True
    #: Whether a threshold takes integer values only (patience).
    integer: bool = False
    #: Whether the signal is differentiable (usable for COSEE's OSC loss).
    differentiable: bool = True
    #: Whether layer m's value depends on earlier layers' logits (patience) or only on its own.
    needs_history: bool = False

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scalar(self, logits: list[float]) -> tuple[float, float] | None:
        """One row's value in float64 Python arithmetic and a bound on its distance from ``score``'s
        float32 value, or None (no such form, or inputs outside the bound's range).

        The engine's batch-size-1 path takes the decision from this value when it is farther from
        the threshold than the bound (then ``score`` is on the same side, so the decision is
        ``score``'s exactly) and computes ``score`` otherwise; this saves the dozen small kernels
        of ``score`` after almost every layer. The bounds are loose on purpose (64 float32 ulps per
        step, about 2^-18 relative, tens of times the kernels' actual error): a looser bound only
        sends more rows to ``score``. ``tests/test_inference.py`` checks them against ``score``.
        """
        return None

    def meets(self, scores: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
        """Boolean "exit here" for scores against thresholds (broadcast)."""
        return exit_condition(scores, thresholds, self.higher_is_easier, self.strict)

    def check_task(self, num_labels: int) -> None:
        """Raise if the signal cannot be computed for a task with this many outputs."""
        if num_labels < 2:
            raise EebenchError(
                f"signal {self.name!r} needs a classification task (>= 2 classes), got {num_labels} output(s)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# float32 unit roundoff and the looseness factor of the scalar forms' error bounds (see
# ``Signal.scalar``): every float32 step of the kernels is within a few of ``_U``; the bounds
# allow ``_SLACK`` per step.
_U = 2.0**-24
_SLACK = 2.0**6 * _U


def _softmax64(z: list[float]) -> tuple[list[float], float, float, float] | None:
    """(exp(z_i - max) in float64, their sum, max, max |z_i - max|), or None for non-finite or huge
    logits."""
    m = max(z)
    spread = m - min(z)
    if not (abs(m) < 1e4 and spread < 1e4):  # also False for nan / inf
        return None
    e = [math.exp(x - m) for x in z]
    return e, math.fsum(e), m, spread


def _entropy64(z: list[float]) -> tuple[float, float] | None:
    """(-sum p log p in nats of softmax(z) in float64 (p = 0 adds nothing), max |z_i - max|), or
    None (see ``_softmax64``)."""
    sm = _softmax64(z)
    if sm is None:
        return None
    e, total, _, spread = sm
    h = 0.0
    for x in e:
        p = x / total
        if p > 0.0:
            h -= p * math.log(p)
    return h, spread


SIGNALS: Registry[type[Signal]] = Registry("signal")


@SIGNALS.register("energy")
class Energy(Signal):
    """Normalised energy sigmoid(-logsumexp(f)), in (0, 1); low is easy (COSEE)."""

    name = "energy"

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        # sigmoid(-lse) == 1 / (1 + exp(lse)), computed without ever forming exp(lse).
        return torch.sigmoid(-torch.logsumexp(layer_logits.float(), dim=-1))

    def scalar(self, logits):
        sm = _softmax64(logits)
        if sm is None:
            return None
        _, total, m, spread = sm
        lse = m + math.log(total)
        if lse > 80.0:  # exp(lse) nears float32's range; score decides
            return None
        s = 1.0 / (1.0 + math.exp(lse))
        # float32 logsumexp: each step (z - max, exp, sum, log, + max) is within a few ulps of
        # max(|max|, |lse|, spread, C); d sigmoid(-lse) = -s (1 - s) d(lse), so s moves by at most
        # s (1 - s) d(lse) (doubled for the second order), plus sigmoid's own few ulps.
        d_lse = _SLACK * (1.0 + len(logits) + abs(m) + abs(lse) + spread)
        return s, s * (2.0 * (1.0 - s) * d_lse + _SLACK)


@SIGNALS.register("entropy")
class Entropy(Signal):
    """Normalised entropy -sum p log p / log C, in [0, 1]; low is easy (DeeBERT)."""

    name = "entropy"

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        # entr(p) = -p log p, 0 at p = 0: finite for logits of any size, and few kernels (this
        # runs after every layer of true early exit).
        ent = torch.special.entr(torch.softmax(layer_logits.float(), dim=-1)).sum(-1)
        return ent / math.log(layer_logits.shape[-1])

    def scalar(self, logits):
        ent = _entropy64(logits)
        if ent is None:
            return None
        h, spread = ent
        c = len(logits)
        # float32 p_max is within C ulps of p_max (z_max - max is exact) and entr'(p) = -(log p + 1)
        # is at most 1 in size there: C ulps absolute. Every other p_i is within (C + spread) ulps
        # (relative), and sum_{i != max} p_i (|log p_i| + 1) <= H + (1 - p_max) <= 2 H (H >= -log
        # p_max >= 1 - p_max): at most 2 H (C + spread + 1) ulps, the sum's rounding included.
        bound = _SLACK * (1.0 + c + 2.0 * (c + spread + 1.0) * h)
        log_c = math.log(c)
        return h / log_c, bound / log_c


@SIGNALS.register("softmax")
class MaxSoftmax(Signal):
    """Maximum softmax probability; high is easy."""

    name = "softmax"
    higher_is_easier = True

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(layer_logits.float(), dim=-1).amax(-1)

    def scalar(self, logits):
        sm = _softmax64(logits)
        if sm is None:
            return None
        _, total, _, spread = sm
        p = 1.0 / total  # exp(max - max) / sum
        return p, p * _SLACK * (2.0 + len(logits) + spread)


@SIGNALS.register("patience")
class Patience(Signal):
    """PABEE: how many consecutive earlier layers agree with this layer's argmax; exit at >= tau."""

    name = "patience"
    higher_is_easier = True
    strict = False
    integer = True
    differentiable = False
    needs_history = True

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        preds = layer_logits.argmax(-1)  # [N, M]
        same = torch.zeros_like(preds, dtype=torch.bool)
        same[:, 1:] = preds[:, 1:] == preds[:, :-1]
        # Run length of agreement ending at each layer, without a Python loop over samples:
        # count[m] = m - (last layer <= m where agreement broke).
        idx = torch.arange(preds.shape[1], device=preds.device).expand_as(preds)
        breaks = torch.where(same, torch.zeros_like(idx), idx)
        last_break = torch.cummax(breaks, dim=1).values
        return (idx - last_break).float()


@SIGNALS.register("raw-entropy")
class RawEntropy(Signal):
    """Entropy of the softmax in nats (not normalised by log C); low is easy (BERxiT, DeeBERT thresholds)."""

    name = "raw-entropy"

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(layer_logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    def scalar(self, logits):
        ent = _entropy64(logits)
        if ent is None:
            return None
        h, spread = ent
        # float32 log p_i = (z_i - max) - log S is within (|z_i - max| + log S + 1) ulps absolute,
        # log S = -log p_max <= H; -(p log p) moves by |log p + 1| p times that: the max term by at
        # most (H + 1) ulps, the others together by at most 2 H (spread + H + 1) ulps (see
        # Entropy.scalar), plus the sum's C ulps of H.
        return h, _SLACK * (1.0 + h + (2.0 * (spread + h + 1.0) + len(logits)) * h)


def get_signal(name_or_signal: str | Signal) -> Signal:
    """A signal instance by name (``energy``, ``entropy``, ``softmax``, ``patience``, ...)."""
    if isinstance(name_or_signal, Signal):
        return name_or_signal
    return SIGNALS.get(name_or_signal)()


def list_signals() -> list[str]:
    return SIGNALS.names()
