"""``final-only``: fine-tune the backbone with only the final classifier (the 1.00x reference row
of every table; with ``--num-layers K`` the budget-exiting row, e.g. BERT-6L at 2.00x)."""

from eebench.api import Phase, StepContext, Strategy, per_layer_ce, register_method


@register_method("final-only", "reference point: only the final classifier is trained (no early exits)")
class FinalOnly(Strategy):
    defaults: dict = {}
    trains_exits = False

    def phases(self):
        return [Phase("final", trainable="final")]

    def loss(self, layer_logits, labels, ctx: StepContext):
        ce = per_layer_ce(layer_logits[:, -1:], labels)[:, 0].mean()
        return ce, {}
