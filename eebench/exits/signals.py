"""Exit signals: one number per sample and layer, plus the rule that turns it into an exit.

Every formula follows docs/methods.md. All signals work on logits of every layer,
``layer_logits`` of shape [N, M, C], and return scores of shape [N, M]. A new signal is one
class registered with ``@SIGNALS.register("name")``.
"""

from __future__ import annotations

import math

import torch

from eebench.errors import EebenchError
from eebench.registry import Registry


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

    def meets(self, scores: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
        """Boolean "exit here" for scores against thresholds (broadcast)."""
        if self.higher_is_easier:
            return scores > thresholds if self.strict else scores >= thresholds
        return scores < thresholds if self.strict else scores <= thresholds

    def check_task(self, num_labels: int) -> None:
        """Raise if the signal cannot be computed for a task with this many outputs."""
        if num_labels < 2:
            raise EebenchError(
                f"signal {self.name!r} needs a classification task (>= 2 classes), got {num_labels} output(s)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


SIGNALS: Registry[type[Signal]] = Registry("signal")


@SIGNALS.register("energy")
class Energy(Signal):
    """Normalised energy sigmoid(-logsumexp(f)), in (0, 1); low is easy (COSEE)."""

    name = "energy"

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        # sigmoid(-lse) == 1 / (1 + exp(lse)), computed without ever forming exp(lse).
        return torch.sigmoid(-torch.logsumexp(layer_logits.float(), dim=-1))


@SIGNALS.register("entropy")
class Entropy(Signal):
    """Normalised entropy -sum p log p / log C, in [0, 1]; low is easy (DeeBERT)."""

    name = "entropy"

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        # entr(p) = -p log p, 0 at p = 0: finite for logits of any size, and few kernels (this
        # runs after every layer of true early exit).
        ent = torch.special.entr(torch.softmax(layer_logits.float(), dim=-1)).sum(-1)
        return ent / math.log(layer_logits.shape[-1])


@SIGNALS.register("softmax")
class MaxSoftmax(Signal):
    """Maximum softmax probability; high is easy."""

    name = "softmax"
    higher_is_easier = True

    def score(self, layer_logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(layer_logits.float(), dim=-1).amax(-1)


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


def get_signal(name_or_signal: str | Signal) -> Signal:
    """A signal instance by name (``energy``, ``entropy``, ``softmax``, ``patience``, ...)."""
    if isinstance(name_or_signal, Signal):
        return name_or_signal
    return SIGNALS.get(name_or_signal)()


def list_signals() -> list[str]:
    return SIGNALS.names()
