"""``disentangled``: DisentangledEE (Ji, Wang, Li, Chen, Chen, Zhang, Findings ACL 2023), as the
official code (Jikai0Wang/DREE).

Documented in docs/methods.md, "DisentangledEE".

* **Parallel adapter per layer, read only by that layer's exit** (``model.extras["adapters"]``,
  one per internal exit 1..M-1; exit M reads the normal layer output, so the code's M-th adapter,
  which is never used, is not built). Inside layer i, with a the attention-sublayer output and
  ffn = W_2 GELU(W_1 a) *before* the FFN dropout::

      e_i = LN_adapter(scaling * Up(ReLU(Down(a))) + ffn + a)     Down H -> 128, Up 128 -> H, scaling 8

  The main path is unchanged (LN(dropout(ffn) + a) goes to the next layer); e_i is never fed
  forward. Adapters start BERT-style (normal(0, 0.02), biases 0). This needs the method's own path
  through the layers (``DisentangledRoute``, an ``eebench.model.backbone.ExitRoute``), used identically in
  training, the one-pass forward and true early exit.
* **Exit head** (``model.extras["etf"]``, one per exit): the cell's pooling and transform of e_i
  (``--pooling pooler`` is the paper's shared pretrained BertPooler on [CLS]; the study's default
  is mean pooling, no transform), dropout (the head dropout, 0.1), then the simplex-ETF
  classifier: logits = normalize(BatchNorm1d(x)) . M_etf with
  M_etf = sqrt(C/(C-1)) P (I_C - 1 1^T / C), P in R^{H x C} with orthonormal columns (QR of a
  uniform random matrix). M_etf is a **buffer** (saved with the model, never trained; the code
  keeps it as a plain attribute, regenerated from numpy's RNG); only the BatchNorm learns. Logits
  lie in [-1, 1]. The BatchNorm runs in eval mode at inference (running statistics), so one-pass
  simulation and true early exit see the same numbers at any batch size.
* **Training, two phases** (fresh AdamW, linear decay, no warm-up each):
  stage 1 (``backbone``, ``final``, ``extras.etf``; the run's rate): CE of the final exit only;
  stage 2 (``extras.adapters``, ``extras.etf``; one rate ``stage2_lr`` = 8e-3, the BERT SST-2
  script): L = sum_{i<M} (M - i) CE_i / sum_{i<M} (M - i), shallow exits weighted more, the
  final exit out of the loss. At the start of stage 2 the adapter LayerNorms are initialised from
  their layer's output LayerNorm.
* **Exit**: PABEE patience on the argmax of the ETF logits: ``--signals patience`` (shared by
  every cell). The code's default patience is 6 (BERT-base, 12 layers).

Reconstructed / exposed as hyper-parameters (the code is the default):

* ``loss``: ``ce`` (the code) or ``dr``, the dot-regression loss 0.5 (z_y - 1)^2 on the ETF logit
  of the true class (defined in the code, never called; the paper's loss could not be checked);
* ``ln_init``: ``code`` copies every adapter LayerNorm's weight but only the last internal
  layer's bias (the code's loop bug); ``full`` copies weight and bias for every layer; ``none``
  keeps (1, 0);
* ``final_bn``: ``train`` (the code: the final head's BatchNorm, out of the stage-2 loss, still
  updates its running statistics in stage 2, so the final exit drifts slightly) or ``eval`` (it
  normalises with its stage-1 statistics in stage 2);
* ``stage2_epochs_factor``: stage 2 runs this many times the run's epochs (the BERT SST-2 script:
  5 epochs then 1; here both stages run the run's epochs by default);
* ``etf_seed``: the seed of the ETF matrices (the code draws them from the run's numpy RNG).

Not reproduced: the code evaluates on dev every 100 (stage 1) / 10 (stage 2) steps and keeps the
best-accuracy checkpoint under a FLOPs cap; eebench keeps the last step (a protocol warning says
so). In stage 1 the internal heads' BatchNorm statistics also update (eebench computes every exit
in every pass; they get no gradient, and stage 2 re-estimates them). BERT-style encoders only
(BERT, RoBERTa, ELECTRA, ...): the adapter reads the inside of the layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eebench.api import (
    BertLikeAdapter,
    EebenchError,
    ExitRoute,
    Phase,
    StepContext,
    Strategy,
    per_layer_ce,
    register_method,
)

__all__ = ["etf_matrix", "EtfHead", "ParallelAdapter", "DisentangledRoute", "stage2_weights", "dot_regression",
           "Disentangled"]

LOSSES = ("ce", "dr")
LN_INITS = ("code", "full", "none")
FINAL_BN = ("train", "eval")


def etf_matrix(hidden_size: int, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A simplex equiangular tight frame [H, C]: unit-norm columns with pairwise cosine -1/(C-1),
    M = sqrt(C/(C-1)) P (I - 1 1^T / C) with P = the Q of a QR of a uniform random [H, C] matrix."""
    if num_classes < 2 or hidden_size < num_classes:
        raise EebenchError(f"a simplex ETF needs 2 <= classes <= hidden size; got {num_classes} classes, "
                           f"hidden size {hidden_size}")
    a = torch.rand(hidden_size, num_classes, generator=generator, dtype=torch.float64)
    p, _ = torch.linalg.qr(a)  # [H, C], orthonormal columns
    c = num_classes
    centre = torch.eye(c, dtype=torch.float64) - torch.full((c, c), 1.0 / c, dtype=torch.float64)
    return (math.sqrt(c / (c - 1)) * p @ centre).to(torch.float32)


