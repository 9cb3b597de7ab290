"""``cosee``: COSEE (He et al., AAAI 2025): sample weighting (SWM) + online signal calibration (OSC).

Exactly as docs/methods.md, from the same training forward pass:

1. signals of the internal layers with the training signal;
2. K thresholds drawn uniformly from [lo, hi] ([0, 1] in the first epoch, then the [min, max] of
   all internal-layer signal values seen in the previous epoch);
3. simulated exit layers m* for every threshold (the shared exit rule, strict comparisons);
4. SWM weights softmax_m(-beta_t |m - m*|), beta_t = beta_0 * t / T;
5. L_CE = mean over thresholds of (1/N) sum_n sum_m w[n, m] CE[n, m];
6. OSC per internal layer, easy/hard by that layer's own correctness, signal not detached;
7. L = L_CE + alpha * L_OSC.
"""

from __future__ import annotations

import torch

from eebench.api import (
    EebenchError,
    Signal,
    StepContext,
    Strategy,
    add_preset,
    exit_layers_from_scores,
    get_signal,
    per_layer_ce,
    register_method,
)

__all__ = ["swm_weights", "osc_loss", "cosee_loss", "Cosee"]


def swm_weights(exit_layers: torch.Tensor, num_layers: int, beta: float) -> torch.Tensor:
    """SWM weights [N, M] = softmax over m of (-beta |m - m*_n|); ``exit_layers`` 1-based [N]."""
    m = torch.arange(1, num_layers + 1, device=exit_layers.device, dtype=torch.float32)
    dist = (m.unsqueeze(0) - exit_layers.float().unsqueeze(1)).abs()
    return torch.softmax(-beta * dist, dim=1)


def osc_loss(layer_logits: torch.Tensor, labels: torch.Tensor, signal: str | Signal = "energy", margin: float = 0.3):
    """Online signal calibration over the internal layers (scalar, differentiable in the logits).

    Per internal layer m: easy = classifier m is right. Low-is-easy signals:
    max(0, mean s_easy - mean s_hard + margin); high-is-easy: max(0, mean s_hard - mean s_easy + margin).
    Layers whose batch is all easy or all hard are skipped; the mean over the rest (0 if none).
    """
    sig = get_signal(signal)
    if not sig.differentiable:
        raise EebenchError(f"signal {sig.name!r} is not differentiable and cannot drive OSC; use energy, entropy or softmax")
    internal = layer_logits[:, :-1]
    scores = sig.score(internal)  # [N, M-1], not detached
    easy = (internal.argmax(-1) == labels.unsqueeze(1)).float()
    hard = 1.0 - easy
    n_easy, n_hard = easy.sum(0), hard.sum(0)
    valid = (n_easy > 0) & (n_hard > 0)
    if not valid.any():
        return layer_logits.sum() * 0.0
    mean_easy = (scores * easy).sum(0) / n_easy.clamp_min(1)
    mean_hard = (scores * hard).sum(0) / n_hard.clamp_min(1)
    gap = mean_hard - mean_easy if sig.higher_is_easier else mean_easy - mean_hard
    per_layer = torch.relu(gap + margin)
    return per_layer[valid].mean()


def cosee_loss(
    layer_logits: torch.Tensor,
    labels: torch.Tensor,
    thresholds,
    beta: float,
    signal: str | Signal = "energy",
    alpha: float = 0.1,
    margin: float = 0.3,
    swm: bool = True,
    osc: bool = True,
) -> torch.Tensor:
    """L = L_CE + alpha * L_OSC for one batch. ``beta`` is the current beta_t; ``swm=False``
    means uniform weights over layers (1/M each); ``osc=False`` drops the OSC term."""
    return _cosee_loss_parts(layer_logits, labels, thresholds, beta, signal, alpha, margin, swm, osc)[0]


