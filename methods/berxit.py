"""``berxit-*``: BERxiT (Xin, Tang, Yu, Lin, EACL 2021), as the official code (castorini/berxit).

Documented in docs/methods.md, "Methods with their own modules and exit policies". Routines (presets):

* ``berxit-two-stage`` (= DeeBERT): stage 1 trains backbone + final head on L_M; stage 2 only the
  internal exits on sum_{i<M} L_i (a sum), fresh AdamW and schedule, same epochs;
* ``berxit-all``: sum_{i<M} L_i + L_M every step;
* ``berxit-alternate`` (ALT): with s the micro-batch index within the epoch (0-based, reset every
  epoch), even s -> L_M, odd s -> sum_{i<M} L_i + L_M;
* ``berxit-alternate-lte``: ALT plus the learning-to-exit module (one Linear(H, 1) + sigmoid shared
  by every layer, on the exit features after dropout, not detached) and its loss
  L_LTE = mean_{i, n} (u_{i,n} - t_{i,n})^2 with t = 1 - 1[argmax z_i = y] (detached):
  even s -> L_M + L_LTE, odd s -> sum_{i<M} L_i + L_LTE. The code drops L_M on odd steps (a
  deviation from plain ALT); ``odd_final_loss=true`` adds it back.

Exit rules: ``lte`` (this method's policy: exit at layer i < M when u_i < tau, strict; u is an
uncertainty) and ``raw-entropy`` (a signal available to every cell: H(p_i) in nats < tau, via
log-softmax, never a naive exp). Heads: the paper's exits are a dense + tanh pooler per exit
initialised from the pretrained pooler, and the final prediction comes from the original pooler:
``--pooling exit-pooler --final-pooling pooler``; with linear exits (the default poolings) say so
in a write-up.
"""

from __future__ import annotations

import torch
from torch import nn

from eebench.api import (
    EebenchError,
    ExitPolicy,
    Phase,
    RawEntropy,  # noqa: F401 - BERxiT's entropy exit, shared by every cell
    StepContext,
    Strategy,
    add_preset,
    per_layer_ce,
    register_method,
)

__all__ = ["lte_targets", "lte_targets_regression", "lte_loss", "LteHead", "LteExit", "RawEntropy", "Berxit"]

ROUTINES = ("two_stage", "all", "alternate")


def lte_targets(layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Classification targets of the LTE, [N, M]: 1 where exit i predicts the wrong class, else 0
    (detached)."""
    return (layer_logits.detach().argmax(-1) != labels.unsqueeze(1)).to(torch.float32)


def lte_targets_regression(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression targets, [N, M]: |tanh(y_hat_i - y)| (detached); 0 when the exit is exact."""
    return torch.tanh(predictions.detach() - targets.unsqueeze(1)).abs()


def lte_loss(uncertainty: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over layers and samples of (u - t)^2."""
    return ((uncertainty.float() - targets) ** 2).mean()


class LteHead(nn.Module):
    """The learning-to-exit module: one Linear(H, 1) + sigmoid shared by every layer."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Uncertainty u in (0, 1): [..., H] -> [...]."""
        return torch.sigmoid(self.linear(features)).squeeze(-1)


class LteExit(ExitPolicy):
    """BERxiT's LTE exit: leave at the first layer i < M with u_i < tau (strict)."""

    name = "lte"
    higher_is_easier = False
    strict = True
    uses_model = True

    def scores(self, out) -> torch.Tensor:
        lte = self.model.extras["lte"]
        # Layer by layer ([N, H] each), the same operation the engine runs after every layer.
        return torch.stack([lte(out.features[:, i]) for i in range(out.features.shape[1])], 1)

    def step(self, layer, logits, features, state):
        return self.model.extras["lte"](features), None


@register_method("berxit-alternate-lte",
                 "BERxiT ALT + learning-to-exit (official code; exit policy lte); exits as the paper: "
                 "--pooling exit-pooler --final-pooling pooler",
                 routine="alternate", lte=True)
class Berxit(Strategy):
    defaults = {"routine": "alternate", "lte": False, "odd_final_loss": False}

    def __init__(self, name: str, **hparams):
        super().__init__(name, **hparams)
        if self.hparams["routine"] not in ROUTINES:
            raise EebenchError(f"{name}.routine={self.hparams['routine']!r}; known: {', '.join(ROUTINES)}")

    # -- contract ------------------------------------------------------------------------
    def modules(self, model) -> dict[str, nn.Module]:
        if not self.hparams["lte"]:
            return {}
        return {"lte": LteHead(model.heads.classifiers[0].in_features)}

    def policies(self) -> dict[str, type[ExitPolicy]]:
        return {"lte": LteExit} if self.hparams["lte"] else {}

    def phases(self) -> list[Phase]:
        if self.hparams["routine"] != "two_stage":
            return [Phase("joint")]
        stage2 = ["internal", "extras.lte"] if self.hparams["lte"] else ["internal"]
        # Stage 1 holds everything but the exits ("raw"); stage 2 only the exits ("only_highway"),
        # with a fresh optimiser and schedule (every Phase starts one).
        return [Phase("raw", trainable=["backbone", "final", "extras"]), Phase("only-highway", trainable=stage2)]

    def compute_loss(self, out, labels: torch.Tensor, ctx: StepContext):
        logits = out.logits.float()
        ce = per_layer_ce(logits, labels).mean(0)  # [M]
        routine, lte = self.hparams["routine"], self.hparams["lte"]
        logs = {"ce_per_layer": ce.detach()}
        odd = ctx.micro % 2 == 1
        if routine == "two_stage":
            loss = ce[-1] if ctx.phase == 0 else ce[:-1].sum()
        elif routine == "all":
            loss = ce.sum()
        elif not odd:
            loss = ce[-1]
        elif lte and not self.hparams["odd_final_loss"]:
            loss = ce[:-1].sum()  # the official code: no L_M on odd steps with LTE
        else:
            loss = ce.sum()
        if lte and (routine != "two_stage" or ctx.phase == 1):
            u = self.model.extras["lte"](out.features)  # after dropout, not detached
            l_lte = lte_loss(u, lte_targets(logits, labels))
            loss = loss + l_lte
            logs["l_lte"] = l_lte.detach()
        return loss, logs


add_preset("berxit-two-stage", Berxit, "BERxiT two_stage (= DeeBERT): final layer first, then the exits on a frozen "
           "backbone (sum of exit losses)", routine="two_stage")
add_preset("berxit-all", Berxit, "BERxiT all: sum of every exit's loss each step", routine="all")
add_preset("berxit-alternate", Berxit, "BERxiT ALT: L_M on even steps, sum_i L_i + L_M on odd steps (within the epoch)",
           routine="alternate")
