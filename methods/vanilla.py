"""``vanilla``: L = sum_m CE_m (DeeBERT-style joint training, BERxiT's "all")."""

from eebench.api import StepContext, Strategy, per_layer_ce, register_method


@register_method("vanilla", "sum of per-layer cross-entropy (conventional joint training)")
class Vanilla(Strategy):
    defaults: dict = {}

    def loss(self, layer_logits, labels, ctx: StepContext):
        ce = per_layer_ce(layer_logits, labels).mean(0)  # [M]
        return ce.sum(), {"ce_per_layer": ce.detach()}
