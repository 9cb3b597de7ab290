"""``leebert``: LeeBERT-style training (Wei Zhu, ACL 2021), a reconstruction: no public code exists.

Documented in docs/methods.md, "Reconstructed methods without public code" (confidence: low). What is known: every exit
learns from the others (mutual distillation, variants LLE "learn from later exits" and LAE "learn
from all exits"), the weights of the loss terms are learned, by a bi-level optimisation on two
splits of the training set ("cross-level optimisation", CLO). Everything below marked
[reconstructed] is this harness's reading; the alternatives named are hyper-parameters.

* **Loss** (one pass, logits [N, M, C], teacher detached):
  L(theta, Omega) = sum_m w_m CE_m + kd_weight * sum_m sum_{t in S(m)} w_{t,m} T^2 KL(softmax(sg(z_t)/T) || softmax(z_m/T)),
  S(m) = {t > m} (``variant=lle``; the deepest exit has no KD term) or {t != m} (``variant=lae``,
  the default [reconstructed]: the abstract's "each exit learns from each other"). T = 1
  (``temperature``) [assumption].
* **Weights Omega** (``model.extras["loss_weights"]``, M + M^2 scalars, saved with the model)
  [reconstructed]: ``weighting=softmax`` (default) w_m = M softmax(omega_ce)_m (sum M, uniform 1
  at the start: the loss starts as vanilla's plus KD) and, per student m, w_{., m} =
  softmax over t in S(m) of omega_kd[t, m] (a learned mixture of its teachers, summing to 1, as
  in deep mutual learning's average over peers). Both are scale-fixed, so the outer problem
  cannot collapse them to 0. ``weighting=softplus``: w = softplus(omega)/log 2 (1 at the start),
  unnormalised; the KD weights divided by |S(m)|.
* **Bi-level / CLO** [reconstructed]: the trainer holds out ``heldout`` (0.5) of the training
  split, drawn with ``heldout_seed`` (D2; never dev rows; part of the cell's identity through
  these hyper-parameters); theta trains on the rest (D1) with L(theta, Omega) and Omega fixed
  (detached). Once per optimiser step (every ``omega_every`` steps), with xi = ``xi_scale`` x the
  current learning rate, DARTS' second-order step:
  theta' = theta - xi grad_theta L_D1(theta, Omega) (grad_theta is the step's accumulated
  gradient, before clipping), outer loss L_out = sum_m CE_m (unweighted, so Omega cannot shrink
  it) on one D2 batch at theta', v = grad L_out(theta'), and
  grad_Omega = -xi [grad_Omega L_D1(theta + eps v) - grad_Omega L_D1(theta - eps v)] / (2 eps),
  eps = ``fd_eps`` / ||v|| (the central difference of DARTS; both sides use the same dropout
  masks, and the KD teachers held at theta, as the stop-gradient in the loss says). The Omega-gradient reaches Omega only through theta' (xi = 0 gives exactly 0).
  ``clo=true`` (default): CLO "draws gradient information from both splits": the same step with
  the roles of D1 and D2 swapped is added and the two Omega-gradients are averaged; ``clo=false``
  is plain DARTS. Omega learns in its own parameter group (``omega_lr`` 1e-3, the trainer's
  optimiser: AdamW without weight decay = Adam, under the run's schedule).
* **Exit**: PABEE patience (``--signals patience``) [unverified]; entropy / energy curves come
  from the same cell.

Cost: the Omega step adds, per optimiser step, a forward + backward on D2 and three forwards on
the step's D1 rows (x2 with CLO, plus a backward on D1): about 3x (clo=false) to 5x (clo=true) a
vanilla step; ``omega_every`` thins it out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from eebench.api import (
    EebenchError,
    StepContext,
    Strategy,
    add_preset,
    exit_kd_matrix,
    per_layer_ce,
    register_method,
)

__all__ = ["teacher_mask", "LossWeights", "leebert_loss", "LeeBert"]

VARIANTS = ("lae", "lle")
WEIGHTINGS = ("softmax", "softplus")
MODULE = "loss_weights"


def teacher_mask(num_layers: int, variant: str) -> torch.Tensor:
    """[M, M] bool, entry [t, m]: exit t teaches exit m (LLE: t > m; LAE: t != m)."""
    t = torch.arange(num_layers).unsqueeze(1)
    m = torch.arange(num_layers).unsqueeze(0)
    return t > m if variant == "lle" else t != m


class LossWeights(nn.Module):
    """The learnable loss weights Omega: omega_ce [M] and omega_kd [M (teacher), M (student)]."""

    def __init__(self, num_layers: int, variant: str = "lae", weighting: str = "softmax"):
        super().__init__()
        self.weighting = weighting
        self.omega_ce = nn.Parameter(torch.zeros(num_layers))
        self.omega_kd = nn.Parameter(torch.zeros(num_layers, num_layers))
        self.register_buffer("mask", teacher_mask(num_layers, variant), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_ce [M], w_kd [M, M]); w_kd is 0 wherever t does not teach m."""
        m = self.omega_ce.shape[0]
        mask = self.mask
        if self.weighting == "softmax":
            w_ce = m * torch.softmax(self.omega_ce, 0)
            logits = self.omega_kd.masked_fill(~mask, float("-inf"))
            has = mask.any(0, keepdim=True)
            w_kd = torch.where(has, torch.softmax(torch.where(has, logits, torch.zeros_like(logits)), 0),
                               torch.zeros_like(logits))
            return w_ce, w_kd * mask
        w_ce = F.softplus(self.omega_ce) / math.log(2)
        per_student = mask.sum(0, keepdim=True).clamp_min(1)
        return w_ce, F.softplus(self.omega_kd) / math.log(2) * mask / per_student


