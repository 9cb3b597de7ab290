"""``gaml-bert``: GAML-BERT-style training (Zhu, Wang, Ni, Xie, EMNLP 2021), a reconstruction: no
public code exists.

Documented in docs/methods.md, "Reconstructed methods without public code" (confidence: medium for "all-pairs mutual
KD + KD-gradient projection toward CE", low for the details). [reconstructed] marks this
harness's reading; the alternatives named are hyper-parameters.

* **Losses** (logits [N, M, C]): L_CE = sum_m CE_m (``ce_weights=uniform``; ``pabee``: the
  depth-weighted sum_m m CE_m / sum_m m); L_KD = (1/|pairs|) sum_m sum_{t != m}
  T^2 KL(softmax(sg(z_t)/T) || softmax(z_m/T)), deep mutual learning over every ordered pair,
  teacher detached, T = ``temperature`` (1).
* **Gradient alignment (GA)** [reconstructed, PCGrad-like and one-sided]: g_CE = grad L_CE and
  g_KD = grad L_KD over every trainable parameter (backbone and exits) that receives a CE
  gradient (others are skipped); if <g_KD, g_CE> < 0, g_KD <- g_KD - (<g_KD, g_CE> / ||g_CE||^2) g_CE,
  so that afterwards <g_KD, g_CE> >= 0; the update uses g_CE + ``kd_weight`` g_KD.
  ``projection=global`` (default): one inner product over all parameters flattened;
  ``per-tensor``: one per parameter tensor (each tensor's inner product is then >= 0). The
  paper's choice is unverified. Inner products are taken in float64.
* **Where**: the projection runs once per optimiser step on the accumulated gradients (with
  gradient accumulation both g_CE and g_KD are summed over the micro-batches first), after AMP
  unscaling and before clipping (``Strategy.on_gradients``): clipping applies to the combined
  gradient.
* **Exit**: signal-based [unverified]; PABEE patience (the same author's LeeBERT) by default in
  write-ups; every signal is available.

Cost: one more backward per micro-batch (the KD gradient) plus the inner products.
"""

from __future__ import annotations

import torch

from eebench.api import EebenchError, StepContext, Strategy, exit_kd_matrix, per_layer_ce, register_method

__all__ = ["project_kd", "mutual_kd", "GamlBert"]

PROJECTIONS = ("global", "per-tensor")
CE_WEIGHTS = ("uniform", "pabee")


def project_kd(g_ce: list[torch.Tensor], g_kd: list[torch.Tensor], per_tensor: bool = False) -> list[torch.Tensor]:
    """g_KD with its component against g_CE removed (one-sided PCGrad): unchanged where
    <g_KD, g_CE> >= 0, else g_KD - (<g_KD, g_CE> / ||g_CE||^2) g_CE; over all tensors as one
    vector, or tensor by tensor. Afterwards <g_KD', g_CE> >= 0 (up to rounding)."""

    def coef(dot: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return torch.where((dot < 0) & (sq > 0), dot / sq.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dot))

    dots = torch.stack([(k.double() * c.double()).sum() for c, k in zip(g_ce, g_kd, strict=True)])
    sqs = torch.stack([c.double().pow(2).sum() for c in g_ce])
    cs = coef(dots, sqs) if per_tensor else coef(dots.sum(), sqs.sum()).expand_as(dots)
    return [k - cf.to(k.dtype) * c for c, k, cf in zip(g_ce, g_kd, cs, strict=True)]


def mutual_kd(layer_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_KD: the mean over the M(M-1) ordered pairs (t != m) of T^2 KL(sg(p_t) || p_m)."""
    m = layer_logits.shape[1]
    if m < 2:
        return layer_logits.sum() * 0.0
    return exit_kd_matrix(layer_logits, temperature).sum() / (m * (m - 1))  # the diagonal is 0


@register_method("gaml-bert", "GAML-BERT-style (reconstructed): sum of CE + all-pairs mutual KD whose gradient is "
                 "projected never to oppose CE's; exit: patience")
class GamlBert(Strategy):
    defaults = {"kd_weight": 1.0, "temperature": 1.0, "projection": "global", "ce_weights": "uniform"}

    def __init__(self, name: str, **hparams):
        super().__init__(name, **hparams)
        if self.hparams["projection"] not in PROJECTIONS:
            raise EebenchError(f"{name}.projection={self.hparams['projection']!r}; known: {', '.join(PROJECTIONS)}")
        if self.hparams["ce_weights"] not in CE_WEIGHTS:
            raise EebenchError(f"{name}.ce_weights={self.hparams['ce_weights']!r}; known: {', '.join(CE_WEIGHTS)}")
        self._g_kd: dict[str, torch.Tensor] = {}  # this step's accumulated KD gradient

    def ce_loss(self, layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = per_layer_ce(layer_logits, labels).mean(0)  # [M]
        if self.hparams["ce_weights"] == "uniform":
            return ce.sum()
        w = torch.arange(1, ce.shape[0] + 1, dtype=ce.dtype, device=ce.device)
        return (w * ce).sum() / w.sum()

    def compute_loss(self, out, labels: torch.Tensor, ctx: StepContext):
        """Returns L_CE (the trainer back-propagates it into ``.grad``) carrying the value of
        L_CE + kd_weight * L_KD; the KD gradient, scaled as the trainer scales the loss, is
        accumulated here and projected in ``on_gradients``."""
        logits = out.logits.float()
        l_ce = self.ce_loss(logits, labels)
        l_kd = mutual_kd(logits, float(self.hparams["temperature"]))
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if l_kd.requires_grad:
            gs = torch.autograd.grad(l_kd * ctx.loss_scale, [p for _, p in params], retain_graph=True, allow_unused=True)
            for (n, _), g in zip(params, gs, strict=True):
                if g is not None:
                    self._g_kd[n] = self._g_kd[n] + g if n in self._g_kd else g
        shown = (float(self.hparams["kd_weight"]) * l_kd).detach()
        return l_ce + shown, {"l_ce": l_ce.detach(), "l_kd": l_kd.detach()}

    def on_gradients(self, ctx: StepContext) -> None:
        g_kd, self._g_kd = self._g_kd, {}
        params = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        if not params:
            return
        ce = [p.grad for _, p in params]
        kd = [g_kd[n] if n in g_kd else torch.zeros_like(p) for n, p in params]
        projected = project_kd(ce, kd, self.hparams["projection"] == "per-tensor")
        lam = float(self.hparams["kd_weight"])
        for (_, p), k in zip(params, projected, strict=True):
            p.grad.add_(k, alpha=lam)
        self.last_alignment = float(sum((a.double() * b.double()).sum() for a, b in zip(kd, ce, strict=True)))
