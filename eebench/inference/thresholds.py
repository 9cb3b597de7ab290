"""Choosing a threshold for a target speed-up from one pass over examples (all layers' logits, or a
policy's values), for ``eebench bench`` and the engine's users.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eebench.errors import EebenchError
from eebench.exits.metrics import speedup_ratios
from eebench.exits.policies import ExitPolicy, get_policy
from eebench.exits.rule import exit_layers_from_scores
from eebench.exits.signals import Signal
from eebench.inference.engine import collate, prepare_examples
from eebench.model.accel import autocast
from eebench.model.backbone import MultiExitModel

# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold, the layer speed-up it gives on the logits it was chosen from, and its
    distance to the nearest observed signal value (a safety margin against float noise)."""

    threshold: float
    layer_speedup: float
    margin: float


def one_pass_logits(model: MultiExitModel, examples, batch_size: int = 32,
                    device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """Logits of every exit, [N, M, C] float32, from ``model.forward`` in input-order batches
    (``precision``: as resolved by ``eebench.model.accel.resolve_precision``)."""
    items = prepare_examples(examples, device)
    model = model.to(device).eval()
    out = []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(items), batch_size):
            ids, mask, tt = collate(items[start:start + batch_size])
            out.append(model(ids, mask, tt).logits.float().cpu())
    return torch.cat(out)


def one_pass_scores(model: MultiExitModel, examples, policy: str | Signal | ExitPolicy, batch_size: int = 32,
                    device: str | torch.device = "cpu", precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, M, C] float32, the policy's values [N, M] float64) from ``model.forward`` in
    input-order batches: what the simulation of any threshold needs."""
    items = prepare_examples(examples, device)
    model = model.to(device).eval()
    pol = get_policy(policy, model=model)
    logits, scores = [], []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(items), batch_size):
            ids, mask, tt = collate(items[start:start + batch_size])
            out = model(ids, mask, tt)
            logits.append(out.logits.float().cpu())
            scores.append(pol.scores(out).double().cpu())
    return torch.cat(logits), torch.cat(scores)


def pick_threshold(layer_logits: torch.Tensor, signal: str | Signal | ExitPolicy, target_speedup: float,
                   tolerance: float = 0.02, scores: torch.Tensor | None = None) -> ThresholdChoice:
    """The threshold whose simulated layer speed-up on ``layer_logits`` [N, M, C] is closest to
    ``target_speedup``; among those within ``tolerance`` (relative) of the closest, the one
    farthest from any observed value. Candidates sit midway between observed values. A policy
    with a fixed operating point returns that threshold and the speed-up it reaches.
    ``scores`` [N, M]: the policy's values when they do not come from the logits alone."""
    sig = get_policy(signal)
    if scores is None:
        scores = sig.scores(layer_logits)
    m = scores.shape[-1]
    fixed = getattr(sig, "fixed_threshold", None)
    if fixed is not None:  # nothing to choose: the one operating point, at whatever speed-up it reaches
        el = exit_layers_from_scores(scores, sig, [fixed])
        inner = scores[:, : m - 1].double()
        margin = float((inner - fixed).abs().min()) if inner.numel() else float("inf")
        return ThresholdChoice(float(fixed), float(speedup_ratios(el, m)[0]), margin)
    if sig.integer:
        cands = torch.arange(1, max(m, 2), dtype=torch.float64)
        margins = torch.full_like(cands, 0.5)
    else:
        vals = torch.unique(scores[:, : m - 1].reshape(-1).double())  # sorted
        if vals.numel() == 0:
            raise EebenchError("a one-layer model has no internal exit to choose a threshold for")
        gaps = vals[1:] - vals[:-1]
        span = float(vals[-1] - vals[0]) or 1.0
        cands = torch.cat([vals[:1] - 1e-3 * span, (vals[1:] + vals[:-1]) / 2, vals[-1:] + 1e-3 * span])
        margins = torch.cat([torch.tensor([1e-3 * span]), gaps / 2, torch.tensor([1e-3 * span])])
        if cands.numel() > 4096:  # keep the sweep small; prefer the widest gaps in each stretch
            keep = torch.linspace(0, cands.numel() - 1, 4096).round().long().unique()
            cands, margins = cands[keep], margins[keep]
    el = exit_layers_from_scores(scores, sig, cands)
    speedups = speedup_ratios(el, m)
    err = (speedups - target_speedup).abs()
    ok = err <= err.min() + tolerance * target_speedup
    best = int(torch.where(ok, margins, torch.full_like(margins, -1.0)).argmax())
    return ThresholdChoice(float(cands[best]), float(speedups[best]), float(margins[best]))
