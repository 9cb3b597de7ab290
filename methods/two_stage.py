"""``two-stage`` (DeeBERT): fine-tune backbone + final classifier, then freeze them and train
the internal classifiers. Each stage runs the configured number of epochs."""

from eebench.api import Phase, StepContext, Strategy, per_layer_ce, register_method


@register_method("two-stage", "DeeBERT: backbone + final classifier first, then internal classifiers on a frozen backbone")
class TwoStage(Strategy):
    defaults: dict = {}

    def phases(self):
        return [Phase("backbone+final", trainable="backbone+final"), Phase("internal-heads", trainable="internal-heads")]

    def loss(self, layer_logits, labels, ctx: StepContext):
        ce = per_layer_ce(layer_logits, labels).mean(0)
        loss = ce[-1] if ctx.phase == 0 else ce[:-1].sum()
        return loss, {"ce_per_layer": ce.detach()}
