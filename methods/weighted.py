"""``weighted``: L = sum_m m * CE_m / sum_m m (PABEE; PCEE-BERT "asc")."""

import torch

from eebench.api import StepContext, Strategy, per_layer_ce, register_method


@register_method("weighted", "depth-weighted cross-entropy, deeper exits weigh more (PABEE)")
class Weighted(Strategy):
    defaults: dict = {}

    def loss(self, layer_logits, labels, ctx: StepContext):
        ce = per_layer_ce(layer_logits, labels).mean(0)  # [M]
        w = torch.arange(1, ce.shape[0] + 1, dtype=ce.dtype, device=ce.device)
        return (w * ce).sum() / w.sum(), {"ce_per_layer": ce.detach()}