def leebert_terms(layer_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                  teacher_logits: torch.Tensor | None = None):
    """(CE_m [M], KD [M teacher, M student]) of one batch: the terms the weights multiply."""
    return per_layer_ce(layer_logits, labels).mean(0), exit_kd_matrix(layer_logits, temperature, teacher_logits)


def leebert_loss(ce: torch.Tensor, kd: torch.Tensor, w_ce: torch.Tensor, w_kd: torch.Tensor,
                 kd_weight: float) -> torch.Tensor:
    """sum_m w_m CE_m + kd_weight * sum_{t, m} w_{t,m} KD[t, m] (linear in the weights)."""
    return (w_ce * ce).sum() + kd_weight * (w_kd * kd).sum()


@register_method("leebert", "LeeBERT-style (reconstructed): learned CE + mutual-KD weights (LAE) by bi-level "
                 "CLO on a held-out half of train; exit: patience")
class LeeBert(Strategy):
    defaults = {"variant": "lae", "weighting": "softmax", "kd_weight": 1.0, "temperature": 1.0,
                "heldout": 0.5, "heldout_seed": 0, "omega_lr": 1e-3, "xi_scale": 1.0, "clo": True,
                "fd_eps": 0.01, "omega_every": 1}

    def __init__(self, name: str, **hparams):
        super().__init__(name, **hparams)
        h = self.hparams
        if h["variant"] not in VARIANTS:
            raise EebenchError(f"{name}.variant={h['variant']!r}; known: {', '.join(VARIANTS)}")
        if h["weighting"] not in WEIGHTINGS:
            raise EebenchError(f"{name}.weighting={h['weighting']!r}; known: {', '.join(WEIGHTINGS)}")
        if not 0 < float(h["heldout"]) < 1:
            raise EebenchError(f"{name}.heldout={h['heldout']!r}; accepted: a fraction strictly between 0 and 1")
        if int(h["omega_every"]) < 1:
            raise EebenchError(f"{name}.omega_every={h['omega_every']!r}; accepted: an integer >= 1")
        self.heldout_batches = 0  # batches of D2 drawn so far (the stream's position)
        self._inner: list[tuple[dict, torch.Tensor, float]] = []  # this step's D1 micro-batches

    # -- contract ------------------------------------------------------------------------
    def modules(self, model) -> dict[str, nn.Module]:
        return {MODULE: LossWeights(model.num_layers, self.hparams["variant"], self.hparams["weighting"])}

    def param_groups(self) -> dict[str, dict]:
        return {"omega": {"prefixes": [f"extras.{MODULE}."], "lr": float(self.hparams["omega_lr"])}}

    def held_out(self) -> tuple[float, int]:
        return float(self.hparams["heldout"]), int(self.hparams["heldout_seed"])

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.extras[MODULE]()

    def compute_loss(self, out, labels: torch.Tensor, ctx: StepContext):
        ce, kd = leebert_terms(out.logits.float(), labels, float(self.hparams["temperature"]))
        w_ce, w_kd = (w.detach() for w in self.weights())  # theta's step never moves Omega
        loss = leebert_loss(ce, kd, w_ce, w_kd, float(self.hparams["kd_weight"]))
        if ctx.inputs is not None:
            self._inner.append((ctx.inputs, labels, ctx.loss_scale))
        return loss, {"ce_per_layer": ce.detach(), "kd": (w_kd * kd).sum().detach()}

    def on_gradients(self, ctx: StepContext) -> None:
        inner, self._inner = self._inner, []
        if ctx.step % int(self.hparams["omega_every"]) or not inner or self.held_out_data is None:
            return
        xi = float(self.hparams["xi_scale"]) * float(ctx.lr if ctx.lr is not None else 0.0)
        theta = {n: p for n, p in self.model.named_parameters()
                 if p.requires_grad and p.grad is not None and not n.startswith(f"extras.{MODULE}.")}
        inputs, labels = self.held_out_data.batch(self.heldout_batches)
        self.heldout_batches += 1
        outer = [(inputs, labels, 1.0)]
        g_d1 = {n: p.grad.detach().clone() for n, p in theta.items()}
        grads = [self.hypergradient(theta, g_d1, inner, outer, xi)]
        if self.hparams["clo"]:
            g_d2 = self.inner_gradient(theta, outer)
            grads.append(self.hypergradient(theta, g_d2, outer, inner, xi))
        lw = self.model.extras[MODULE]
        for i, p in enumerate((lw.omega_ce, lw.omega_kd)):
            p.grad = sum(g[i] for g in grads) / len(grads)

    # -- the bi-level step -----------------------------------------------------------------
    def _call(self, params: dict, inputs: dict):
        return functional_call(self.model, params, args=(), kwargs=inputs).logits.float()

    def inner_gradient(self, theta: dict, batches) -> dict:
        """grad_theta L(theta, Omega) on ``batches`` (Omega fixed), without touching ``.grad``."""
        w_ce, w_kd = (w.detach() for w in self.weights())
        t = float(self.hparams["temperature"])
        loss = sum(s * leebert_loss(*leebert_terms(self._call({}, x), y, t), w_ce, w_kd, float(self.hparams["kd_weight"]))
                   for x, y, s in batches)
        gs = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(theta.items(), gs, strict=True)}

    def hypergradient(self, theta: dict, g_inner: dict, inner, outer, xi: float) -> tuple[torch.Tensor, torch.Tensor]:
        """d L_out(theta - xi g_inner) / d Omega, by DARTS' central difference: (d omega_ce, d omega_kd).

        ``inner`` / ``outer``: lists of (inputs, labels, share) whose shares weight the batches'
        losses as the trainer weights micro-batches; ``g_inner`` is grad_theta of the inner loss."""
        lw = self.model.extras[MODULE]
        zero = (torch.zeros_like(lw.omega_ce), torch.zeros_like(lw.omega_kd))
        if xi == 0.0:
            return zero
        primed = {n: (p.detach() - xi * g_inner[n]).requires_grad_() for n, p in theta.items()}
        l_out = sum(s * per_layer_ce(self._call(primed, x), y).mean(0).sum() for x, y, s in outer)
        vs = torch.autograd.grad(l_out, list(primed.values()), allow_unused=True)
        v = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(theta.items(), vs, strict=True)}
        norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in v.values()))
        if norm == 0.0:
            return zero
        eps = float(self.hparams["fd_eps"]) / norm
        t = float(self.hparams["temperature"])
        rng = _rng_state(next(iter(theta.values())).device)
        # The teachers are held at theta (their logits are detached in the loss, so the gradient
        # g_inner has no teacher path; the difference must not have one either).
        _set_rng_state(rng)
        with torch.no_grad():
            teachers = [self._call({}, x) for x, _, _ in inner]
        sides = []
        for sign in (1.0, -1.0):
            _set_rng_state(rng)  # the same dropout masks on every side: a difference of one function
            shifted = {n: p.detach() + sign * eps * v[n] for n, p in theta.items()}
            with torch.no_grad():
                terms = [leebert_terms(self._call(shifted, x), y, t, z0)
                         for (x, y, _), z0 in zip(inner, teachers, strict=True)]
            sides.append((sum(s * ce for (ce, _), (_, _, s) in zip(terms, inner, strict=True)),
                          sum(s * kd for (_, kd), (_, _, s) in zip(terms, inner, strict=True))))
        d_ce, d_kd = sides[0][0] - sides[1][0], sides[0][1] - sides[1][1]
        w_ce, w_kd = lw()
        # L_D1 is linear in the weights: grad_Omega L(theta+) - grad_Omega L(theta-) in one call.
        diff = leebert_loss(d_ce, d_kd, w_ce, w_kd, float(self.hparams["kd_weight"]))
        return torch.autograd.grad(-xi / (2 * eps) * diff, [lw.omega_ce, lw.omega_kd])

    def state_dict(self) -> dict:
        return {"heldout_batches": self.heldout_batches}

    def load_state_dict(self, state: dict) -> None:
        self.heldout_batches = int(state.get("heldout_batches", 0))


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def _set_rng_state(state) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


add_preset("leebert-lle", LeeBert, "LeeBERT-style, LLE: each exit distils from the later exits only", variant="lle")
