"""``palbert``: PALBERT (Balagansky & Gavrilov, NeurIPS 2022), as the official code (tinkoff-ai/palbert).

Documented in docs/methods.md, "Methods with their own modules and exit policies".

* **Lambda layer** (one module shared by all layers, ``model.extras["lambda_layer"]``): input
  x_i = [pool_i; pool_{i-1}] (pool_0 = 0), dropout, 3 x [Linear 2H -> 2H + tanh], Linear 2H -> 1,
  sigmoid -> lambda_i. pool_i is the exit's pooled vector before the classifier's dropout.
* **Exit distribution**: p_i = lambda_i prod_{j<i} (1 - lambda_j), CDF_i = sum_{j<=i} p_j; the last
  layer is not forced to lambda_M = 1. Epsilon-truncation: where the CDF before layer i exceeds
  1 - eps, p_i is the constant eps/M (no gradient); layers from the first one where every sample
  of the batch is past 1 - eps contribute no task loss (the official forward stops there).
* **Loss**: sum_i mean_n(p_{i,n} ce_{i,n}) (not normalised) + beta * KL(prior || p), the
  code's direction (the PonderNet paper writes KL(p || prior)), with the geometric prior
  p_G[k] = lambda_p (1 - lambda_p)^k for k < M - 1 and the remainder at M - 1.
* **Optimiser**: Adam (not AdamW), constant rate; the lambda layer is its own parameter group at
  ``lambda_lr``.
* **Exit**: the deterministic Q-exit, policy ``q-exit``: leave at the first layer i < M whose
  CDF_i > q (strict; q = 0.5 is the median of the exit distribution), computed in float64.

Differences from the official code: per-layer exit heads (the harness's backbone) instead of
ALBERT's one shared head (DisentangledEE's BERT re-implementation does not say which it used);
every layer is computed in training (the masked layers' task loss is dropped, which gives the same
loss); fixed epochs rather than early stopping on dev; log p is clamped at 1e-12 (the code has no
clamp; only an underflow changes).
"""

from __future__ import annotations

import torch
from torch import nn

from eebench.api import ExitPolicy, Phase, StepContext, Strategy, per_layer_ce, register_method

__all__ = ["LambdaLayer", "exit_distribution", "geometric_prior", "kl_prior_to_p", "q_exit_cdf", "QExit", "Palbert"]


class LambdaLayer(nn.Module):
    """[pool_i; pool_{i-1}] (2H) -> dropout -> 3 x (Linear 2H->2H + tanh) -> Linear 2H->1 -> sigmoid."""

    def __init__(self, hidden_size: int, dropout: float = 0.1, depth: int = 3):
        super().__init__()
        d = 2 * hidden_size
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        for _ in range(depth):
            layers += [nn.Linear(d, d), nn.Tanh()]
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """lambda in (0, 1): pooled, previous [..., H] -> [...]."""
        return torch.sigmoid(self.net(torch.cat([pooled, previous], -1))).squeeze(-1)


def lambdas(layer: LambdaLayer, pooled: torch.Tensor) -> torch.Tensor:
    """lambda [N, M] of every layer from the pooled exit vectors [N, M, H], layer by layer ([N, 2H]
    each: the same operation the engine runs after every layer)."""
    prev = torch.zeros_like(pooled[:, 0])
    out = []
    for i in range(pooled.shape[1]):
        out.append(layer(pooled[:, i], prev))
        prev = pooled[:, i]
    return torch.stack(out, 1)


def exit_distribution(lam: torch.Tensor, eps: float | None = 0.05) -> tuple[torch.Tensor, int]:
    """(p [N, M], computed): the exit distribution of lambda [N, M] with epsilon-truncation, and
    how many layers the official forward would have computed (the task loss covers those)."""
    n, m = lam.shape
    survive = torch.cumprod(torch.cat([torch.ones_like(lam[:, :1]), 1 - lam[:, :-1]], 1), 1)  # prod_{j<i}
    p = lam * survive
    if eps is None:
        return p, m
    cdf_before = 1 - survive  # the CDF before layer i
    done = cdf_before > 1 - eps
    p = torch.where(done, torch.full_like(p, eps / m), p)
    all_done = done.all(0)
    computed = int(all_done.to(torch.uint8).argmax()) if bool(all_done.any()) else m
    return p, computed


