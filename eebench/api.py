"""The stable surface for plugin authors: everything a method, signal, exit policy or exit head
file imports. Import from here (``from eebench.api import Strategy, register_method, ...``), not
from the modules behind it, so that the package's internal layout can change without breaking
plugins; a name that leaves this list is an incompatible change.

Nothing inside ``eebench`` imports this module: it sits above every layer.
"""

from __future__ import annotations

from eebench.errors import EebenchError, UnknownNameError
from eebench.exits.metrics import speedup_ratio
from eebench.exits.policies import POLICIES, ExitPolicy, SignalPolicy, get_policy, register_policy
from eebench.exits.rule import exit_layers_from_scores, predictions_at_exit
from eebench.exits.signals import SIGNALS, RawEntropy, Signal, get_signal
from eebench.model.backbone import (
    HEADS,
    BertLikeAdapter,
    EncoderAdapter,
    ExitCombiner,
    ExitOutput,
    ExitRoute,
    HeadKind,
    LayerStepper,
    MultiExitModel,
    register_head,
)
from eebench.strategy import (
    METHODS,
    Phase,
    StepContext,
    Strategy,
    add_preset,
    build_strategy,
    exit_kd_matrix,
    get_method,
    list_methods,
    per_layer_ce,
    register_method,
)

#: ``@register_signal("name")`` on a ``Signal`` subclass makes it an exit signal of every cell.
register_signal = SIGNALS.register

__all__ = [
    # methods: the contract and its registry
    "Strategy", "Phase", "StepContext", "register_method", "add_preset", "per_layer_ce", "exit_kd_matrix", "METHODS",
    "build_strategy", "get_method", "list_methods",
    # the model a method sees
    "ExitOutput", "LayerStepper", "MultiExitModel",
    # a method's own path through a layer to its exit, and the encoder adapters it builds on
    "ExitRoute", "EncoderAdapter", "BertLikeAdapter",
    # a method's own exit logits from the layers so far (GPFEE's gated past-future classifier)
    "ExitCombiner",
    # exit heads
    "HEADS", "HeadKind", "register_head",
    # signals and exit policies
    "Signal", "SIGNALS", "register_signal", "get_signal", "RawEntropy",
    "ExitPolicy", "SignalPolicy", "POLICIES", "register_policy", "get_policy",
    # the exit rule and speed-up, for methods that simulate exits while training
    "exit_layers_from_scores", "predictions_at_exit", "speedup_ratio",
    # errors people can act on
    "EebenchError", "UnknownNameError",
]