def _cosee_loss_parts(layer_logits, labels, thresholds, beta, signal, alpha, margin, swm, osc):
    sig = get_signal(signal)
    n, m, _ = layer_logits.shape
    ce = per_layer_ce(layer_logits, labels)  # [N, M]
    thr = torch.as_tensor(thresholds, dtype=torch.float64, device=layer_logits.device).reshape(-1)
    scores = sig.score(layer_logits.detach())  # exits are simulated on detached signals
    if swm:
        exits = exit_layers_from_scores(scores.double(), sig, thr)  # [K, N]
        w = torch.stack([swm_weights(e, m, beta) for e in exits])  # [K, N, M]
        l_ce = (w * ce.unsqueeze(0)).sum(-1).mean(-1).mean()
    else:
        # beta_t = 0 gives uniform weights 1/M for every threshold: the plain mean over layers.
        l_ce = ce.mean(1).mean()
    l_osc = osc_loss(layer_logits, labels, sig, margin) if osc else layer_logits.sum() * 0.0
    internal = scores[:, :-1]
    return l_ce + alpha * l_osc, l_ce.detach(), l_osc.detach(), internal


@register_method("cosee", "COSEE: sample weighting (SWM) + online signal calibration (OSC), energy signal")
class Cosee(Strategy):
    defaults = {
        "signal": "energy",
        "alpha": 0.1,
        "beta0": 10.0,
        "margin": 0.3,
        "num_thresholds": 5,
        "swm": True,
        "osc": True,
    }
    train_signal_param = "signal"

    def __init__(self, name: str, **hparams):
        super().__init__(name, **hparams)
        sig = get_signal(self.hparams["signal"])
        if not sig.differentiable:
            raise EebenchError(f"COSEE cannot train with signal {sig.name!r}; use energy, entropy or softmax")
        self.signal = sig
        self.lo, self.hi = 0.0, 1.0  # first epoch: [0, 1]
        self._seen_min, self._seen_max = float("inf"), float("-inf")

    def loss(self, layer_logits, labels, ctx: StepContext):
        h = self.hparams
        k = int(h["num_thresholds"])
        thr = self.lo + (self.hi - self.lo) * torch.rand(k, dtype=torch.float64)
        beta = float(h["beta0"]) * ctx.step / max(ctx.total_steps, 1)
        loss, l_ce, l_osc, internal = _cosee_loss_parts(
            layer_logits, labels, thr, beta, self.signal, float(h["alpha"]), float(h["margin"]),
            bool(h["swm"]), bool(h["osc"]),
        )
        if internal.numel():
            self._seen_min = min(self._seen_min, float(internal.min()))
            self._seen_max = max(self._seen_max, float(internal.max()))
        return loss, {"l_ce": l_ce, "l_osc": l_osc, "beta": beta}

    def on_epoch_end(self, epoch: int) -> None:
        if self._seen_min <= self._seen_max:
            self.lo, self.hi = self._seen_min, self._seen_max
        self._seen_min, self._seen_max = float("inf"), float("-inf")

    def protocol_warnings(self, epochs: int) -> list[str]:
        if epochs > 1 or not bool(self.hparams["swm"]):
            return []
        return [f"{self.name} is trained for one epoch: its threshold range is recalibrated only after an epoch, so "
                "every step draws thresholds from [0, 1], which sends most samples out at layer 1 and makes SWM "
                "lean on the shallow layers; train 2 or more epochs (the official scripts train 10)"]

    def state_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "seen_min": self._seen_min, "seen_max": self._seen_max}

    def load_state_dict(self, state: dict) -> None:
        self.lo, self.hi = float(state["lo"]), float(state["hi"])
        self._seen_min, self._seen_max = float(state["seen_min"]), float(state["seen_max"])


add_preset("cosee-entropy", Cosee, "COSEE trained with the normalised-entropy signal", signal="entropy")
add_preset("cosee-softmax", Cosee, "COSEE trained with the max-softmax signal", signal="softmax")
add_preset("cosee-no-swm", Cosee, "ablation: uniform layer weights (beta_t = 0) + OSC", swm=False)
add_preset("cosee-no-osc", Cosee, "ablation: SWM only, no OSC term", osc=False)