def geometric_prior(lambda_p: float, num_layers: int) -> torch.Tensor:
    """p_G[k] = lambda_p (1 - lambda_p)^k for k < M - 1, the remainder (1 - lambda_p)^(M-1) at M - 1."""
    k = torch.arange(num_layers, dtype=torch.float64)
    prior = lambda_p * (1 - lambda_p) ** k
    prior[-1] = (1 - lambda_p) ** (num_layers - 1)
    return prior


def kl_prior_to_p(p: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(prior || p) averaged over the batch: (1/N) sum_n sum_k p_G[k] (log p_G[k] - log p[n, k])."""
    prior = prior.to(p.dtype).to(p.device)
    logp = p.clamp_min(1e-12).log()
    return (prior * (prior.log() - logp)).sum(-1).mean()


def q_exit_cdf(lam: torch.Tensor) -> torch.Tensor:
    """CDF [N, M] of the exit distribution (no truncation), accumulated layer by layer in float64
    exactly as the engine does it."""
    lam = lam.double()
    cdf = torch.zeros_like(lam[:, 0])
    surv = torch.ones_like(lam[:, 0])
    out = []
    for i in range(lam.shape[1]):
        cdf, surv = _q_step(lam[:, i], cdf, surv)
        out.append(cdf)
    return torch.stack(out, 1)


def _q_step(lam: torch.Tensor, cdf: torch.Tensor, surv: torch.Tensor):
    return cdf + lam * surv, surv * (1 - lam)


class QExit(ExitPolicy):
    """PALBERT's deterministic Q-exit: leave at the first layer i < M with CDF_i > q (strict)."""

    name = "q-exit"
    higher_is_easier = True
    strict = True
    uses_model = True

    def scores(self, out) -> torch.Tensor:
        return q_exit_cdf(lambdas(self.model.extras["lambda_layer"], out.pooled))

    def step(self, layer, logits, features, state):
        lam_layer = self.model.extras["lambda_layer"]
        if state is None:
            prev = torch.zeros_like(features)
            cdf = torch.zeros(features.shape[0], dtype=torch.float64, device=features.device)
            surv = torch.ones_like(cdf)
        else:
            prev, cdf, surv = state
        cdf, surv = _q_step(lam_layer(features, prev).double(), cdf, surv)
        return cdf, (features, cdf, surv)


@register_method("palbert", "PALBERT: lambda layers over [pool_i; pool_i-1], exit distribution + geometric prior "
                 "(official code; exit policy q-exit)")
class Palbert(Strategy):
    defaults = {"beta": 0.5, "lambda_p": 0.1, "eps": 0.05, "lambda_lr": 1e-5, "lambda_dropout": 0.1,
                "optimizer": "adam", "schedule": "constant"}

    def modules(self, model) -> dict[str, nn.Module]:
        h = model.heads.classifiers[0].in_features
        return {"lambda_layer": LambdaLayer(h, float(self.hparams["lambda_dropout"]))}

    def param_groups(self) -> dict[str, dict]:
        return {"lambda": {"prefixes": ["extras.lambda_layer."], "lr": float(self.hparams["lambda_lr"])}}

    def phases(self) -> list[Phase]:
        return [Phase("joint", optimizer=self.hparams["optimizer"], schedule=self.hparams["schedule"])]

    def policies(self) -> dict[str, type[ExitPolicy]]:
        return {"q-exit": QExit}

    def compute_loss(self, out, labels: torch.Tensor, ctx: StepContext):
        logits = out.logits.float()
        m = logits.shape[1]
        lam = lambdas(self.model.extras["lambda_layer"], out.pooled.float())
        p, computed = exit_distribution(lam, float(self.hparams["eps"]))
        ce = per_layer_ce(logits, labels)  # [N, M]
        task = (p[:, :computed] * ce[:, :computed]).mean(0).sum()
        kl = kl_prior_to_p(p, geometric_prior(float(self.hparams["lambda_p"]), m))
        return task + float(self.hparams["beta"]) * kl, {"task": task.detach(), "kl": kl.detach(),
                                                         "computed_layers": computed}