class EtfHead(nn.Module):
    """BatchNorm1d -> L2 normalisation -> fixed simplex ETF: [N, H] -> logits [N, C] in [-1, 1].

    Only the BatchNorm's affine parameters learn; ``etf`` is a buffer (saved, never trained)."""

    def __init__(self, hidden_size: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.bn = nn.BatchNorm1d(hidden_size)
        self.register_buffer("etf", etf_matrix(hidden_size, num_classes, generator))

    def forward(self, x: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        """Logits of ``x`` [N, H], in float32. In training the batch statistics normalise (and
        update the running ones) unless ``update_stats`` is False or the batch has one row; then,
        as in eval, the running statistics normalise."""
        x = x.float()
        bn = self.bn
        if bn.training and update_stats and x.shape[0] > 1:
            y = bn(x)
        else:  # the running statistics, nothing updated (BatchNorm cannot train on one row)
            y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.normalize(y, dim=-1) @ self.etf


class ParallelAdapter(nn.Module):
    """e = LN(scaling * Up(ReLU(Down(a))) + ffn + a): the exit's view of one layer."""

    def __init__(self, hidden_size: int, bottleneck: int = 128, scaling: float = 8.0, eps: float = 1e-12):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.scaling = float(scaling)
        self.ln = nn.LayerNorm(hidden_size, eps=eps)
        for lin in (self.down, self.up):  # BERT-style init
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, attn: torch.Tensor, ffn: torch.Tensor) -> torch.Tensor:
        """attn: the attention-sublayer output, ffn: the FFN output before dropout, [N, L, H]."""
        branch = self.scaling * self.up(torch.relu(self.down(attn)))
        return self.ln(branch + ffn + attn)


class DisentangledRoute(ExitRoute):
    """Each BERT layer run as its parts, so that exit i < M reads e_i from its adapter; the main
    path performs exactly the operations of the layer's own forward."""

    def __init__(self, model, strategy: Disentangled):
        self.model, self.strategy = model, strategy
        self.layers = model.adapter.layers()[: model.num_layers]
        self.num_exits = model.num_layers
        self.heads = model.heads
        self.adapters = model.extras["adapters"]
        self.etf = model.extras["etf"]
        self._taps: tuple[torch.Tensor, torch.Tensor] | None = None

    def layer(self, i: int, hidden: torch.Tensor, state: dict) -> torch.Tensor:
        lay = self.layers[i]
        attn = lay.attention(hidden, state.get("mask"))[0]
        ffn = lay.output.dense(lay.intermediate(attn))  # before the dropout: what the adapter reads
        out = lay.output.LayerNorm(lay.output.dropout(ffn) + attn)
        self._taps = (attn, ffn) if i < self.num_exits - 1 else None
        return out

    def exit(self, i: int, hidden: torch.Tensor, mask: torch.Tensor | None):
        last = i == self.num_exits - 1
        src = hidden if last else self.adapters[i](*self._taps)
        x = self.heads.pooled_vector(i, src, mask)
        f = self.heads.dropout(x) if self.heads.training else x
        frozen = last and self.strategy.hparams["final_bn"] == "eval" and self.strategy.stage == 1
        return x, f, self.etf[i](f, update_stats=not frozen)


def stage2_weights(num_layers: int) -> torch.Tensor:
    """(M - i) / sum_{j<M} (M - j) for exits i = 1..M-1: [M - 1], shallow exits weighted more."""
    w = torch.arange(num_layers - 1, 0, -1, dtype=torch.float64)
    return (w / w.sum()).to(torch.float32)


def dot_regression(layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0.5 (z_y - 1)^2 per sample and exit, [N, M]: the ETF logit of the true class pulled to 1
    (the features are unit-norm and the ETF columns too, so 1 is the largest value)."""
    zy = layer_logits.float().gather(-1, labels.view(-1, 1, 1).expand(-1, layer_logits.shape[1], 1)).squeeze(-1)
    return 0.5 * (zy - 1.0) ** 2


@register_method("disentangled", "DisentangledEE: parallel adapters read only by the exits, fixed simplex-ETF heads "
                 "with BatchNorm; final exit first, then the adapters with (M-i)-weighted CE (official code; "
                 "exit: patience)")
class Disentangled(Strategy):
    defaults = {"bottleneck": 128, "scaling": 8.0, "stage2_lr": 8e-3, "stage2_epochs_factor": 1, "loss": "ce",
                "ln_init": "code", "final_bn": "train", "etf_seed": 0}

    def __init__(self, name: str, **hparams):
        super().__init__(name, **hparams)
        for key, known in (("loss", LOSSES), ("ln_init", LN_INITS), ("final_bn", FINAL_BN)):
            if self.hparams[key] not in known:
                raise EebenchError(f"{name}.{key}={self.hparams[key]!r}; known: {', '.join(known)}")
        if int(self.hparams["stage2_epochs_factor"]) < 1:
            raise EebenchError(f"{name}.stage2_epochs_factor={self.hparams['stage2_epochs_factor']!r}; "
                               "it must be a whole number >= 1")
        #: The phase in progress (0: stage 1, 1: stage 2); kept in the checkpoint.
        self.stage = 0

    # -- contract ------------------------------------------------------------------------
    def modules(self, model) -> dict[str, nn.Module]:
        if not isinstance(model.adapter, BertLikeAdapter):
            raise EebenchError(f"method {self.name!r} needs a BERT-style encoder (its adapters read the inside of "
                               f"each layer); {model.backbone.config.model_type!r} is not one; supported: bert, "
                               "roberta, xlm-roberta, camembert, electra")
        c = model.config.num_labels
        if c < 2:
            raise EebenchError(f"method {self.name!r} needs a classification task (its simplex-ETF heads need "
                               f"2 or more classes); this task has {c} output")
        h = model.heads.classifiers[0].in_features
        eps = model.backbone.config.layer_norm_eps
        g = torch.Generator().manual_seed(int(self.hparams["etf_seed"]))
        return {
            "adapters": nn.ModuleList(ParallelAdapter(h, int(self.hparams["bottleneck"]), float(self.hparams["scaling"]),
                                                      eps) for _ in range(model.num_layers - 1)),
            "etf": nn.ModuleList(EtfHead(h, c, g) for _ in range(model.num_layers)),
        }

    def route(self, model) -> DisentangledRoute:
        return DisentangledRoute(model, self)

    def phases(self) -> list[Phase]:
        return [Phase("stage1-final", trainable=["backbone", "final", "extras.etf"]),
                Phase("stage2-adapters", trainable=["extras.adapters", "extras.etf"],
                      epochs_factor=int(self.hparams["stage2_epochs_factor"]), lr=float(self.hparams["stage2_lr"]))]

    def on_phase_start(self, index: int, phase: Phase, trainer, train_ds) -> None:
        self.stage = index
        if index == 1:
            init_adapter_norms(self.model, self.hparams["ln_init"])

    def compute_loss(self, out, labels: torch.Tensor, ctx: StepContext):
        logits = out.logits.float()
        per = per_layer_ce(logits, labels) if self.hparams["loss"] == "ce" else dot_regression(logits, labels)
        per = per.mean(0)  # [M]
        logs = {"loss_per_layer": per.detach()}
        if ctx.phase == 0:
            return per[-1], logs
        w = stage2_weights(logits.shape[1]).to(per.device)
        return (w * per[:-1]).sum(), logs

    def protocol_warnings(self, epochs: int) -> list[str]:
        return ["disentangled: the official code keeps the best dev checkpoint under a FLOPs cap (every 10 stage-2 "
                "steps); eebench keeps the last step"]

    def state_dict(self) -> dict:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state.get("stage", 0))


@torch.no_grad()
def init_adapter_norms(model, how: str) -> None:
    """Start adapter i's LayerNorm from layer i's output LayerNorm: ``full`` copies weight and
    bias; ``code`` (the official loop bug) every weight but only the last internal layer's bias;
    ``none`` nothing."""
    if how == "none":
        return
    adapters = model.extras["adapters"]
    layers = model.adapter.layers()
    for i, ad in enumerate(adapters):
        src = layers[i].output.LayerNorm
        ad.ln.weight.copy_(src.weight)
        if how == "full" or i == len(adapters) - 1:
            ad.ln.bias.copy_(src.bias)
