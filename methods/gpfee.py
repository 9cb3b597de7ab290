"""``gpfee``: GPFEE, Global Past-Future Early Exit (Liao et al., NAACL 2021), as the official code
(lancopku/Early-Exit). Documented in docs/methods.md, "GPFEE".

* **Per-layer poolers**: pool_i = tanh(W_i x_i + b_i), newly initialised (normal, std 0.02; the
  pretrained pooler is not copied), on each exit's pooled token vector x_i (``ExitOutput.pooled``;
  the paper's [CLS]: run with ``--pooling cls``).
* **Future imitation** (``pred_layer``): f_j(p) = tanh(p W'_j + b'_j), one weight per *target*
  layer j, shared by every source layer.
* **Gated past-future classifier** at exit i: the state sequence is pool_0..pool_i (the past,
  current layer included) then f_{i+1}(pool_i)..f_{M-1}(pool_i) (the future); dropout on the whole
  stack; a_j = s_j P_j + c_j (2C numbers: C logit contributions, C gate features);
  past = sum_{j<=i} a_j[:C], future = sum_{j>i} a_j[:C] (sums, not means; future = 0 at i = M-1);
  lambda = sigmoid(G tanh(mean_{j<=i} a_j[C:]) + g) (C-dimensional);
  z_i = 2 lambda * past + (2 - 2 lambda) * future. z_i replaces the exit classifier's logits
  (``eebench.api.ExitCombiner``); it reads layers <= i only, so true early exit carries the
  running past sums between layers (engine state) and never runs a layer it has not reached.
* **Loss**: L = (L_task + imit_weight * L_imit) / 2 with L_task = sum_i i CE_i / sum_i i (PABEE
  weights, 1-based i) and L_imit = mean over source layers i < M of mean_{n, j>i}
  (1 - cos(f_j(pool_i), sg(pool_j))). In training the earlier pooled states pool_{j<i} of exit i
  are detached (``detach_past``); the imitation input pool_i is not, its targets are.
* **Stochastic bottom freezing** (the code's ``freezed_lower_layer`` = ``freeze_lower`` = k; not in
  the paper): at step t of T, with probability 1 - t/T the embeddings and the bottom k layers do
  not learn in this step (the code detaches their output; with no other path into them this is the
  same). Per-task k of ``finetune_all.sh``: MRPC 2, SST-2 2, QNLI 1, MNLI 3, QQP 2, RTE 1; the
  default is RTE's 1; ``freeze_lower=0`` turns it off.

Reconstructed / differing from the code (recorded in docs/methods.md):

* t counts optimiser steps here; the code counts micro-batches against optimiser steps, so with
  gradient accumulation a > 1 its freezing ends after 1/a of training (equal at a = 1, the RTE
  recipe). The coin is one draw per step for the whole bottom block (seeded by ``freeze_seed`` and
  the step: resuming draws the same coins, no extra state).
* The code zeroes gradients (Adam then still moves frozen weights by momentum); here a frozen
  parameter has no gradient and does not move.
* The init of ``pred_layer`` and the gated classifier (normal std 0.02, zero bias) follows BERT's
  init; the code's init of these raw parameters was not checked.
* The harness's own exit classifiers (``heads.classifiers``) stay in the model, unused.

Exit rule: ``raw-entropy`` (entropy of softmax(z_i) in nats < tau, strict), a signal every cell has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eebench.api import (
    ExitCombiner,
    RawEntropy,  # noqa: F401 - GPFEE's exit, shared by every cell
    StepContext,
    Strategy,
    per_layer_ce,
    register_method,
)

__all__ = ["GpfeeClassifier", "pabee_weights", "imitation_loss", "Gpfee"]


def _normal(*shape: int, std: float = 0.02) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


class GpfeeClassifier(ExitCombiner):
    """Per-layer poolers, the future-imitation layer and the gated past-future classifier.

    ``forward(pooled [N, M, H]) -> z [N, M, C]``; in eval it is ``step`` layer by layer (the
    engine's operations); in training the vectorised form with dropout and detached past states.
    """

    def __init__(self, hidden_size: int, num_labels: int, num_layers: int, dropout: float = 0.1,
                 detach_past: bool = True):
        super().__init__()
        h, c, m = hidden_size, num_labels, num_layers
        self.num_labels, self.num_layers, self.detach_past = c, m, detach_past
        self.poolers = nn.ModuleList(nn.Linear(h, h) for _ in range(m))
        for lin in self.poolers:
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.pred_weight = _normal(m, h, h)  # W'_j: target layer j
        self.pred_bias = nn.Parameter(torch.zeros(m, h))
        self.cls_weight = _normal(m, h, 2 * c)  # P_j
        self.cls_bias = nn.Parameter(torch.zeros(m, 2 * c))
        self.gate = nn.Linear(c, c)
        self.dropout = nn.Dropout(dropout)
        #: The last training pass's (input, pool, futures): the imitation loss reuses them
        #: instead of computing the M x M futures twice per step.
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- pieces shared by both forms --------------------------------------------------------
    def pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """pool_i = tanh(W_i x_i + b_i): [N, M, H] -> [N, M, H]."""
        return torch.stack([torch.tanh(self.poolers[i](pooled[:, i])) for i in range(pooled.shape[1])], 1)

    def futures(self, pool: torch.Tensor) -> torch.Tensor:
        """f_j(pool_i) for every source i and target j: [N, M, H] -> [N, M(i), M(j), H]."""
        return torch.tanh(torch.einsum("nih,jhk->nijk", pool, self.pred_weight) + self.pred_bias)

    def _combine(self, past: torch.Tensor, future: torch.Tensor, gate_mean: torch.Tensor) -> torch.Tensor:
        lam = torch.sigmoid(self.gate(torch.tanh(gate_mean)))
        return 2 * lam * past + (2 - 2 * lam) * future

    # -- incremental form (the engine; eval) --------------------------------------------------
    def step(self, layer: int, pooled: torch.Tensor, state):
        """z_i [n, C] from x_i [n, H] and the running sums of a_j over the past j < i."""
        c = self.num_labels
        p = torch.tanh(self.poolers[layer](pooled))
        a = p @ self.cls_weight[layer] + self.cls_bias[layer]
        if state is None:
            past, gate = a[:, :c], a[:, c:]
        else:
            past, gate = state[0] + a[:, :c], state[1] + a[:, c:]
        if layer + 1 < self.num_layers:
            f = torch.tanh(torch.einsum("nh,jhk->njk", p, self.pred_weight[layer + 1:]) + self.pred_bias[layer + 1:])
            future = (torch.einsum("njh,jhk->njk", f, self.cls_weight[layer + 1:, :, :c])
                      + self.cls_bias[layer + 1:, :c]).sum(1)
        else:
            future = torch.zeros_like(past)
        return self._combine(past, future, gate / (layer + 1)), (past, gate)

    # -- one pass ----------------------------------------------------------------------------
    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self._cache = None
            return super().forward(pooled)  # step by step: exactly the engine's operations
        pool = self.pool(pooled)
        fut = self.futures(pool)
        self._cache = (pooled, pool, fut)
        return self.train_logits(pooled, pool, fut)

    def pool_and_futures(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool, futures) of ``pooled``: the last training pass's when it read this very tensor
        (no dropout comes before them, so recomputing would give the same values)."""
        cache, self._cache = self._cache, None  # used once: no graph is kept past the step
        if cache is not None and cache[0] is pooled:
            return cache[1], cache[2]
        pool = self.pool(pooled)
        return pool, self.futures(pool)

    def train_logits(self, pooled: torch.Tensor, pool: torch.Tensor, fut: torch.Tensor | None = None) -> torch.Tensor:
        """The training form: S^(i) for every exit i at once ([N, M(i), M(j), H]), past states
        detached, dropout on the whole stack, then the gated sums."""
        n, m, _ = pool.shape
        fut = self.futures(pool) if fut is None else fut
        c = self.num_labels
        idx = torch.arange(m, device=pool.device)
        i_, j_ = idx.view(m, 1, 1), idx.view(1, m, 1)
        past_pool = pool.detach() if self.detach_past else pool
        states = torch.where((j_ < i_).unsqueeze(0), past_pool.unsqueeze(1),
                             torch.where((j_ == i_).unsqueeze(0), pool.unsqueeze(1), fut))
        states = self.dropout(states)
        a = torch.einsum("nijh,jhk->nijk", states, self.cls_weight) + self.cls_bias  # [N, M, M, 2C]
        is_past = (j_ <= i_).to(a.dtype).unsqueeze(0)  # [1, M, M, 1]
        past = (a[..., :c] * is_past).sum(2)
        future = (a[..., :c] * (1 - is_past)).sum(2)
        gate_mean = (a[..., c:] * is_past).sum(2) / (idx + 1).to(a.dtype).view(1, m, 1)
        return self._combine(past, future, gate_mean)


def pabee_weights(num_layers: int) -> torch.Tensor:
    """i / sum_i i for the 1-based layer i: [M]."""
    w = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return w / w.sum()


def imitation_loss(futures: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Mean over source layers i < M-1 (0-based) of mean_{n, j > i} (1 - cos(f_j(pool_i), sg(pool_j)));
    0 for one layer. ``futures`` [N, M(i), M(j), H], ``pool`` [N, M, H]."""
    m = pool.shape[1]
    if m < 2:
        return pool.sum() * 0
    cos = F.cosine_similarity(futures.float(), pool.detach().float().unsqueeze(1), dim=-1)  # [N, M(i), M(j)]
    idx = torch.arange(m, device=pool.device)
    later = (idx.view(1, m) > idx.view(m, 1)).to(cos.dtype)  # [i, j]: j > i
    per_source = ((1 - cos) * later).sum((0, 2)) / (later.sum(1) * cos.shape[0]).clamp_min(1)  # [M]
    return per_source[: m - 1].mean()


@register_method("gpfee", "GPFEE: gated past-future classifier over per-layer poolers + future imitation, "
                 "PABEE-weighted CE (official code; exit signal raw-entropy; paper heads: --pooling cls)")
class Gpfee(Strategy):
    defaults = {"imit_weight": 1.0, "freeze_lower": 1, "freeze_seed": 0, "detach_past": True,
                "gpfee_dropout": 0.1}

    def modules(self, model) -> dict[str, nn.Module]:
        h = model.heads.classifiers[0].in_features
        return {"gpfee": GpfeeClassifier(h, model.config.num_labels, model.num_layers,
                                         float(self.hparams["gpfee_dropout"]), bool(self.hparams["detach_past"]))}

    # -- stochastic bottom freezing --------------------------------------------------------------
    def _lower_upper(self) -> tuple[list[str], list[str]]:
        """Prefixes of the backbone's embeddings + bottom k layers, and of the rest."""
        model = self.model
        k = min(int(self.hparams["freeze_lower"]), model.num_layers)
        names = {id(mod): name for name, mod in model.named_modules()}
        layers = model.adapter.layers()
        lower = [names[id(layers[i])] + "." for i in range(k)]
        upper = sorted({names[id(layers[i])] + "." for i in range(k, len(layers))} - set(lower))
        rest = [n for n, _ in model.named_parameters() if n.startswith("backbone.")
                and not any(n.startswith(p) for p in lower + upper)]
        # Everything of the backbone outside its layers (embeddings, projections) sits below layer 1;
        # its unused pooler learns nothing either way.
        return lower + rest, upper

    def param_groups(self) -> dict[str, dict]:
        if int(self.hparams["freeze_lower"]) <= 0 or self.model is None:
            return {}
        lower, upper = self._lower_upper()
        return {"gpfee-lower": {"prefixes": lower}, "gpfee-upper": {"prefixes": upper}}

    def frozen_at(self, ctx: StepContext) -> bool:
        """Whether the bottom block is frozen at this step: a coin with P = 1 - t/T."""
        if int(self.hparams["freeze_lower"]) <= 0:
            return False
        g = torch.Generator().manual_seed(int(self.hparams["freeze_seed"]) * 1_000_003 + ctx.step)
        u = float(torch.rand((), generator=g))
        return u < 1 - ctx.step / max(ctx.total_steps, 1)

    def trainable_now(self, ctx: StepContext):
        if not self.frozen_at(ctx):
            return None
        return ["gpfee-upper", "internal", "final", "extras"]

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, out, labels: torch.Tensor, ctx: StepContext):
        comb: GpfeeClassifier = self.model.extras["gpfee"]
        logits = out.logits.float()
        m = logits.shape[1]
        ce = per_layer_ce(logits, labels).mean(0)  # [M]
        task = (ce * pabee_weights(m).to(ce.device)).sum()
        pool, fut = comb.pool_and_futures(out.pooled)
        imit = imitation_loss(fut, pool)
        loss = (task + float(self.hparams["imit_weight"]) * imit) / 2
        return loss, {"task": task.detach(), "imit": imit.detach(), "ce_per_layer": ce.detach()}

